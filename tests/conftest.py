"""Shared test set-up.

Without a GPU, the Triton kernels run in Triton's CPU interpreter, which must be chosen before
the kernels are defined, i.e. before any test imports ``trellis.ops.triton``.

The ``vendor`` fixture pretends the CPU is another vendor's (``vendor("GenuineIntel")``): the
choices of ``trellis.runner.cpu_linear`` that depend on it (the fp32 default kind where the panels
do not serve, the layout of ``"onednn"``) follow; whether fp32 panels serve is read afresh after
the test, for tests that pretend another build. ``intel`` is ``vendor("GenuineIntel")``.

``installed(name)`` imports a package the project installs for its tests (lm-eval, peft): a test
that needs one skips where it is missing, except in CI (``CI=true``), where a missing package
means a broken set-up and the test fails instead of passing silently without coverage.
"""

import importlib
import os
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true")


def installed(name: str) -> ModuleType:
    return importlib.import_module(name) if IN_CI else pytest.importorskip(name)


@pytest.fixture
def vendor(monkeypatch):
    from trellis.runner import cpu_linear

    def forget() -> None:  # what a test may have decided under a pretended build
        getattr(cpu_linear.fp32_panels, "cache_clear", lambda: None)()  # (not where a test replaced it)

    def pretend(name: str) -> None:
        monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: name)
        forget()

    yield pretend
    forget()  # before monkeypatch restores the vendor: read afresh


@pytest.fixture
def intel(vendor):
    """An Intel CPU, where ``"onednn"`` stores fp32 weights input-major (cpu_linear.input_major)."""
    vendor("GenuineIntel")
