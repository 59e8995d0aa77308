"""Where a model runs and what it is: device choice and the Llama check."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, LlamaConfig


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_llama_config(name_or_path: str | os.PathLike, kwargs: dict) -> LlamaConfig:
    """The checkpoint's config, refusing a missing GGUF file or a model that is not a Llama."""
    gguf_file = kwargs.get("gguf_file")
    if gguf_file is not None and os.path.isdir(name_or_path):
        gguf_path = os.path.join(name_or_path, gguf_file)
        if not os.path.isfile(gguf_path):
            raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    hub_args = {k: kwargs[k] for k in ("gguf_file", "revision", "token", "cache_dir", "local_files_only", "subfolder")
                if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **hub_args)
    except (OSError, ValueError):
        raise
    except Exception as exc:  # the GGUF reader fails with assorted errors on a damaged file
        raise ValueError(f"cannot read the model config of {name_or_path} ({gguf_file or 'config.json'}): {exc}") from exc
    if config.model_type != "llama":
        raise ValueError(
            f"{name_or_path} holds a {config.model_type!r} model; TrellisLlama serves Llama-architecture models only"
        )
    return config
