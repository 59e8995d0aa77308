"""transformers' continuous-batching ``generate_batch``, served by the Trellis engine (the façade's
``TrellisLlama.generate_batch``).

Each prompt is prepared as ``generate()`` prepares one unpadded row: the same settings, lengths
counted from that prompt, and the logits processors transformers builds for it, which the engine
runs on that session's row alone. Processors and stopping criteria pass an allow-list: one the
engine has not been checked to apply exactly as ``generate()`` does (beam search, classifier-free
guidance, stop strings, or anything a later transformers adds) is refused, never ignored.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaForCausalLM
from transformers.generation import logits_process as lp
from transformers.generation import stopping_criteria as sc
from transformers.generation.configuration_utils import GenerationMode

from trellis.engine import Engine, SamplingParams, TrellisGenerationOutput
from trellis.engine.sampling import NO_WARPERS
from trellis.runner import runner_of
from trellis.utils import token_ids

# Processors that are exact per session, with the setting that adds each. All are functions of the
# row's tokens and scores, given values fixed when built for the prompt (its length for min_new_tokens,
# exponential_decay_length_penalty and begin_suppress_tokens; its ids for the encoder_* ones, which
# generate() takes from the prompt of a decoder-only model); the stateful ones (sequence_bias,
# bad_words_ids, watermarking) are built per session.
_ALLOWED_PROCESSORS: dict[type, str] = {
    lp.SequenceBiasLogitsProcessor: "sequence_bias",
    lp.EncoderRepetitionPenaltyLogitsProcessor: "encoder_repetition_penalty",
    lp.RepetitionPenaltyLogitsProcessor: "repetition_penalty",
    lp.NoRepeatNGramLogitsProcessor: "no_repeat_ngram_size",
    lp.EncoderNoRepeatNGramLogitsProcessor: "encoder_no_repeat_ngram_size",
    lp.NoBadWordsLogitsProcessor: "bad_words_ids",
    lp.MinLengthLogitsProcessor: "min_length",
    lp.MinNewTokensLengthLogitsProcessor: "min_new_tokens",
    lp.ForcedBOSTokenLogitsProcessor: "forced_bos_token_id",
    lp.ForcedEOSTokenLogitsProcessor: "forced_eos_token_id",
    lp.InfNanRemoveLogitsProcessor: "remove_invalid_values",
    lp.ExponentialDecayLengthPenalty: "exponential_decay_length_penalty",
    lp.SuppressTokensLogitsProcessor: "suppress_tokens",
    lp.SuppressTokensAtBeginLogitsProcessor: "begin_suppress_tokens",
    lp.TemperatureLogitsWarper: "temperature",
    lp.TopHLogitsWarper: "top_h",
    lp.TopKLogitsWarper: "top_k",
    lp.TopPLogitsWarper: "top_p",
    lp.MinPLogitsWarper: "min_p",
    lp.TypicalLogitsWarper: "typical_p",
    lp.EpsilonLogitsWarper: "epsilon_cutoff",
    lp.EtaLogitsWarper: "eta_cutoff",
    lp.WatermarkLogitsProcessor: "watermarking_config",
    lp.SynthIDTextWatermarkLogitsProcessor: "watermarking_config",
    lp.LogitNormalization: "renormalize_logits",
}
# What SamplingParams does in the engine's batched sampling: sessions with only these take that fast path.
_ENGINE_WARPERS = (lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper)
# The engine's own stopping: max_new_tokens and the stop tokens.
_ALLOWED_CRITERIA = (sc.MaxLengthCriteria, sc.EosTokenCriteria)
# Refused settings that transformers turns into a processor or criterion, for the error message.
_REFUSED_SETTINGS: dict[type, str] = {
    lp.UnbatchedClassifierFreeGuidanceLogitsProcessor: "guidance_scale",
    sc.MaxTimeCriteria: "max_time",
    sc.ConfidenceCriteria: "assistant_confidence_threshold",
}
# generate() arguments with no generate_batch counterpart: the engine takes its processors from the config.
_GENERATE_ONLY_ARGUMENTS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                            "negative_prompt_ids", "negative_prompt_attention_mask", "streamer", "custom_generate")
# Settings that pick a decoding strategy other than greedy search or sampling.
_MODE_SETTINGS = ("num_beams", "num_beam_groups", "do_sample", "penalty_alpha", "constraints", "force_words_ids",
                  "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


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
    arguments over ``model.generation_config`` over transformers' defaults), and each prompt gets
    the logits processors ``generate()`` would give it alone, so greedy outputs equal per-prompt
    ``generate()`` and sampling draws from the same distributions. Unsupported settings raise
    ``ValueError``. From ``continuous_batching_config`` the engine takes ``seed`` (request ``i``
    samples with seed ``seed + i``), ``return_logprobs``, ``max_batch_tokens`` and
    ``max_requests_per_batch``; the block size is the model's (``configure_cache``).
    """
    for name in _GENERATE_ONLY_ARGUMENTS:
        if kwargs.get(name) is not None:
            raise ValueError(f"generate_batch does not take generate()'s {name}: the Trellis engine applies the "
                             "logits processors and stopping criteria that the generation config asks for")
    config, unused = model._prepare_generation_config(generation_config, **kwargs)
    if unused:
        raise TypeError(f"generate_batch got unexpected keyword arguments {sorted(unused)}")
    _check_strategy(config)
    cb = continuous_batching_config or ContinuousBatchingConfig()
    runner = runner_of(model)
    model._prepare_special_tokens(config, kwargs_has_attention_mask=False, device=runner.device, batch_size=1)
    # As generate(): a max_length nobody set counts new tokens only (see _prepare_generated_length).
    default_length = {name: kwargs.get(name) is None and getattr(generation_config, name, None) is None
                      and getattr(model.generation_config, name, None) is None for name in ("max_length", "min_length")}
    requests = [_request(model, config, prompt, None if cb.seed is None else cb.seed + i, runner.device, default_length)
                for i, prompt in enumerate(inputs)]
    engine = Engine(runner, max_batch_tokens=cb.max_batch_tokens or 4096, max_running=cb.max_requests_per_batch or 256)
    with runner.lock:  # the whole call: concurrent calls run one after the other, as generate()'s do
        try:
            sessions = [engine.add(prompt, params, logits_processor=processors)
                        for prompt, (params, processors) in zip(inputs, requests)]
            with tqdm(total=len(sessions), disable=not progress_bar, desc=f"Solving {len(sessions)} requests",
                      unit="request") as bar:
                engine.run(on_finish=lambda _: bar.update(1))
        except BaseException as exc:
            engine.abort(f"generate_batch failed: {exc!r}")
            raise
    return {s.request_id: s.to_output(record_timestamps, cb.return_logprobs) for s in sessions}


