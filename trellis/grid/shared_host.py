"""Stages that share a machine: how their OpenMP threads wait, and how many steps to keep in flight."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger("trellis.grid")

# Stages on one machine take turns on its cores. After each parallel region, libgomp's worker
# threads spin for GOMP_SPINCOUNT iterations (300,000 by default, ~10 ms here) before they sleep,
# so a stage that has handed its step on keeps a core busy while the next stage computes. A short
# spin (~0.3 ms) keeps a stage's own back-to-back regions warm and frees the cores at a hand-over
# (docs/grid.md has the measurements). libgomp reads it when it loads, so it is set per process.
SHARED_HOST_SPIN_COUNT = "10000"
OPENMP_WAIT_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def wait_setting_chosen(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` sets how OpenMP threads wait (then Trellis leaves it as it is)."""
    return any(name in environ for name in OPENMP_WAIT_SETTINGS)


def shared_host_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) for a grid process that shares its machine with other
    stages: a short OpenMP spin, unless the user chose a wait setting."""
    environ = dict(os.environ if environ is None else environ)
    if not wait_setting_chosen(environ):
        environ["GOMP_SPINCOUNT"] = SHARED_HOST_SPIN_COUNT
    return environ


def warn_if_spinning(hosts: list[str]) -> None:
    """Warn when this process shares its machine with other stages (``hosts``: each stage's machine)
    under libgomp's long default spin."""
    if len(set(hosts)) < len(hosts) and not wait_setting_chosen(os.environ):
        log.warning("stages share a machine, and this process's OpenMP threads spin for ~10 ms after each step, "
                    "slowing the next stage; start it with GOMP_SPINCOUNT=%s (trellis grid --stages does)",
                    SHARED_HOST_SPIN_COUNT)


def default_micro_batches(hosts: list[str]) -> int:
    """One step in flight per machine (``hosts``: each stage's). Stages that share a machine share its cores and memory
    bandwidth: more micro-batches there would only split each decode step's batch, and every
    extra micro-batch reads all of a stage's weights again (decode is memory-bound)."""
    return len(set(hosts))
