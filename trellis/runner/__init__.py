"""The paged model runner: one packed step of a transformers Llama over the paged KV cache.

Above the cache and the ops, below the engine and the Hugging Face façade. ``PagedModelRunner``
owns the KV cache, the input checks, batch packing, the forward and logit selection.
"""

from trellis.runner.attention import ATTN_IMPLEMENTATION
from trellis.runner.batch import PagedBatch, build_batch
from trellis.runner.cpu_linear import LINEAR_KERNELS
from trellis.runner.runner import CacheSettings, PagedModelRunner, default_kv_cache_memory, runner_of

__all__ = [
           "ATTN_IMPLEMENTATION",
           "LINEAR_KERNELS",
           "CacheSettings",
           "PagedBatch",
           "PagedModelRunner",
           "build_batch",
           "default_kv_cache_memory",
           "runner_of",
]
