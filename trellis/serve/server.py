"""Running the app with uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn
from transformers import PreTrainedTokenizerBase

from trellis.serve.app import create_app
from trellis.serve.config import ServeConfig

log = logging.getLogger("trellis.serve")

GRACEFUL_SHUTDOWN_S = 10  # in-flight requests get this long to finish on Ctrl-C; then they are cancelled


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve beyond this machine
        return False


def serve(model: object, tokenizer: PreTrainedTokenizerBase, config: ServeConfig, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM); shuts down cleanly, cancelling what is still running."""
    if config.api_key is None and not is_loopback(host):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    app = create_app(model, tokenizer, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
