"""A Llama GGUF's Q8_0 / Q4_0 / Q4_1 linear weights kept quantized (``from_pretrained(...,
keep_quantized=True)``).

transformers loads a GGUF by dequantizing every tensor to floats. Afterwards, each linear layer
whose GGUF tensor is in one of those formats is replaced by a ``QuantizedLinear`` holding the
file's blocks, so that it reads 0.56-1.06 bytes per weight instead of 4: the attention and MLP
projections (``attn_q/k/v/output``, ``ffn_gate/up/down``) and the LM head (``output``, or, for
tied embeddings, ``token_embd``, as llama.cpp does). The token embeddings stay as transformers
loaded them (lookups read one row), as do the norms and any tensor in another format (F32, F16,
the K-quants: those are dequantized).

llama.cpp stores ``attn_q`` and ``attn_k`` with the rows of each head permuted for its RoPE;
transformers un-permutes them where the file states both head counts, and so is done here, on
whole rows of blocks (blocks run along the input dimension, so a row permutation moves blocks,
never splits one). Each kept layer is checked to hold exactly the weight transformers loaded, so
a file read otherwise is refused rather than answered differently.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from trellis.ops.quant import ACTIVATION_DTYPES, QUANTIZED_QTYPES
from trellis.runner.quantized_linear import QuantizedLinear

# GGUF tensor name within block i -> the linear layer under model.model.layers[i]
LAYER_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}


HUB_ARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder")  # where from_pretrained finds a file


def gguf_path(name_or_path: str | os.PathLike, gguf_file: str, kwargs: dict) -> Path:
    """The local GGUF file: in ``name_or_path`` if it is a directory, else fetched from the Hub
    (transformers' cache, with the hub arguments of ``kwargs``)."""
    if os.path.isdir(name_or_path):
        path = Path(name_or_path) / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path
    from transformers.utils import cached_file

    return Path(cached_file(str(name_or_path), gguf_file, **{k: kwargs[k] for k in HUB_ARGS if k in kwargs}))


def unpermute_rows(blocks: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE permutation of a q/k weight's rows (transformers'
    ``_reverse_permute_weights``): within each head, rows [0, 2, 4, ..., 1, 3, 5, ...] back in order."""
    rows = blocks.shape[0]
    half = rows // num_heads // 2
    return blocks.reshape(num_heads, half, 2, -1).transpose(1, 2).reshape(rows, -1)


def stated_head_counts(reader) -> tuple[int, int] | None:
    """The attention and K/V head counts the GGUF's metadata states, or None if it lacks either:
    transformers then leaves ``attn_q`` / ``attn_k`` as stored (``LlamaTensorProcessor``), even
    where its config fills the K/V count in."""
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    counts = []
    for key in ("head_count", "head_count_kv"):
        field = reader.fields.get(f"{architecture}.attention.{key}")
        if field is None:
            return None
        counts.append(int(field.parts[field.data[0]][0]))
    return counts[0], counts[1]


def check_activation_dtype(dtype: torch.dtype) -> None:
    """Refuse a model dtype that layers kept quantized cannot run on (their kernels take fp32 or
    bf16 activations): at load, and before ``model.to(dtype)`` converts anything."""
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"keep_quantized=True runs its layers on float32 or bfloat16 activations, not "
                         f"{str(dtype).removeprefix('torch.')}: use dtype torch.float32 or torch.bfloat16")


def keep_gguf_quantized(model: torch.nn.Module, path: str | os.PathLike, q8_activations: bool = False) -> Counter:
    """Replace ``model``'s linear layers whose weights ``path`` holds as Q8_0, Q4_0 or Q4_1 by
    ``QuantizedLinear`` layers over those blocks (rounding their inputs to 8-bit blocks with
    ``q8_activations``); returns how many layers of each format."""
    from gguf import GGUFReader

    check_activation_dtype(model.dtype)  # what the kernels take: refused now, not at the first forward
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    kept: Counter = Counter()

    def replace(parent: torch.nn.Module, attribute: str, name: str, num_heads: int | None = None) -> None:
        tensor = tensors.get(name)
        if tensor is None or tensor.tensor_type.name not in QUANTIZED_QTYPES:
            return
        linear = getattr(parent, attribute)
        blocks = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))  # a copy, out of the memory map
        if num_heads is not None:
            blocks = unpermute_rows(blocks, num_heads)
        if blocks.shape[0] != linear.out_features:
            raise ValueError(f"{path}: {name} has {blocks.shape[0]} rows; the model's layer has {linear.out_features}")
        layer = QuantizedLinear.from_linear(linear, tensor.tensor_type.name, blocks, q8_activations)
        if not torch.equal(layer.dequantized_weight().to(linear.weight.dtype), linear.weight):
            raise ValueError(f"{path}: {name} ({tensor.tensor_type.name}) does not hold the weight transformers loaded "
                             f"for it, so it cannot be kept quantized; load without keep_quantized=True")
        setattr(parent, attribute, layer)
        kept[tensor.tensor_type.name] += 1

    counts = stated_head_counts(reader)
    heads = {} if counts is None else {"attn_q": counts[0], "attn_k": counts[1]}
    for i, layer in enumerate(model.model.layers):
        for gguf_name, module_path in LAYER_LINEARS.items():
            parent_path, attribute = module_path.split(".")
            replace(getattr(layer, parent_path), attribute, f"blk.{i}.{gguf_name}.weight", heads.get(gguf_name))
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if head == "output.weight" or model.config.tie_word_embeddings:
        replace(model, "lm_head", head)
    return kept


def quantized_gguf(name_or_path: str | os.PathLike | None, kwargs: dict) -> Path:
    """The GGUF whose blocks ``keep_quantized`` keeps: ``gguf_file``'s, or with no path the
    embedded model's (whose other weights load from their one-time conversion)."""
    if kwargs.get("gguf_file") is not None and name_or_path is not None:
        return gguf_path(name_or_path, kwargs["gguf_file"], kwargs)
    if name_or_path is None and kwargs.get("state_dict") is None and kwargs.get("gguf_file") is None:
        from trellis.models.embedded import embedded_gguf_path

        return embedded_gguf_path()
    raise ValueError("keep_quantized=True keeps the quantized weights of a GGUF file: pass a path and gguf_file=, "
                     "or no path for the embedded model")
