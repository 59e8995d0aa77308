"""Where a model runs and what it is: device and dtype choice, and the Llama check."""

from __future__ import annotations

import functools
import inspect
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig

from trellis.models.gguf_quantized import HUB_ARGS, gguf_path
from trellis.runner.cpu_linear import cpu_vendor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU features (torch.cpu.get_capabilities' names) that compute bf16 dot products natively: x86's
# AVX512_BF16 and AMX-BF16, ARM's FEAT_BF16 (BFDOT/BFMMLA). Without them bf16 is converted to fp32
# in every multiply, and slower than fp32 itself.
NATIVE_BF16 = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512_BF16", "bf16": "ARM BF16", "sve_bf16": "SVE BF16"}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU; a device this machine lacks is refused, as is
    ``"meta"`` (tensors without data: nothing could run)."""
    device = device_named(device)
    if device.type == "meta":
        raise ValueError("device 'meta' holds no weights or K/V to compute with: give a device that computes "
                         "('cpu', 'cuda', 'mps' or 'auto')")
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available is not None and not available():
        raise ValueError(f"device {str(device)!r} is not available here (this PyTorch build or machine has no "
                         f"{device.type.upper()} device); use device='auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} is not available here: this machine has {torch.cuda.device_count()} "
                         "CUDA devices (cuda:0 on)")
    return device


def device_named(device: str | torch.device) -> torch.device:
    """The device ``device`` names, this machine's best for ``"auto"`` (CUDA, then MPS, then CPU)."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_one_device(device_map: Mapping[str, object]) -> None:
    """Refuse a ``device_map`` (module name -> device) that spreads the model over several devices
    or offloads it to disk: the KV pool lives on the model's one device, where every layer must
    run (a layer elsewhere would fail later, at its first forward)."""
    modules_on: dict[str, list[str]] = {}
    for module, device in device_map.items():
        modules_on.setdefault(_placement_name(device), []).append(module or "the whole model")
    if len(modules_on) > 1 or "disk" in modules_on:
        where = "; ".join(f"{device}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                          for device, names in modules_on.items())
        raise ValueError(f"device_map places the model on {' and '.join(modules_on)} ({where}); Trellis keeps the KV "
                         "cache on one device and needs every layer there: give one device (device_map='cuda:0', "
                         "or device=)")


def _placement_name(device: object) -> str:
    """One name per place a ``device_map`` can give: accelerate reads a bare index as that GPU
    (``0`` and ``"cuda:0"`` are one device), and ``"disk"`` as offloading."""
    if isinstance(device, int):
        return f"cuda:{device}"
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError):  # "disk", or a name torch does not know
        return str(device)


@dataclass(frozen=True)
class DtypeChoice:
    """A dtype to load a model in (``"auto"``: transformers' choice, the checkpoint's), and why."""

    dtype: torch.dtype | str
    reason: str


def native_bf16_units() -> list[str]:
    """The names of this CPU's native bf16 dot-product units (``NATIVE_BF16``), e.g. ``["AVX512_BF16"]``."""
    capabilities = torch.cpu.get_capabilities()
    return [name for key, name in NATIVE_BF16.items() if capabilities.get(key)]


def preferred_dtype(device: str | torch.device) -> DtypeChoice:
    """The dtype that runs fastest on ``device`` without changing what the model computes more
    than rounding: bf16 on a CPU with native bf16 dot products, fp32 on other CPUs; elsewhere
    (CUDA, MPS) transformers' own ``"auto"``, the checkpoint's dtype. ``TrellisLlama.from_pretrained``
    keeps transformers' meaning of ``dtype``; pass it ``preferred_dtype(device).dtype`` to opt in."""
    device = device_named(device)
    if device.type != "cpu":
        return DtypeChoice("auto", f"on {device.type}, the checkpoint's dtype (transformers' dtype='auto')")
    native = native_bf16_units()
    if native:
        return DtypeChoice(torch.bfloat16, f"this CPU computes bf16 dot products natively ({', '.join(native)})")
    return DtypeChoice(torch.float32, "this CPU has no native bf16 dot products (AVX512_BF16, AMX-BF16 or ARM BF16), "
                                      "so bf16 would be slower than fp32")


def hardware_identity(device: torch.device) -> str:
    """``device`` as far as it decides how a model's results round under the same kernels: on the
    CPU the architecture, PyTorch's SIMD level (Trellis' kernels are built for it too), the native
    bf16 dot-product units (oneDNN's bf16 matmuls and Trellis' bf16 attention scores run on them)
    and the vendor (the fp32 matmul policy follows it); a CUDA device's name; else its type (MPS).
    K/V computed where these differ differ in the last bits, so a prefix-cache file records it."""
    if device.type == "cpu":
        parts = [platform.machine(), torch.backends.cpu.get_cpu_capability(), *native_bf16_units(),
                 cpu_vendor() or "unknown vendor"]
        return "cpu: " + " ".join(parts)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def choose_dtype(name: str, device: str | torch.device) -> DtypeChoice:
    """``name``: ``"auto"`` (``preferred_dtype``) or one of ``DTYPES``; anything else is refused."""
    if name == "auto":
        return preferred_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose 'auto' or one of {', '.join(DTYPES)}")
    return DtypeChoice(DTYPES[name], "asked for")


def load_llama_config(name_or_path: str | os.PathLike, kwargs: dict) -> LlamaConfig:
    """The checkpoint's config, refusing a missing GGUF file or a model that is not a Llama.

    As ``from_pretrained`` does, a keyword argument that names a config field and no loading
    argument (``rms_norm_eps=``, ``tie_word_embeddings=``) overrides the file's value; those are
    removed from ``kwargs``."""
    gguf_file = kwargs.get("gguf_file")
    if gguf_file is not None and os.path.isdir(name_or_path):
        gguf_path(name_or_path, gguf_file, kwargs)  # raises if the directory does not hold it
    hub_args = {k: kwargs[k] for k in ("gguf_file", *HUB_ARGS) if k in kwargs}
    candidates = {k: v for k, v in kwargs.items() if k not in loading_arguments()}
    try:
        config, unused = AutoConfig.from_pretrained(name_or_path, return_unused_kwargs=True, **hub_args, **candidates)
    except OSError:
        raise
    except Exception as exc:  # the GGUF reader fails with assorted errors on a damaged file, none naming it
        if gguf_file is None:
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"cannot read the model config of {name_or_path} (config.json): {exc}") from exc
        where = Path(name_or_path) / gguf_file if os.path.isdir(name_or_path) else f"{gguf_file} of {name_or_path}"
        raise ValueError(f"cannot read the GGUF file {where} (truncated, damaged or not a GGUF file): {exc}") from exc
    if config.model_type != "llama":
        raise ValueError(
            f"{name_or_path} holds a {config.model_type!r} model; TrellisLlama serves Llama-architecture models only"
        )
    for name in candidates.keys() - unused.keys():
        del kwargs[name]
    return config


