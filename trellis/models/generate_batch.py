"""transformers' continuous-batching ``generate_batch``, served by the Trellis engine (the façade's
``TrellisLlama.generate_batch``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from tqdm.auto import tqdm
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaForCausalLM

from trellis.engine import Engine, SamplingParams, TrellisGenerationOutput
from trellis.runner import runner_of

# Settings that change the tokens and that the engine does not implement, with their neutral value.
_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "min_new_tokens": None,
                "min_length": 0, "no_repeat_ngram_size": 0, "min_p": None, "typical_p": 1.0}


def generate_batch(
    model: LlamaForCausalLM,
    inputs: Sequence[Sequence[int]],
    generation_config: GenerationConfig | None = None,
    continuous_batching_config: ContinuousBatchingConfig | None = None,
    record_timestamps: bool = False,
    progress_bar: bool = False,
    **kwargs,
) -> dict[str, TrellisGenerationOutput]:
    """Generate for every prompt with continuous batching; ``{"req_0": output, ...}`` in input order.

    The generation settings resolve as in ``model.generate()`` (``generation_config`` and keyword
    arguments over ``model.generation_config`` over transformers' defaults), so greedy outputs equal
    per-prompt ``generate()``. From ``continuous_batching_config`` the engine takes ``seed``
    (request ``i`` samples with seed ``seed + i``), ``return_logprobs``, ``max_batch_tokens``
    and ``max_requests_per_batch``; the block size is the model's (``configure_cache``).
    """
    config, unused = model._prepare_generation_config(generation_config, **kwargs)
    if unused:
        raise TypeError(f"generate_batch got unexpected keyword arguments {sorted(unused)}")
    for name, neutral in _UNSUPPORTED.items():
        if getattr(config, name, neutral) not in (neutral, None):
            raise ValueError(f"the Trellis engine does not support {name}={getattr(config, name)!r}")
    cb = continuous_batching_config or ContinuousBatchingConfig()
    runner = runner_of(model)
    engine = Engine(runner, max_batch_tokens=cb.max_batch_tokens or 4096, max_running=cb.max_requests_per_batch or 256)
    with runner.lock:  # the whole call: concurrent calls run one after the other, as generate()'s do
        try:
            sessions = [engine.add(prompt, _params(config, cb.seed, i, len(prompt))) for i, prompt in enumerate(inputs)]
            with tqdm(total=len(sessions), disable=not progress_bar, desc=f"Solving {len(sessions)} requests",
                      unit="request") as bar:
                engine.run(on_finish=lambda _: bar.update(1))
        except BaseException as exc:
            engine.abort(f"generate_batch failed: {exc!r}")
            raise
    return {s.request_id: s.to_output(record_timestamps, cb.return_logprobs) for s in sessions}


def _params(config: GenerationConfig, seed: int | None, index: int, prompt_len: int) -> SamplingParams:
    params = SamplingParams.from_generation_config(config, seed=None if seed is None else seed + index)
    if config.max_new_tokens is None:  # as generate(): max_length counts the prompt
        params = replace(params, max_new_tokens=max(1, config.max_length - prompt_len))
    return params
