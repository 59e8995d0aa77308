"""Trellis: prefix-cached (RadixAttention) LLM inference for PyTorch on the hardware you own."""

from trellis.cache import BlockPool, KVCacheManager, OutOfBlocksError, PrefixCacheFileError, RadixCache
from trellis.engine import Engine, SamplingParams
from trellis.eval import generate_until, loglikelihood, loglikelihood_rolling, score_continuations
from trellis.models import TrellisLlama
from trellis.runner import PagedModelRunner
from trellis.utils import package_version

__version__ = package_version()

__all__ = ["BlockPool", "Engine", "KVCacheManager", "OutOfBlocksError", "PagedModelRunner", "PrefixCacheFileError",
           "RadixCache", "SamplingParams", "TrellisLlama", "generate_until", "loglikelihood", "loglikelihood_rolling",
           "score_continuations"]
