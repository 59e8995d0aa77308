"""Running the app with uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from transformers import PreTrainedTokenizerBase

from trellis.serve.app import create_app
from trellis.serve.config import ServeConfig

log = logging.getLogger("trellis.serve")

STOP_DELAY_S = 2  # between a fatal model failure and the shutdown it causes
GRACEFUL_SHUTDOWN_S = 10  # in-flight requests get this long to finish on Ctrl-C; then they are cancelled
CLOSE_MARGIN_S = 1.0  # before the grace period ends, the engine fails what still runs (its clients are told)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve beyond this machine
        return False


def check_address(host: str, port: int) -> None:
    """Raise ``OSError`` naming the address unless ``host:port`` can be bound now (as uvicorn binds
    it: reusing an address in TIME_WAIT), so that a busy port fails before a model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:  # socket.gaierror included
        raise OSError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from exc


def serve(model: object, tokenizer: PreTrainedTokenizerBase, config: ServeConfig, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info", stop_when: Callable[[], bool] | None = None) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM), or until ``stop_when()`` turns true (a grid that
    lost a stage); shuts down cleanly, cancelling what is still running."""
    if config.api_key is None and not is_loopback(host):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    app = create_app(model, tokenizer, config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    if stop_when is not None:
        threading.Thread(target=_stop_when, args=(server, stop_when), name="trellis-serve-watch", daemon=True).start()
    threading.Thread(target=_close_before_grace_ends, args=(server, app), name="trellis-serve-close",
                     daemon=True).start()
    # uvicorn re-raises the signal it shut down for once it is done. SIGTERM's default action would
    # then kill the process before the caller's cleanup (a grid's stop signal to its stages), so
    # here it raises KeyboardInterrupt, as Ctrl-C does.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        server.run()
    except KeyboardInterrupt:  # the signal uvicorn shut down for: the shutdown was clean
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _close_before_grace_ends(server: uvicorn.Server, app: FastAPI, poll_s: float = 0.1) -> None:
    """Once shutdown begins, stop the engine shortly before uvicorn's grace period ends, unless
    everything finished: what still runs then fails with a shutdown error that its client reads
    (a stream ends with an error event and ``[DONE]``), where uvicorn would cut the connection.
    A request whose body is still arriving then is refused (503), where uvicorn would answer 500."""
    bridge = app.state.bridge
    while not server.should_exit:
        time.sleep(poll_s)
    deadline = time.monotonic() + GRACEFUL_SHUTDOWN_S - CLOSE_MARGIN_S
    while time.monotonic() < deadline:  # (uvicorn exits sooner once every connection has closed)
        time.sleep(poll_s)
    app.state.closing.set()
    if bridge.engine.has_work:
        log.warning("shutting down: failing the requests still running")
        bridge.close()


def _stop_when(server: uvicorn.Server, condition: Callable[[], bool], poll_s: float = 0.5) -> None:
    while not server.should_exit:
        if condition():
            log.error("stopping the server: its model can serve nothing more")
            time.sleep(STOP_DELAY_S)  # the requests in flight get their errors first
            server.should_exit = True
            return
        time.sleep(poll_s)
