"""The Hugging Face façade: ``TrellisLlama``, a drop-in ``LlamaForCausalLM`` over the paged runner."""

from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import PagedKVCache

__all__ = ["PagedKVCache", "TrellisLlama", "embedded_model_dir"]
