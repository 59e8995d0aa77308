"""Which library runs the linear layers of CPU inference: the BLAS, or oneDNN.

PyTorch's x86 wheels hand ``F.linear`` in fp32 to MKL, which on this project's reference machine
(an AMD EPYC with AVX-512, 2 cores) streams a decode step's weights at ~12 GB/s and runs small
batches (2–64 rows) slower per row than one. oneDNN's JIT kernels are faster at every batch size
that matters to serving:

    kind       weights                                        SmolLM2, 2 threads (see README)
    "blas"     the parameter, through F.linear                transformers' own path
    "onednn"   the parameter, stored input-major, via oneDNN  the default where oneDNN runs (x86)
    "packed"   a second copy in oneDNN's blocked layout       a little faster again; +1 copy

"Input-major": the ``[out, in]`` parameter keeps its shape and values but its storage is the
transpose's, ``[in, out]`` row-major (strides ``(1, out)``). That is the layout oneDNN's matmul
reads directly; a row-major ``[out, in]`` weight it re-blocks into a scratch buffer on every call
of more than one row, which makes 4- to 64-row matmuls (a decode step of several sessions, a
chat turn's extend) ~10 % slower on SmolLM2. (On an AVX2-only EPYC the layout helps decode too,
but 512-row matmuls run 10-20 % slower over it: see the README.) No memory is added: the storage
is replaced, one layer at a time. A weight that is shared with another module (a tied LM head
and embedding) keeps its layout, so that embedding lookups stay row reads.

Logits move by fp32 reassociation only (at most ~1.3e-4 on SmolLM2, whose logits reach ~39; greedy tokens agree).
An ``OneDNNLinear`` is an ``nn.Linear`` in every other respect: the same parameters and state
dict, and plain ``F.linear`` for training (gradients), other devices and other dtypes. A packed
copy is made on first use and again whenever the weight is replaced (another storage, held
weakly: a new one at the old address is not mistaken for it) or changed in place (its version
counter); a replaced weight stays correct in any layout (``set_linear_kernel`` again restores
the fast one). Writes that bypass the version counter (``weight.data.copy_(w)``) are not seen:
``drop_packed`` (which ``model.prefix_cache.reset()`` calls) makes every copy afresh.
"""

from __future__ import annotations

import platform
import weakref
from collections import Counter

import torch
import torch.nn.functional as F

LINEAR_KERNELS = ("blas", "onednn", "packed")


def onednn_available() -> bool:
    """oneDNN's linear ops are in this PyTorch build and JIT-compile for this CPU (x86-64)."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def default_linear_kernel() -> str:
    return "onednn" if onednn_available() else "blas"


class OneDNNLinear(torch.nn.Linear):
    prepack = False  # the "packed" kind; set per instance by set_linear_kernel
    # (weight storage (weakly), data_ptr and version, packed weight); never in state dicts, copies or pickles
    _packed: tuple[weakref.ref, int, int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        # Under torch.compile, F.linear: the compiler picks its own GEMMs (Inductor cannot lower
        # the oneDNN op over an input-major weight).
        if (x.device.type != "cpu" or weight.device.type != "cpu" or weight.dtype != torch.float32
                or x.dtype != torch.float32 or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
                or torch.compiler.is_compiling()):
            return F.linear(x, weight, self.bias)
        if self.prepack:
            weight = self._packed_weight()
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")

    def _packed_weight(self) -> torch.Tensor:
        weight = self.weight
        storage, key = weight.untyped_storage(), (weight.data_ptr(), weight._version)
        packed = self._packed
        if packed is None or packed[0]() is not storage or packed[1:3] != key:
            # The batch-size hint only tunes the blocking; 64 serves decode and prefill alike.
            packed = (weakref.ref(storage), *key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64))
            self._packed = packed
        return packed[3]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_packed", None)  # oneDNN's opaque tensors cannot be copied; repacked on use
        return state


def set_linear_kernel(model: torch.nn.Module, kind: str) -> int:
    """Run every plain ``nn.Linear`` of ``model`` on ``kind`` (one of ``LINEAR_KERNELS``) and give
    its CPU fp32 weight the layout that kind reads fastest; returns how many layers changed kind.
    Idempotent: calling it again after weights were loaded or replaced only fixes their layout.
    Subclasses of ``nn.Linear`` (adapter layers, quantized layers) are left alone: their forward is
    not plain ``F.linear``. An adapter's base layer, a plain ``nn.Linear``, is included."""
    if kind not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel {kind!r}; choose one of {LINEAR_KERNELS}")
    if kind != "blas" and not onednn_available():
        raise RuntimeError(f"the {kind!r} linear kernel needs oneDNN on an x86-64 CPU (torch.backends.mkldnn), "
                           f"which this machine or PyTorch build lacks; use 'blas'")
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    changed = 0
    for module in model.modules():
        current = linear_kernel_of(module)
        if current is None:
            continue
        if current != kind:
            module.__dict__.pop("_packed", None)  # frees a packed copy
            module.__dict__.pop("prepack", None)
            module.__class__ = torch.nn.Linear if kind == "blas" else OneDNNLinear
            if kind == "packed":
                module.prepack = True
            changed += 1
        if uses[id(module.weight)] == 1:
            _set_layout(module.weight, input_major=kind == "onednn")
    return changed


def drop_packed(model: torch.nn.Module) -> None:
    """Free every packed copy in ``model``; each is made again, from the weight as it is, on first use."""
    for module in model.modules():
        if type(module) is OneDNNLinear:
            module.__dict__.pop("_packed", None)


def _set_layout(weight: torch.nn.Parameter, input_major: bool) -> None:
    """Store a CPU fp32 ``[out, in]`` weight input-major (``[in, out]`` row-major) or row-major."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return
    if input_major and not weight.t().is_contiguous():
        weight.data = weight.data.t().contiguous().t()
    elif not input_major and not weight.is_contiguous():
        weight.data = weight.data.contiguous()


def linear_kernel_of(module: torch.nn.Module) -> str | None:
    """The kind a linear layer runs on; None for anything but a plain ``nn.Linear`` or ``OneDNNLinear``."""
    if type(module) is torch.nn.Linear:
        return "blas"
    if type(module) is OneDNNLinear:
        return "packed" if module.prepack else "onednn"
    return None
