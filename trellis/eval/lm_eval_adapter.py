"""The lm-evaluation-harness model ``trellis``: lm-eval's HF backend with prefix-reusing scoring.

Importing this module registers the model with lm-eval. lm-eval 0.4 discovers no models from
other packages, so the ``trellis-lm-eval`` command (this module's ``main``) is ``lm_eval`` with
the model registered; it takes the same arguments::

    trellis-lm-eval --model trellis --model_args pretrained=PATH,block_size=32 --tasks arc_easy

From Python, import this module, then call ``lm_eval.simple_evaluate(model="trellis", ...)``.
Log-likelihood requests go through ``score_continuations`` (each context computed once, its
continuations scored on top); ``generate_until`` is HFLM's, over ``TrellisLlama.generate``.
"""

from __future__ import annotations

import logging

import torch

try:
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'trellis[eval]'") from exc
from transformers import PreTrainedModel

from trellis.eval.loglikelihood import rolling_loglikelihood
from trellis.eval.scoring import check_max_batch_tokens, score_continuations
from trellis.models.embedded import EMBEDDED_GGUF, embedded_gguf_path, embedded_model_dir
from trellis.models.llama import TrellisLlama
from trellis.models.loading import resolve_device
from trellis.utils import cdiv, is_positive_int

log = logging.getLogger(__name__)


def _available(device: str | None) -> torch.device:
    """``device``, or auto where this machine lacks it (as HFLM falls back)."""
    try:
        return resolve_device(device or "auto")
    except ValueError as exc:
        fallback = resolve_device("auto")
        log.warning("%s: running on %s, as lm-eval's HF backend does", exc, fallback)
        return fallback


@register_model("trellis")
class TrellisLM(HFLM):
    """``model_args``: anything HFLM takes (``pretrained`` defaults to the embedded SmolLM2), plus
    the KV cache settings ``block_size`` (default 32), ``num_blocks``, ``kv_cache_memory`` (bytes;
    a whole float such as ``1e8`` is taken as an int) and ``kernel_backend`` (reference, cpp,
    triton), which apply when the model is loaded from a path and are refused with a model object
    (configure that with ``configure_cache``); ``max_batch_tokens``, the new tokens one scoring
    forward packs; and ``linear_kernel`` (``TrellisLlama.set_linear_kernel``). ``device`` defaults
    to auto: CUDA, then MPS, then CPU; a device this machine lacks falls back to auto with a
    warning, as in lm-eval's HF backend (lm-eval's command line passes ``cuda:0`` unless
    ``--device`` says otherwise)."""

    AUTO_MODEL_CLASS = TrellisLlama

    def __init__(
        self,
        pretrained: str | PreTrainedModel | None = None,
        device: str | None = "auto",
        block_size: int | None = None,
        num_blocks: int | None = None,
        kv_cache_memory: float | None = None,
        kernel_backend: str | None = None,
        max_batch_tokens: int = 2048,
        linear_kernel: str | None = None,
        **kwargs,
    ) -> None:
        self.max_batch_tokens = check_max_batch_tokens(max_batch_tokens)
        if kwargs.get("max_length") is not None and not is_positive_int(kwargs["max_length"]):
            raise ValueError(f"max_length must be a positive integer, got {kwargs['max_length']!r}")
        # lm-eval parses "kv_cache_memory=1e8" as a float: a whole number of bytes all the same.
        if isinstance(kv_cache_memory, float):
            if not kv_cache_memory.is_integer():
                raise ValueError(f"kv_cache_memory must be a whole number of bytes, got {kv_cache_memory!r}")
            kv_cache_memory = int(kv_cache_memory)
        settings = {"block_size": block_size, "num_blocks": num_blocks, "kv_cache_memory": kv_cache_memory,
                    "backend": kernel_backend}
        # Read by _create_model, which HFLM.__init__ calls when it loads from a path; unset ones keep
        # from_pretrained's defaults.
        self._cache_settings = {name: value for name, value in settings.items() if value is not None}
        if pretrained is not None and not isinstance(pretrained, str) and self._cache_settings:
            given = ", ".join(f"{'kernel_backend' if name == 'backend' else name}={value!r}"
                              for name, value in self._cache_settings.items())
            raise ValueError(f"{given}: the KV cache settings apply only when the adapter loads the model from a "
                             "path; with a model object, set them on it first (model.configure_cache(...))")
        if kwargs.get("mixed_precision_dtype") is not None:  # HFLM's autocast, which Trellis' forward refuses
            raise ValueError(f"mixed_precision_dtype={kwargs['mixed_precision_dtype']!r} (autocast) is not served: "
                             "load the model in that dtype instead (dtype=...)")
        if pretrained is None and kwargs.get("keep_quantized") and not kwargs.get("gguf_file"):  # the embedded GGUF
            pretrained, kwargs["gguf_file"] = str(embedded_gguf_path().parent), EMBEDDED_GGUF
        pretrained = str(embedded_model_dir()) if pretrained is None else pretrained
        super().__init__(pretrained=pretrained, device=str(_available(device)), **kwargs)
        if not isinstance(self.trellis_model, TrellisLlama):
            raise TypeError(f"the trellis model needs a TrellisLlama, got {type(self.trellis_model).__name__}")
        self.trellis_model.runner.choose_linear_kernel(linear_kernel)  # also lays out the weights as loaded

    def _create_model(self, pretrained: str, **kwargs) -> None:
        super()._create_model(pretrained, **kwargs, **self._cache_settings)

    @property
    def max_length(self) -> int:
        """HFLM's (the ``max_length`` given, else the config's positions), within the positions
        Trellis answers the model at (``runner.max_positions``: LongRoPE's original length)."""
        length = super().max_length
        return length if self._max_length else min(length, self.trellis_model.runner.max_positions())

    @property
    def trellis_model(self) -> TrellisLlama:
        """The TrellisLlama under any PEFT wrapper."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
        """``batch_size="auto"`` (what ``--batch_size auto`` passes, for ``generate_until``): as many
        rows of ``max_length`` tokens as the KV pool holds at once, at most ``max_batch_size``.
        (HFLM's probe runs ever smaller batches until one stops raising out-of-memory errors: the
        pool's own refusal is no such error, and its size is known.)"""
        cache = self.trellis_model.prefix_cache
        rows = cache.pool.num_blocks // cdiv(self.max_length, cache.block_size)
        return max(1, min(rows, self.max_batch_size))

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        token_requests = [(context, continuation) for _, context, continuation in requests]
        results = score_continuations(self.trellis_model, token_requests, self.max_length, self.max_batch_tokens,
                                      progress=not disable_tqdm and self.rank == 0)
        for (request, _, _), result in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        totals = rolling_loglikelihood(self.trellis_model, [self.tok_encode(text) for text in texts],
                                       self.prefix_token_id, self.max_length, self.max_batch_tokens,
                                       progress=not disable_tqdm and self.rank == 0)
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals


def main() -> None:
    """``lm_eval``'s command line with the ``trellis`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
