"""``QuantizedLinear``: a linear layer whose weight stays in a GGUF block format (Q8_0, Q4_0, Q4_1).

The weight is the file's bytes, unchanged: a uint8 buffer ``weight_blocks`` of shape
``[out_features, in_features / 32 * block_bytes]`` (``trellis.ops.quant`` has the layout), 3.8x
(Q8_0) to 7.1x (Q4_0) smaller than fp32. The forward runs ``trellis.ops.quant_linear``: the C++
kernel on CPU, which dequantizes in registers and multiplies in fp32 (fp32 or bf16 activations);
the reference (dequantize, then ``F.linear``) on other devices. With ``q8_activations`` it first
rounds its input to 8-bit blocks as llama.cpp's CPU matmuls do (``quant.round_to_q8``), which the
CPU kernel then multiplies as integers: faster on CPUs without AVX-512, and llama.cpp's numerics
rather than transformers'. A buffer, not a parameter: the
weights are not trained, ``model.to(dtype)`` leaves them as they are, and the prefix cache's
watcher and fingerprint see them as they see every buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trellis import ops
from trellis.ops import quant


class QuantizedLinear(torch.nn.Module):
    """``y = x @ W^T (+ bias)`` with ``W`` held as GGUF blocks of ``qtype``."""

    def __init__(self, in_features: int, out_features: int, qtype: str, weight_blocks: torch.Tensor,
                 bias: torch.Tensor | None = None, q8_activations: bool = False) -> None:
        super().__init__()
        if not isinstance(q8_activations, bool):
            raise TypeError(f"q8_activations must be True or False, got {q8_activations!r}")
        quant.check_weight(weight_blocks, qtype, in_features)
        if weight_blocks.shape[0] != out_features:
            raise ValueError(f"weight_blocks holds {weight_blocks.shape[0]} rows, not out_features={out_features}")
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.q8_activations = q8_activations  # (a setting the prefix cache watches: it changes every K/V)
        self.register_buffer("weight_blocks", weight_blocks.contiguous())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, qtype: str, weight_blocks: torch.Tensor,
                    q8_activations: bool = False) -> QuantizedLinear:
        """Stands in for ``linear``, whose weight ``weight_blocks`` holds, keeping its bias."""
        blocks = weight_blocks.to(linear.weight.device)
        return cls(linear.in_features, linear.out_features, qtype, blocks, linear.bias, q8_activations)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight ``[out_features, in_features]`` (a new tensor: 4 bytes per weight)."""
        return quant.dequantize(self.weight_blocks, self.qtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            # Gradients flow to the input (adapters, embeddings), never to the frozen blocks; through
            # the rounding to 8 bits as if it were not there (its values, x's gradient).
            if self.q8_activations:
                x = x + (quant.round_to_q8(x).to(x.dtype) - x).detach()
            y = F.linear(x, self.dequantized_weight().to(x.dtype))
        else:
            y = ops.quant_linear(x, self.weight_blocks, self.qtype, self.q8_activations)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, " \
               f"bias={self.bias is not None}" + (", q8_activations=True" if self.q8_activations else "")
