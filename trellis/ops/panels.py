"""Weights packed in panels of 16 output features, for the CPU's vector units, and
``y = x @ W^T + bias`` over them: the layout, the checks and the pure-PyTorch computation, which is
the specification and the test oracle.

A weight ``W [N, K]`` lies as ``ceil(N / 16)`` panels of 16 output features, each holding its
features' inputs in steps of ``t`` (``t = 2`` in bf16: pairs, ``K`` even; ``t = 1`` in fp32), as a
``[ceil(N / 16), K / t, 16, t]`` tensor of the weight's dtype::

    panels[p, j, c, i] = W[16 p + c, t j + i]        (zero for 16 p + c >= N)

so that one 64-byte row ``panels[p, j]`` is the operand that multiplies a step of ``x`` by 16
features at once: a bf16 pair in AVX512_BF16's ``vdpbf16ps``, an fp32 input in a fused
multiply-add. The product is computed in fp32 (each bf16 product is exact in fp32), the bias added,
and the result rounded to x's dtype once, as oneDNN's bf16 matmul does. The C++ kernel's bf16
dot-product units flush inputs, products and sums below fp32's normal range (~1.2e-38) to zero, as
oneDNN's bf16 matmul on those CPUs does; this reference does not, so the two differ there (and by
summation order elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trellis.ops.checks import require

PANEL = 16  # output features per panel
PANEL_DTYPES = (torch.bfloat16, torch.float32)


def inputs_per_lane(dtype: torch.dtype) -> int:
    """``t``: the inputs of x one 32-bit lane of a panel multiplies (a bf16 pair, one fp32 value)."""
    return 2 if dtype == torch.bfloat16 else 1


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """The panels of a bf16 or fp32 ``weight [N, K]`` (``K`` even in bf16): a new contiguous tensor, the same size."""
    if weight.dtype not in PANEL_DTYPES:
        raise TypeError(f"pack_panels: weight must be bfloat16 or float32, got {weight.dtype}")
    require(weight.dim() == 2, "pack_panels: weight must be [out_features, in_features], got ", tuple(weight.shape))
    out_features, in_features = weight.shape
    t = inputs_per_lane(weight.dtype)
    require(in_features % t == 0, f"pack_panels: in_features ({in_features}) must be even in bfloat16")
    padded = F.pad(weight, (0, 0, 0, -out_features % PANEL)) if out_features % PANEL else weight  # (no copy)
    panels = padded.view(-(-out_features // PANEL), PANEL, in_features // t, t).permute(0, 2, 1, 3)
    return panels.clone(memory_format=torch.contiguous_format)  # a copy even where the view is contiguous (K = t)


def unpack_panels(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """The weight ``[out_features, K]`` that ``panels`` hold."""
    num, steps, _, t = panels.shape
    return panels.permute(0, 2, 1, 3).reshape(num * PANEL, t * steps)[:out_features]


def check_panel_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> None:
    """The arguments of ``panel_linear``, with the C++ kernel's errors (it checks its own)."""
    if x.dtype not in PANEL_DTYPES:
        raise TypeError(f"panel_linear: x must be bfloat16 or float32, got {x.dtype}")
    dtype = str(x.dtype).removeprefix("torch.")
    for name, tensor in (("panels", panels), ("bias", bias)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(f"panel_linear: {name} must be {dtype} as x is, got {tensor.dtype}")
    require(x.dim() >= 1, "panel_linear: x must have at least one dimension")
    t = inputs_per_lane(x.dtype)
    require(panels.dim() == 4 and panels.shape[2:] == (PANEL, t),
            f"panel_linear: {dtype} panels must be [panels, in_features / {t}, 16, {t}], got ", tuple(panels.shape))
    require(panels.is_contiguous(), "panel_linear: panels must be contiguous")
    require(x.shape[-1] == t * panels.shape[1], f"panel_linear: x has {x.shape[-1]} input features but the panels "
            f"hold {t * panels.shape[1]}")
    require(out_features >= 0 and -(-out_features // PANEL) == panels.shape[0],
            f"panel_linear: {panels.shape[0]} panels do not hold {out_features} output features")
    if bias is not None:
        require(bias.dim() == 1 and bias.shape[0] == out_features,
                f"panel_linear: bias must be [{out_features}], got ", tuple(bias.shape))
    devices = {tensor.device for tensor in (x, panels, bias) if tensor is not None}
    require(len(devices) == 1, "panel_linear: x, panels and bias must be on one device, got ",
            ", ".join(sorted(map(str, devices))))


def check_panel_linear_group(x: torch.Tensor, panels: list[torch.Tensor], out_features: list[int]) -> None:
    """The arguments of ``panel_linear_group``: ``check_panel_linear`` for each weight, without a bias."""
    require(len(panels) == len(out_features), f"panel_linear_group: {len(panels)} panel tensors but "
            f"{len(out_features)} output widths")
    for weight_panels, width in zip(panels, out_features, strict=True):
        check_panel_linear(x, weight_panels, None, width)


def panel_linear_group(x: torch.Tensor, panels: list[torch.Tensor], out_features: list[int]) -> list[torch.Tensor]:
    """``panel_linear(x, p, None, n)`` for each of ``panels`` and ``out_features``."""
    return [panel_linear(x, weight_panels, None, width) for weight_panels, width in zip(panels, out_features, strict=True)]


def panel_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x [..., K] @ W^T + bias -> [..., out_features]`` for ``W = unpack_panels(panels, out_features)``,
    in fp32, rounded to x's dtype once."""
    weight = unpack_panels(panels, out_features).float()
    return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)