def check_full_attention(config: LlamaConfig) -> None:
    """Refuse a config whose layers transformers' ``generate()`` would serve with a window: its
    cache (``DynamicCache(config=...)``) then keeps only the last ``sliding_window`` (or
    ``attention_chunk_size``) tokens' K/V, while its forward without a cache, like Trellis, attends
    to every token. Llama checkpoints set neither; the two answers would differ past the window."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        others = sorted(set(layer_types) - {"full_attention"})
        if others:
            raise ValueError(f"the config's layer_types include {', '.join(others)}: Trellis serves Llama layers of "
                             "full causal attention only")
        return
    for name in ("sliding_window", "attention_chunk_size"):
        window = getattr(config, name, None)
        if window is not None:
            raise ValueError(f"the config sets {name}={window}: transformers' generate() then attends to the last "
                             f"{window} tokens only (its forward without a cache to all of them); Trellis attends to "
                             f"every token and cannot give generate()'s answer. Set {name} to None to serve it.")


@functools.cache
def loading_arguments() -> frozenset[str]:
    """The keyword arguments ``PreTrainedModel.from_pretrained`` takes for itself (transformers
    5.23-5.24): the others that name a config field are config overrides."""
    from transformers import PreTrainedModel

    named = inspect.signature(PreTrainedModel.from_pretrained).parameters
    return frozenset(named) | {
        "state_dict", "proxies", "tqdm_class", "output_loading_info", "_from_pipeline", "_from_auto", "dtype",
        "torch_dtype", "device_map", "max_memory", "offload_folder", "offload_buffers", "quantization_config",
        "subfolder", "_commit_hash", "variant", "adapter_kwargs", "adapter_name", "generation_config", "gguf_file",
        "distributed_config", "device_mesh", "tp_plan", "tp_size", "trust_remote_code", "allow_all_kernels",
        "use_kernels", "kernel_config", "key_mapping", "attn_implementation", "experts_implementation",
    }
