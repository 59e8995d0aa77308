"""The paged KV cache: a preallocated block pool, a radix tree over token ids that shares whole
blocks between sessions, the manager that runs sessions over both, and their persistence."""

from trellis.cache.block_pool import BlockPool, OutOfBlocksError
from trellis.cache.manager import AdmissionCost, KVCacheManager, PagedSequence
from trellis.cache.persist import PrefixCacheFileError
from trellis.cache.radix import RadixCache

__all__ = ["AdmissionCost", "BlockPool", "KVCacheManager", "OutOfBlocksError", "PagedSequence", "PrefixCacheFileError",
           "RadixCache"]
