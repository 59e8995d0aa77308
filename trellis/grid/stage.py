"""One stage's share of the model, and the loop that serves it on ranks 1..W-1.

A stage model is a ``TrellisLlama`` whose decoder holds only the stage's layers, each keeping its
index in the whole model (attention finds its K/V in the stage's pool by that index). Stage 0
keeps the embedding and the LM head, the last stage the final norm; elsewhere the norm is the
identity. From a safetensors checkpoint a stage reads only its own tensors; other formats (GGUF)
are loaded whole and cut down, so loading peaks at the whole model's size.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import GenerationConfig

from trellis.cache.block_pool import BlockPool
from trellis.grid.transport import PING, STOP, GridError, Link, StepPlan
from trellis.models.gguf_reading import gguf_parsed_once
from trellis.models.llama import TrellisLlama, check_weights_loaded
from trellis.models.loading import load_llama_config
from trellis.runner.batch import plan_batch
from trellis.runner.host_memory import give_back_freed_memory
from trellis.runner.runner import run_decoder

log = logging.getLogger("trellis.grid")

IDLE_TIMEOUT_S = 600.0  # a stage that hears nothing (not even the coordinator's pings) this long exits


def stage_state_dict(path: str, layers: range, first: bool, last: bool, load_kwargs: dict) -> dict[str, torch.Tensor]:
    """The checkpoint tensors a stage holds, named as in a model of ``len(layers)`` layers."""
    wanted = (lambda name: stage_name(name, layers, first, last))
    files = safetensors_files(path) if not load_kwargs.get("gguf_file") else None
    state: dict[str, torch.Tensor] = {}
    if files is not None:
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(safe_open(file, framework="pt")) for file in files]
            prefix = missing_base_prefix(name for f in handles for name in f.keys())  # noqa: SIM118 -- handles, not dicts
            for f in handles:
                for name in f.keys():  # noqa: SIM118 -- a safe_open handle, not a dict
                    if (local := wanted(prefix + name)) is not None:
                        state[local] = f.get_tensor(name)
        return state
    # GGUF and friends: whole, then cut. In transformers' layout ("blas": no packed copy), and
    # collected before the stage loads (the model and its runner refer to each other), so that
    # the stage holds its own tensors only.
    whole = TrellisLlama.from_pretrained(path, device="cpu", linear_kernel="blas", **load_kwargs)
    for name, tensor in whole.state_dict().items():
        if (local := wanted(name)) is not None:
            state[local] = tensor
    del whole
    gc.collect()
    give_back_freed_memory()  # the whole model's tensors below glibc's mmap threshold sit on its heap
    return state


def missing_base_prefix(names: Iterable[str]) -> str:
    """``"model."`` for a checkpoint whose tensor names lack the base model's prefix (saved from a
    ``LlamaModel``: ``layers.0...``), which transformers adds to each name as it loads; else ""."""
    return "" if any(name.startswith("model.") for name in names) else "model."


def stage_name(name: str, layers: range, first: bool, last: bool) -> str | None:
    """``name`` (a tensor of the whole model) as the stage model calls it, or None if not its own."""
    if name.startswith("model.layers."):
        index, _, rest = name.removeprefix("model.layers.").partition(".")
        return f"model.layers.{int(index) - layers.start}.{rest}" if int(index) in layers else None
    if name.startswith(("model.embed_tokens.", "lm_head.")):
        return name if first else None
    if name.startswith("model.norm."):
        return name if last else None
    return name  # buffers and anything else: every stage


def safetensors_files(path: str) -> list[Path] | None:
    """The safetensors files of a checkpoint directory, or None if it has none."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = root / "model.safetensors"
    return [single] if single.is_file() else None


SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def first_floating_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of a safetensors checkpoint's first floating-point tensor (fp32 if it has none),
    read from the headers: what transformers' ``dtype="auto"`` takes where the config names none."""
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 -- a safe_open handle, not a dict
                if (dtype := SAFETENSORS_FLOATS.get(f.get_slice(name).get_dtype())) is not None:
                    return dtype
    return torch.float32


