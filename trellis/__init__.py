"""Trellis: prefix-cached (RadixAttention) LLM inference for PyTorch on the hardware you own."""

from trellis.cache.block_pool import BlockPool, OutOfBlocksError
from trellis.cache.manager import KVCacheManager
from trellis.cache.radix import RadixCache
from trellis.models.llama import TrellisLlama

__all__ = ["BlockPool", "KVCacheManager", "OutOfBlocksError", "RadixCache", "TrellisLlama"]
