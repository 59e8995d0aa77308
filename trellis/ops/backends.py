"""The backends by name: which module holds each, which device each serves, loading, the default.

    reference  reference.py        any device (the spec; the MPS path)
    cpp        cpp.py              CPU: the C++ kernels, built with ninja on first use
    triton     triton/             CUDA (CPU tensors too, under TRITON_INTERPRET=1: the tests)

Each serves the attention ops of ``schema.py`` (``store_kv``, ``paged_attention``,
``plan_paged_attention``) with the schema's arguments, ``kernels(name)``; ``cpp`` serves every op
of the schema (the linear and fused ops too, and its own layer loop), whose references on other
devices (``schema.REFERENCES``) are in ``reference.py``, ``quant.py`` and ``panels.py``.
``TRELLIS_BACKEND=reference|cpp|triton`` forces one.

``trellis::`` ops called on CPU tensors run the C++ kernels: importing this module registers, for
the CPU dispatch key, a Python kernel that loads (or builds) the C++ library on its first call
and forwards to the library's ``trellis_cpp::`` op, or, where it cannot be built, to the
reference, after one warning. Trellis' own calls skip that hop: ``kernels("cpp")`` is
``torch.ops.trellis_cpp``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from trellis.ops import reference
from trellis.ops.schema import REFERENCES, SCHEMAS

# backend name -> (module, the device type it serves by default)
_COMPILED = {"cpp": ("trellis.ops.cpp", "cpu"), "triton": ("trellis.ops.triton", "cuda")}
BACKENDS = ("reference", *_COMPILED)
_loaded: dict[str, bool] = {}
_kernels: dict[str, object] = {"reference": reference}


def _module(name: str) -> ModuleType:
    return importlib.import_module(_COMPILED[name][0])


def load_backend(name: str) -> bool:
    """Load (build if needed) a compiled backend; False, with one warning, if it cannot be."""
    if name not in _loaded:
        try:
            _loaded[name] = _module(name).load()
        except Exception as exc:  # noqa: BLE001 -- a missing compiler or Triton must not break inference
            warnings.warn(f"trellis: the {name} backend is unavailable ({exc}); using the PyTorch reference")
            _loaded[name] = False
    return _loaded[name]


def kernels(name: str):
    """The op functions of a loaded backend (at least ``store_kv``, ``paged_attention`` and
    ``plan_paged_attention``; ``cpp``'s every op of the schema); they check their own arguments,
    except the reference's (see ``checks.py``)."""
    if name not in _kernels:
        _kernels[name] = _module(name).KERNELS
    return _kernels[name]


def forced_backend() -> str | None:
    """The backend ``TRELLIS_BACKEND`` names, if any."""
    return os.environ.get("TRELLIS_BACKEND") or None


def fits_head_dim(name: str, head_dim: int) -> bool:
    """Whether backend ``name`` takes attention heads of ``head_dim`` (Triton's kernels: powers of two
    from 16 to 256; the others any)."""
    return name != "triton" or _module(name).fits_head_dim(head_dim)


_defaults: dict[tuple[str | None, str], str] = {}  # (TRELLIS_BACKEND, device type) -> backend


def default_backend(device: torch.device) -> str:
    """The fastest backend that works on ``device``: ``TRELLIS_BACKEND`` if set, else by device type.
    Resolved once per device type (this sits on the per-layer path)."""
    key = (forced_backend(), device.type)
    if key not in _defaults:
        forced, _ = key
        if forced:
            check_backend(forced, device)
        _defaults[key] = forced or next(
            (name for name, (_, kind) in _COMPILED.items() if kind == device.type and load_backend(name)),
            "reference",
        )
    return _defaults[key]


def check_backend(name: str, device: torch.device) -> None:
    """Raise unless backend ``name`` can run on ``device`` here (loading it if needed)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "reference":
        return
    if not _module(name).runs_on(device):
        raise ValueError(f"the {name} backend runs on {_COMPILED[name][1]} tensors, not {device.type}")
    if not load_backend(name):
        raise RuntimeError(f"the {name} backend could not be loaded on this machine")


_usable: set[tuple[str, str]] = set()  # (backend, device type) pairs that passed check_backend


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend to run on ``device``: ``backend`` once checked usable there, else the default."""
    if backend is None:
        return default_backend(device)
    if (backend, device.type) not in _usable:  # checked once per pair: this sits on the per-layer path
        check_backend(backend, device)
        _usable.add((backend, device.type))
    return backend


def _forward_on_cpu(name: str) -> Callable[..., object]:
    def kernel(*args: object) -> object:
        return (getattr(kernels("cpp"), name) if load_backend("cpp") else REFERENCES[name])(*args)

    return kernel


_cpu_dispatch = torch.library.Library("trellis", "IMPL")
for _name in SCHEMAS:
    _cpu_dispatch.impl(_name, _forward_on_cpu(_name), "CPU")