def load_stage_model(path: str, layers: range, first: bool, last: bool, dtype: torch.dtype, device: torch.device,
                     linear_kernel: str | None = None, **load_kwargs) -> TrellisLlama:
    """The model of one stage: its layers (and the embedding and LM head on the first, the final
    norm on the last), loaded from ``path`` without the rest of the weights where the format allows."""
    with gguf_parsed_once():  # a GGUF's config and its whole model from one parse of the file
        config = load_llama_config(path, load_kwargs)
        state = stage_state_dict(path, layers, first, last, {"dtype": dtype, **load_kwargs})
    stage_config = copy.deepcopy(config)
    stage_config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        stage_config.layer_types = list(config.layer_types)[layers.start:layers.stop]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the other stages' tensors are missing on purpose
    try:
        model, info = TrellisLlama.from_pretrained(None, config=stage_config, state_dict=state, dtype=dtype,
                                                   device=device, linear_kernel=linear_kernel, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    del state
    # Tensors that reached the stage for layers it does not have: stage_name read the checkpoint's
    # layer names otherwise than transformers does, so the stage's own layers may hold others'
    # weights. (Extra tensors of its own layers load as in one process, with transformers' report.)
    stray = sorted(name for name in info.get("unexpected_keys") or ()
                   if (index := layer_index(name)) is not None and index >= len(layers))
    if stray:
        raise ValueError(f"{path}: tensors for layers outside the stage's {len(layers)} reached it as it loaded "
                         f"layers {layers.start}-{layers.stop - 1} (e.g. {stray[0]!r}): its tensor names are not "
                         "read as transformers reads them")
    # Refused as one process refuses it: a weight of the stage's own that the checkpoint lacks.
    whole_names = (whole_model_name(name, layers) for name in info.get("missing_keys") or ())
    missing = [name for name in whole_names if stage_name(name, layers, first, last) is not None]
    check_weights_loaded(path, {**info, "missing_keys": missing})
    for offset, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = layers.start + offset  # its K/V sit under its index in the whole model
    if not last:
        model.model.norm = torch.nn.Identity()
    if first and not load_kwargs.get("gguf_file"):
        # The coordinator's stop tokens and sampling defaults, as one process reads them (from a
        # GGUF's metadata alone: transformers reads no generation_config.json beside it).
        with contextlib.suppress(OSError):  # no generation_config.json: the config's defaults stay
            model.generation_config = GenerationConfig.from_pretrained(path)
    if not first:
        model.model.embed_tokens = None  # never read: later stages take activations
        model.lm_head = None
    return model


def layer_index(name: str) -> int | None:
    """The layer a tensor name (``model.layers.3.mlp...``, transformers' report may leave out the
    ``model.`` prefix) belongs to, if any."""
    parts = name.removeprefix("model.").split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else None


def whole_model_name(name: str, layers: range) -> str:
    """A stage model's tensor ``name`` as the whole model calls it (``stage_name`` undone)."""
    if not name.startswith("model.layers."):
        return name
    index, _, rest = name.removeprefix("model.layers.").partition(".")
    return f"model.layers.{int(index) + layers.start}.{rest}"


def stage_forward(model: TrellisLlama, plan: StepPlan, pool: BlockPool, hidden: torch.Tensor) -> torch.Tensor:
    """Run a stage's layers over one step, from the activations ``hidden`` ``[T, H]`` of the stage
    before; returns ``[T, H]``."""
    batch = plan_batch(plan.input_ids, plan.positions, plan.slot_mapping, plan.block_table, plan.cu_seqlens_q,
                       plan.seq_lens, pool, model.config.num_attention_heads, model.runner.attention_backend())
    return run_decoder(model, batch, hidden).last_hidden_state[0]


class StageWorker:
    """Serves one stage (rank ≥ 1): takes each step's plan and activations from the stage before,
    passes the plan on, runs its layers, and sends the activations on (the last stage: back to
    the coordinator), until the coordinator says stop."""

    def __init__(self, model: TrellisLlama, pool: BlockPool, link: Link) -> None:
        self.model, self.pool, self.link = model, pool, link
        self.is_last = link.next == 0
        self.steps = 0

    def serve(self) -> None:
        # no_grad, not inference_mode: the C++ attention checks its plan against the tensors' version
        # counters, which inference tensors lack (it would plan again in every layer).
        with torch.no_grad():
            while True:
                header, payload = self.link.recv_plan(IDLE_TIMEOUT_S)
                kind = header[0].item()
                if not self.is_last:
                    self.link.send_plan(header, payload)  # the next stage plans while this one computes
                if kind == STOP:
                    self.link.close()
                    return
                if kind == PING:
                    continue
                plan = StepPlan.decode(header, payload, self.pool.kv.device)
                for src, dst in plan.copies:
                    self.pool.copy_block(src, dst)
                hidden = self.link.recv_hidden(len(plan.input_ids))
                self.link.send_hidden(stage_forward(self.model, plan, self.pool, hidden))
                self.steps += 1


def run_stage(worker: StageWorker) -> int:
    """Serve until stopped; the process's exit status: 0 when the coordinator stopped the grid."""
    try:
        worker.serve()
    except GridError as exc:
        log.error("%s; this stage exits (restart the grid)", exc)
        return 1
    except Exception as exc:  # its own failure: one line, as a lost link's (the trace at debug level)
        log.debug("this stage failed", exc_info=True)
        log.error("this stage failed: %s: %s; it exits, and the grid with it (restart the grid)",
                  type(exc).__name__, exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; this stage exits, and the grid with it")
        return 130
    log.info("stage stopped after %d steps", worker.steps)
    return 0

