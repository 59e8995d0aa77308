"""Where a grid's ranks meet: the ``torch.distributed.TCPStore`` rendezvous, the waits on its
keys, and the process group the steps travel over."""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from trellis.grid.transport import GridError

T = TypeVar("T")


@dataclass
class Endpoint:
    """Where this rank sits and how to reach the rendezvous."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ValueError(f"a grid needs at least 2 stages, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a grid of {self.world_size} stages (ranks 0 to "
                             f"{self.world_size - 1})")

    @staticmethod
    def from_env() -> Endpoint | None:
        """The endpoint torchrun (or any ``env://`` launcher) gives this process, if any."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        return Endpoint(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                        os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")))


def connect(endpoint: Endpoint, timeout: float) -> dist.Store:
    """The rendezvous store, namespaced per launch attempt (torchrun restarts reuse its store)."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts it
    hosts = endpoint.rank == 0 and not agent_store
    deadline = time.monotonic() + timeout
    if not hosts:
        wait_for_listener(endpoint.master_addr, endpoint.master_port, timeout)

    def open_store() -> dist.TCPStore:
        return dist.TCPStore(endpoint.master_addr, endpoint.master_port, endpoint.world_size, is_master=hosts,
                             timeout=datetime.timedelta(seconds=max(deadline - time.monotonic(), 1.0)),
                             wait_for_workers=False)

    store = open_store() if hosts else within(deadline - time.monotonic(), open_store, lambda: GridError(
        f"no Trellis rendezvous answered at --master-addr {endpoint.master_addr} --master-port "
        f"{endpoint.master_port} within {timeout:.0f} s: something else accepts connections there"))
    return dist.PrefixStore(f"trellis-grid/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def within(seconds: float, call: Callable[[], T], failure: Callable[[], Exception]) -> T:
    """``call()``, or ``failure()`` raised after ``seconds``: TCPStore's client waits for the store's
    answer without a limit once something has accepted its connection (another program's port)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="trellis-grid-rendezvous", daemon=True)  # left behind if it hangs
    thread.start()
    thread.join(max(seconds, 1.0))
    if not outcome:
        raise failure()
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def wait_for_listener(host: str, port: int, timeout: float) -> None:
    """Wait until something accepts connections at ``host:port`` (the store), else a GridError after
    ``timeout`` seconds. TCPStore's own wait for a store that is not up yet logs a C++ stack trace
    at every attempt; a plain connection that closes at once costs the store nothing."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 2.0), 0.05)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise GridError(f"cannot open the rendezvous at --master-addr {host} --master-port {port}: nothing "
                                f"accepted a connection there within {timeout:.0f} s (is the coordinator, rank 0, "
                                f"started?): {exc}") from None
            time.sleep(0.1)


def process_group(store: dist.Store, endpoint: Endpoint, device: torch.device, timeout: float) -> dist.ProcessGroup:
    """This grid's own process group (not the global default one): gloo on CPU, NCCL on CUDA."""
    wait = datetime.timedelta(seconds=timeout)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = wait  # as gloo's (NCCL's own default is 10 minutes); torch sets it so itself
        return dist.ProcessGroupNCCL(store, endpoint.rank, endpoint.world_size, options)
    return dist.ProcessGroupGloo(store, endpoint.rank, endpoint.world_size, wait)


STORE_POLL_S = 0.1  # how often the coordinator looks for the stages' keys while they start


def wait_for(store: dist.Store, keys: list[str], timeout: float, lost: Callable[[], str | None], what: str) -> list:
    """The JSON values of ``keys`` once all are set. Polls, so that ``lost`` (a ``LocalGrid``'s
    look at its stage processes) can end the wait at once with a GridError saying why; ``what``
    names the wait in the GridError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        gone = lost()
        if gone is not None:
            raise GridError(gone)
        if time.monotonic() >= deadline:
            missing = [key for key in keys if not store.check([key])]
            raise GridError(f"{what} within {timeout:.0f} s (no {', '.join(missing)})")
        time.sleep(STORE_POLL_S)
    return [json.loads(store.get(key)) for key in keys]


PLAN_READ_GRACE_S = 10.0  # how long a refusing coordinator keeps its rendezvous up for the stages to read why


def wait_for_plan_read(store: dist.Store, ranks: range) -> None:
    """Keep the rendezvous, which this process hosts, until every stage has read the plan (a
    refusal's reason) or ``PLAN_READ_GRACE_S`` passed: exiting at once would close it under a
    stage about to read, which would then report a lost connection instead of the reason."""
    deadline = time.monotonic() + PLAN_READ_GRACE_S
    while not store.check([f"plan_read/{r}" for r in ranks]) and time.monotonic() < deadline:
        time.sleep(STORE_POLL_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