def _check_strategy(config: GenerationConfig) -> None:
    """Refuse what the engine cannot do with one sequence per prompt, decoded greedily or sampled."""
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        settings = ", ".join(f"{name}={getattr(config, name)!r}" for name in _MODE_SETTINGS
                             if getattr(config, name, None) is not None)
        raise ValueError(f"the Trellis engine does greedy search and sampling only, not {mode.value} ({settings})")
    if (config.num_return_sequences or 1) != 1:
        raise ValueError(f"the Trellis engine does not support num_return_sequences={config.num_return_sequences!r}")
    for name in ("stop_strings", "token_healing"):  # both need a tokenizer, which generate_batch does not take
        if getattr(config, name, None):
            raise ValueError(f"the Trellis engine does not support {name}={getattr(config, name)!r}")


def _request(model: LlamaForCausalLM, config: GenerationConfig, prompt: Sequence[int], seed: int | None,
             device: torch.device, default_length: dict[str, bool]) -> tuple[SamplingParams, lp.LogitsProcessorList | None]:
    """The session settings and logits processors that ``generate()`` would use for ``prompt`` alone
    (None: the engine's batched sampling does all that is needed)."""
    config = copy.copy(config)  # the lengths are per prompt; the rest is only read
    prompt = token_ids(prompt)  # (text, or floats, refused by name)
    input_ids = torch.tensor([prompt], device=device)  # [1, L]
    model._prepare_generated_length(config, has_default_max_length=default_length["max_length"],
                                    has_default_min_length=default_length["min_length"], model_input_name="input_ids",
                                    input_ids_length=len(prompt), inputs_tensor=input_ids)
    processors = model._get_logits_processor(config, input_ids_seq_length=len(prompt), encoder_input_ids=input_ids,
                                             logits_processor=lp.LogitsProcessorList(), device=device)
    criteria = model._get_stopping_criteria(config, stopping_criteria=sc.StoppingCriteriaList())
    for item in [*processors, *criteria]:
        if type(item) not in _ALLOWED_PROCESSORS and type(item) not in _ALLOWED_CRITERIA:
            setting = _REFUSED_SETTINGS.get(type(item), f"the setting that adds {type(item).__name__}")
            raise ValueError(f"the Trellis engine does not support {setting} (it cannot apply "
                             f"{type(item).__name__} per session as generate() does)")
    if len(prompt) >= config.max_length:  # as generate() refuses it
        raise ValueError(f"a prompt of {len(prompt)} tokens leaves nothing to generate under max_length="
                         f"{config.max_length}: raise max_length, or set max_new_tokens")
    params = replace(SamplingParams.from_generation_config(config, seed=seed),
                     max_new_tokens=config.max_length - len(prompt))
    if all(type(p) in _ENGINE_WARPERS for p in processors):
        return params, None
    return replace(params, **NO_WARPERS), processors  # the processors warp
