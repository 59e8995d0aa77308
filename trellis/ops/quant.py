"""GGUF block-quantized weights and ``y = x @ W^T`` over them: the formats, the checks, and the
pure-PyTorch dequantization, which is the specification, the test oracle and the path of devices
without a kernel (it matches ``gguf.quants.dequantize`` bit for bit).

A weight of ``out_features x in_features`` lies as ggml stores it: each row is ``in_features / 32``
blocks of 32 consecutive weights, rows one after another, as a uint8 tensor
``[out_features, in_features / 32 * block_bytes]``. Per block (little-endian)::

    Q8_0  fp16 d, int8 q[32]            w_i = d * q_i          34 bytes (1.06 per weight)
    Q4_0  fp16 d, nibbles[16]           w_i = d * (n_i - 8)    18 bytes (0.56 per weight)
    Q4_1  fp16 d, fp16 m, nibbles[16]   w_i = d * n_i + m      20 bytes (0.63 per weight)
    BF16  bf16 w[32]                    w_i                    64 bytes (2 per weight)
    F32   fp32 w[32]                    w_i                    128 bytes (4 per weight)

where ``n_i`` is the low nibble of byte ``i`` for ``i < 16`` and the high nibble of byte
``i - 16`` otherwise. BF16 is a plain row-major bf16 weight, GGUF's unblocked BF16 type (F32 the
same in fp32): the kernels stream it at one or a few rows, where oneDNN's bf16 matmul reads it
slower. It is passed as it is, ``[out_features, in_features]`` in its dtype, or seen as bytes
(``weight.view(torch.uint8)``). Activations are fp32 or bf16, and the product is computed in fp32.

With ``quantize_x=True`` (block-quantized weights only), ``x`` is first rounded to 8-bit blocks
as llama.cpp's CPU matmuls round it (``round_to_q8``): each block of 32 values becomes
``q_i * d`` with ``d = max|x| / 127`` and ``q_i`` an integer in [-127, 127]. The product is then
that of the rounded ``x``, which the CPU kernels compute with integer dot products per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trellis.ops.checks import require

BLOCK = 32  # weights per block, in every format
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "BF16": 64, "F32": 128}
QTYPES = tuple(BLOCK_BYTES)
QUANTIZED_QTYPES = ("Q8_0", "Q4_0", "Q4_1")  # the block-quantized ones, which keep_quantized keeps
PLAIN_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32}  # the plain weights these qtypes also take
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


def row_bytes(in_features: int, qtype: str) -> int:
    """Bytes of one weight row of ``in_features`` weights in ``qtype``."""
    return in_features // BLOCK * BLOCK_BYTES[qtype]


def check_weight(weight: torch.Tensor, qtype: str, in_features: int) -> None:
    """Raise (``ValueError``, ``TypeError``) unless ``weight`` holds rows of ``in_features`` ``qtype`` weights."""
    require(qtype in BLOCK_BYTES, f"unsupported qtype {qtype!r}; choose one of {', '.join(QTYPES)}")
    plain = PLAIN_DTYPES.get(qtype)
    if weight.dtype not in (torch.uint8, plain):
        raise TypeError(f"quant_linear: weight must be uint8 blocks{'' if plain is None else ' or the plain weight'} "
                        f"({qtype}), got {weight.dtype}")
    require(weight.dim() == 2, "quant_linear: weight must be [out_features, blocks * bytes per block], got ",
            tuple(weight.shape))
    require(in_features % BLOCK == 0, f"quant_linear: in_features (x.shape[-1] = {in_features}) must be a multiple "
            f"of {BLOCK}")
    num_bytes = weight.shape[1] * weight.element_size()
    require(num_bytes == row_bytes(in_features, qtype), f"quant_linear: weight rows of {num_bytes} bytes "
            f"do not hold {in_features} {qtype} weights ({row_bytes(in_features, qtype)} bytes)")


def check_quant_linear(x: torch.Tensor, weight: torch.Tensor, qtype: str, quantize_x: bool = False) -> None:
    """The arguments of ``quant_linear``, with the C++ kernel's errors (it checks its own)."""
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"quant_linear: x must be float32 or bfloat16, got {x.dtype}")
    require(x.dim() >= 1, "quant_linear: x must have at least one dimension")
    check_weight(weight, qtype, x.shape[-1])
    require(x.device == weight.device, f"quant_linear: x is on {x.device} but weight on {weight.device}")
    require(not quantize_x or qtype in QUANTIZED_QTYPES, f"quant_linear: quantize_x rounds x for block-quantized "
            f"weights ({', '.join(QUANTIZED_QTYPES)}), not {qtype}")


def dequantize(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """The fp32 weight ``[out_features, in_features]`` that the blocks ``weight`` hold."""
    out_features, num_bytes = weight.shape
    if qtype in PLAIN_DTYPES:
        return weight.view(PLAIN_DTYPES[qtype]).float()  # (a no-op view of a plain weight)
    size = BLOCK_BYTES[qtype]
    shape = (out_features, num_bytes // size * BLOCK)  # (not reshape(N, -1): N may be 0)
    blocks = weight.reshape(out_features, num_bytes // size, size)  # [N, K/32, bytes]
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [N, K/32, 1]
    if qtype == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()  # [N, K/32, 32]
        return (d * q).reshape(shape)
    packed = blocks[..., size - BLOCK // 2:]  # [N, K/32, 16]
    nibbles = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # [N, K/32, 32]: low halves, then high
    if qtype == "Q4_0":
        return (d * (nibbles - 8)).reshape(shape)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()  # [N, K/32, 1]
    return (d * nibbles + m).reshape(shape)


def round_to_q8(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` (``K`` a multiple of 32) in fp32, each block of 32 values rounded to 8 bits:
    ``q_i * d`` where ``d = amax / 127`` and ``q_i = round(x_i * (127 / amax))`` (half to even;
    ``amax = max |x_i|``, a block of zeros stays zero). The C++ kernels round with these very fp32
    operations, so both see the same integers and scales."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127.0)).reshape(x.shape)


def quant_linear(x: torch.Tensor, weight: torch.Tensor, qtype: str, quantize_x: bool = False) -> torch.Tensor:
    """``x [..., K] @ dequantize(weight)^T -> [..., N]`` in fp32, returned in ``x``'s dtype; with
    ``quantize_x``, of ``round_to_q8(x)``."""
    xf = round_to_q8(x) if quantize_x else x.float()
    return F.linear(xf, dequantize(weight, qtype)).to(x.dtype)


def quant_linear_group(x: torch.Tensor, weights: list[torch.Tensor], qtype: str,
                       quantize_x: bool = False) -> list[torch.Tensor]:
    """``quant_linear(x, weight, qtype, quantize_x)`` for each of ``weights``."""
    return [quant_linear(x, weight, qtype, quantize_x) for weight in weights]
