"""A grid on this machine: the coordinator in this process, the other stages as child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from trellis.grid.devices import check_local_stages
from trellis.grid.launch import GridOptions, start_coordinator
from trellis.grid.placement import parse_layers
from trellis.grid.rendezvous import Endpoint, free_port
from trellis.grid.runner import GridRunner
from trellis.grid.shared_host import shared_host_environment
from trellis.models.loading import load_llama_config

# Seconds LocalGrid.stop waits for the stages of a failed grid: the healthy ones exit within it.
FAILED_GRID_GRACE = 5.0


def trellis_command(*args: str) -> list[str]:
    """``python -m trellis *args`` for a child process that runs this process's Trellis: with -P
    (Python 3.11 on), which keeps the working directory off ``sys.path``, where ``python -m`` would
    import a ``trellis`` checkout lying there rather than the installed copy."""
    return [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "trellis", *args]


def trellis_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for such a child. Where this process took Trellis from its working directory
    (``python -m trellis`` in a checkout that is not installed), that directory leads PYTHONPATH,
    so that the child finds it there too."""
    environ = dict(environ)
    root = Path(__file__).resolve().parents[2]  # the folder holding this trellis package
    if root == Path.cwd().resolve():
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), environ.get("PYTHONPATH")]))
    return environ


def stage_command(options: GridOptions, endpoint: Endpoint) -> list[str]:
    """The ``trellis grid stage`` command line that starts ``endpoint``'s rank with ``options``."""
    command = trellis_command("grid", "stage", "--rank", str(endpoint.rank), "--world-size", str(endpoint.world_size),
                              "--master-addr", endpoint.master_addr, "--master-port", str(endpoint.master_port))
    for name, value in asdict(options).items():
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    return command


class LocalGrid:
    """A grid of ``stages`` processes on this machine: the coordinator in this process, the other
    stages as ``trellis grid stage`` child processes over loopback (``stage_options`` lets them
    differ, e.g. in threads). ``with LocalGrid(...) as runner:`` stops them all at the end."""

    def __init__(self, options: GridOptions, stages: int, stage_options: GridOptions | None = None,
                 port: int | None = None) -> None:
        self.options, self.stage_options = options, stage_options or options
        self.endpoint = Endpoint(0, stages, "127.0.0.1", port or free_port())
        self.processes: list[subprocess.Popen] = []
        self.runner: GridRunner | None = None
        self._threads = torch.get_num_threads()  # the coordinator's --threads last as long as the grid

    def __enter__(self) -> GridRunner:
        layers = load_llama_config(self.options.model_path, self.options.load_kwargs()).num_hidden_layers
        if self.endpoint.world_size > layers:  # refused before any stage process starts
            raise ValueError(f"{self.endpoint.world_size} stages for a model of {layers} layers: each stage needs "
                             "a layer")
        if self.options.layers:  # likewise: the coordinator would find it only once every stage joined
            parse_layers(self.options.layers, layers, self.endpoint.world_size)
        for options in (self.options, self.stage_options):  # likewise: NCCL would refuse a shared GPU at the end
            check_local_stages(options.device, self.endpoint.world_size)
        for rank in range(1, self.endpoint.world_size):
            endpoint = Endpoint(rank, self.endpoint.world_size, self.endpoint.master_addr, self.endpoint.master_port)
            # A session of their own: Ctrl-C reaches the coordinator only, which then stops them in order.
            # LOCAL_RANK: stage r runs on cuda:r under a plain --device cuda, as under torchrun.
            self.processes.append(subprocess.Popen(stage_command(self.stage_options, endpoint), start_new_session=True,
                                                   env=trellis_environment({**shared_host_environment(),
                                                                            "LOCAL_RANK": str(rank)})))
        try:
            self.runner = start_coordinator(self.options, self.endpoint, self._lost_stage)
        except BaseException:
            self.stop(FAILED_GRID_GRACE)  # a stage waiting for a coordinator that never came would hold it 30 s
            raise
        return self.runner

    def _lost_stage(self) -> str | None:
        """Why the grid cannot start, if a stage process has exited."""
        for rank, process in enumerate(self.processes, 1):
            if process.poll() is not None:
                return f"stage {rank} exited with status {process.returncode} before the grid started"
        return None

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> list[int | None]:
        """Close the grid and wait for the stage processes, ``timeout`` seconds in all (at most
        ``FAILED_GRID_GRACE`` once the grid has failed: a lost or hung stage does not exit on its
        own), then kill those left; their exit statuses."""
        if self.runner is not None:
            self.runner.close()
            if self.runner.failure is not None:
                timeout = min(timeout, FAILED_GRID_GRACE)
        torch.set_num_threads(self._threads)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return [p.returncode for p in self.processes]
