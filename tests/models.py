"""Models shared by the tests: tiny random-init Llama configs and the embedded SmolLM2."""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama


def tiny_config(**overrides) -> LlamaConfig:
    # A large init range gives peaked logits, so greedy choices are not decided by rounding noise.
    settings = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                "initializer_range": 0.2, "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
                "bos_token_id": 2}
    return LlamaConfig(**{**settings, **overrides})


def tiny_pair(seed: int = 0, config: LlamaConfig | None = None, **cache_settings) -> tuple[LlamaForCausalLM, TrellisLlama]:
    """A plain sdpa LlamaForCausalLM and a TrellisLlama with the same random weights."""
    config = config or tiny_config()
    torch.manual_seed(seed)
    # Each model gets its own config: the attention implementation is stored on it.
    ref = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    model = TrellisLlama._from_config(copy.deepcopy(config), attn_implementation="trellis").eval()
    model.load_state_dict(ref.state_dict())
    model.configure_cache(**{"block_size": 4, "num_blocks": 256, **cache_settings})
    return ref, model


@lru_cache(maxsize=1)
def smollm2_dir():
    return embedded_model_dir()


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir())


@lru_cache(maxsize=1)
def smollm2_reference() -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(smollm2_dir(), attn_implementation="sdpa", dtype=torch.float32).eval()


def smollm2_trellis(**settings) -> TrellisLlama:
    return TrellisLlama.from_pretrained(smollm2_dir(), dtype=torch.float32, device="cpu", **settings)
