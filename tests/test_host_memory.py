"""Freed memory kept in the process (trellis/runner/host_memory.py): glibc's mmap and trim
thresholds fixed, once, when a CPU model's weights are laid out; the switch that leaves malloc
alone. (What it saves, page faults in every prefill, is measured in docs/architecture.md: glibc's
own heuristics make a small fault count in a test depend on the address layout.)"""

import ctypes
import subprocess
import sys

import pytest

from tests.models import tiny_pair
from trellis.runner import host_memory
from trellis.runner import runner as runner_module


def kept_in_a_fresh_process(switch: str) -> str:
    env = {"TRELLIS_KEEP_FREED_MEMORY": switch, "PATH": "/usr/bin:/bin"}
    script = "from trellis.runner.host_memory import keep_freed_memory; print(keep_freed_memory())"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_glibc_takes_the_thresholds():
    assert kept_in_a_fresh_process("1") == "True"


def test_the_switch_leaves_malloc_alone():
    assert kept_in_a_fresh_process("0") == "False"


def test_the_thresholds_asked_for(monkeypatch):
    """mmap only above 32 MiB (glibc's largest threshold), no trimming below 1 GiB: both set, since
    setting one stops glibc raising either."""
    calls = []

    class LibC:
        @staticmethod
        def mallopt(param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: LibC)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("TRELLIS_KEEP_FREED_MEMORY", raising=False)
    keep = host_memory.keep_freed_memory.__wrapped__  # past the once-a-process cache
    assert keep() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]


def test_laying_out_cpu_weights_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(runner_module, "keep_freed_memory", lambda: calls.append(1))
    _, model = tiny_pair()
    model.runner.set_linear_kernel("blas")
    assert calls
