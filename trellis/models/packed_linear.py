"""Linear layers over oneDNN's prepacked weights: faster CPU matmuls for inference (opt-in).

A plain ``nn.Linear`` hands its ``[out, in]`` weight to the BLAS, which re-packs it into the
layout its micro-kernel wants on every call. ``PackedLinear`` keeps one copy already in oneDNN's
blocked layout: on SmolLM2 this makes a decode step 1.3–1.5× and a prefill ~1.2× faster on a
2-core CPU. The price is a second copy of every linear weight in memory, and logits that differ
from the BLAS's by fp32 reassociation (~6e-5 relative), which is why it is opt-in
(``TrellisLlama.from_pretrained(..., pack_weights=True)``).

The module stays an ``nn.Linear`` in every other respect: same parameters and state dict, plain
``F.linear`` for training (gradients), other devices and dtypes. The packed copy is made on first
use and again whenever the weight is replaced or changed in place (its version counter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(torch.nn.Linear):
    # (weight data_ptr, weight version, packed weight); never in the state dict, copies or pickles
    _packed: tuple[int, int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.device.type != "cpu" or weight.dtype != torch.float32 or x.dtype != torch.float32
                or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
            return F.linear(x, weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")

    def _packed_weight(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[:2] != key:
            # The batch-size hint only tunes the blocking; 64 serves decode and prefill alike.
            self._packed = (*key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 64))
        return self._packed[2]

    def unpack(self) -> None:
        """Back to a plain ``nn.Linear``, freeing the packed copy."""
        self.__dict__.pop("_packed", None)
        self.__class__ = torch.nn.Linear

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_packed", None)  # oneDNN's opaque tensors cannot be copied; repacked on use
        return state


def pack_linears(model: torch.nn.Module, enabled: bool) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a ``PackedLinear`` (or back); returns how many.
    Subclasses of ``nn.Linear`` (adapter layers, quantized layers) are left alone: their forward
    is not plain ``F.linear``. An adapter's base layer, a plain ``nn.Linear``, is packed."""
    if enabled and not packing_available():
        raise RuntimeError("pack_weights needs PyTorch built with oneDNN (torch.backends.mkldnn), "
                           "which this build lacks")
    count = 0
    for module in model.modules():
        if enabled and type(module) is torch.nn.Linear:
            module.__class__ = PackedLinear
            count += 1
        elif not enabled and type(module) is PackedLinear:
            module.unpack()
            count += 1
    return count
