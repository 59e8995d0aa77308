"""Training-free evaluation with prefix reuse: log-likelihoods, perplexity and generation with
lm-evaluation-harness semantics. The lm-eval model ``trellis`` lives in ``lm_eval_adapter``
(imported only when lm-eval is installed)."""

from trellis.eval.generation import generate_until
from trellis.eval.loglikelihood import loglikelihood, loglikelihood_rolling, rolling_loglikelihood
from trellis.eval.scoring import score_continuations

__all__ = ["generate_until", "loglikelihood", "loglikelihood_rolling", "rolling_loglikelihood", "score_continuations"]
