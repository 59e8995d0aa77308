"""TrellisLlama against plain transformers (sdpa) on tiny random-init Llama configs."""

import copy
import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import IN_CI, installed
from tests.models import tiny_config, tiny_pair
from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG, PagedKVCache

ATOL = 1e-4


def prompt(seed: int, n: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_is_a_llama_for_causal_lm():
    _, model = tiny_pair()
    assert isinstance(model, LlamaForCausalLM)
    assert model.config._attn_implementation == "trellis"


@pytest.mark.parametrize("length", [1, 3, 4, 17, 64])
def test_full_logits_match(length):
    ref, model = tiny_pair()
    ids = prompt(length, length)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
    model.prefix_cache.check_integrity()


def test_logits_with_a_cache_hit_match_and_skip_the_prefix():
    ref, model = tiny_pair()
    system = prompt(0, 21)
    ids = torch.cat([system, prompt(1, 6)], dim=1)
    with torch.no_grad():
        model(system, use_cache=False)
        hits = model.prefix_cache.stats()["hit_tokens"]
        out = model(ids, logits_to_keep=3)
        assert model.prefix_cache.stats()["hit_tokens"] - hits == 21  # 5 full blocks of 4, the tail's token
        torch.testing.assert_close(out.logits, ref(ids).logits[:, -3:], atol=ATOL, rtol=0)
    model.prefix_cache.check_integrity()


def test_a_prompt_leaving_the_cache_inside_a_block_copies_the_shared_tokens():
    ref, model = tiny_pair()
    system = prompt(0, 22)  # 5 blocks of 4, and 2 tokens into the sixth
    first, second = (torch.cat([system, prompt(seed, 7)], dim=1) for seed in (1, 2))
    with torch.no_grad():
        model(first, logits_to_keep=1)  # caches 7 whole blocks, the sixth's first 2 tokens the system's
        hits = model.prefix_cache.stats()["hit_tokens"]
        out = model(second, logits_to_keep=7)  # reuse stops before the first logit kept: at 22 tokens
        assert model.prefix_cache.stats()["hit_tokens"] - hits == 22  # 5 blocks shared, 2 tokens copied
        torch.testing.assert_close(out.logits, ref(second).logits[:, -7:], atol=ATOL, rtol=0)
        assert torch.equal(model.generate(second, max_new_tokens=8, do_sample=False),
                           ref.generate(second, max_new_tokens=8, do_sample=False))
    model.prefix_cache.check_integrity()


def test_greedy_generate_matches_cold_and_warm():
    ref, model = tiny_pair()
    system = prompt(0, 30)
    expected = {}
    for q in range(3):
        ids = torch.cat([system, prompt(10 + q, 5)], dim=1)
        expected[q] = ref.generate(ids, max_new_tokens=12, do_sample=False)
    for q in range(3):  # the first call is cold, the next ones hit the shared system prompt
        ids = torch.cat([system, prompt(10 + q, 5)], dim=1)
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected[q])
    stats = model.prefix_cache.stats()
    assert stats["hit_tokens"] >= 2 * 28 and stats["live_sessions"] == 0
    # A repeat of the whole first turn hits its answer too.
    ids = torch.cat([system, prompt(10, 5)], dim=1)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected[0])
    model.prefix_cache.check_integrity()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_pool_made_under_inference_mode_serves_outside_it(backend):
    """The first call under ``torch.inference_mode()`` makes the pool an inference tensor, which
    only inference_mode writes: later calls outside it write it too (the reference serves MPS)."""
    ref, model = tiny_pair(backend=backend)
    ids = [torch.cat([prompt(0, 30), prompt(10 + q, 5)], dim=1) for q in range(2)]
    with torch.inference_mode():
        first = model.generate(ids[0], max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        second = model.generate(ids[1], max_new_tokens=6, do_sample=False)
        for got, row in ((first, ids[0]), (second, ids[1])):
            assert torch.equal(got, ref.generate(row, max_new_tokens=6, do_sample=False))
    model.prefix_cache.check_integrity()


def test_a_warm_rerun_fits_the_pool_the_cold_run_fitted():
    """A rerun computes the answer's blocks again (the tree holds the first run's): it keeps its
    own and leaves the tree's evictable, so it needs no more blocks than the cold run."""
    ref, model = tiny_pair(num_blocks=30)  # 80 + 40 tokens in blocks of 4: 30 blocks
    head = prompt(9, 30)
    ids = torch.cat([head, head[:, :20], head], 1)
    want = ref.generate(ids, max_new_tokens=40, do_sample=False)
    for _ in range(2):  # cold, then warm
        assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False), want)
        model.prefix_cache.check_integrity()
    assert model.prefix_cache.stats()["hit_tokens"] == 79  # the warm run: all of the prompt but its last token


def test_left_padded_batch_matches_each_prompt_alone():
    ref, model = tiny_pair()
    prompts = [prompt(20, 9)[0], prompt(21, 14)[0], prompt(22, 5)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref_out = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref_out)
    for i, p in enumerate(prompts):
        alone = ref.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, width:], alone[0, len(p):])
    model.prefix_cache.check_integrity()


def test_padded_forward_logits_match_on_real_positions():
    ref, model = tiny_pair()
    ids = torch.cat([prompt(30, 10), prompt(31, 10)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ids[1, :4] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want_0 = ref(ids[:1]).logits
        want_1 = ref(ids[1:, 4:]).logits
    torch.testing.assert_close(got[0], want_0[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1, 4:], want_1[0], atol=ATOL, rtol=0)
    assert torch.all(got[1, :4] == 0)


def test_manual_decoding_loop_through_past_key_values():
    ref, model = tiny_pair()
    ids = prompt(40, 11)
    with torch.no_grad():
        out = model(ids)
        ref_out = ref(ids)
        assert isinstance(out.past_key_values, PagedKVCache)
        for step in range(6):
            nxt = out.logits[:, -1:].argmax(-1)
            torch.testing.assert_close(out.logits[:, -1], ref_out.logits[:, -1], atol=ATOL, rtol=0)
            name = ("past_key_values", CACHE_ARG)[step % 2]  # the old name and the installed release's
            out = model(nxt, **{name: out.past_key_values})
            ref_out = ref(nxt, **{CACHE_ARG: ref_out[CACHE_ARG]})
    assert model.prefix_cache.stats()["live_sessions"] == 1
    del out
    assert model.prefix_cache.stats()["live_sessions"] == 0  # released when the handle is dropped
    model.prefix_cache.check_integrity()


def test_generate_continues_from_its_returned_cache():
    """A second ``generate()`` given the first one's cache and the whole conversation so far runs
    only the tokens the cache lacks, as transformers does with its own cache."""
    ref, model = tiny_pair()
    ids = prompt(5, 37)
    want = ref.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    got = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    handle = got[CACHE_ARG]
    assert isinstance(handle, PagedKVCache)
    assert torch.equal(got.sequences, want.sequences)
    assert model.prefix_cache.stats()["live_sessions"] == 1  # held by the returned handle
    more = torch.cat([got.sequences, prompt(6, 10)], 1)
    want_more = ref.generate(more, max_new_tokens=5, do_sample=False, **{CACHE_ARG: want[CACHE_ARG]})
    got_more = model.generate(more, max_new_tokens=5, do_sample=False, **{CACHE_ARG: handle})
    assert torch.equal(got_more, want_more)
    assert len(handle.seqs[0].token_ids) == want_more.shape[1] - 1  # the last token is never fed back
    del got, handle
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


@pytest.mark.parametrize("draft", ["prompt_lookup", "assistant_model", "trellis_assistant"])
def test_speculative_decoding_matches_and_rolls_back_rejected_drafts(draft, monkeypatch):
    """Assisted and prompt-lookup decoding verify drafts in one forward, then crop the rejected
    tokens off the cache; the greedy tokens must be transformers' plain greedy ones."""
    ref, model = tiny_pair()
    head = prompt(9, 30)
    ids = torch.cat([head, head[:, :20], head], 1)  # repeats: prompt lookup finds drafts
    want = ref.generate(ids, max_new_tokens=40, do_sample=False)
    removed = []
    crop = PagedKVCache.crop
    monkeypatch.setattr(PagedKVCache, "crop", lambda self, n: (removed.append(-n), crop(self, n)))
    assistants = {"assistant_model": 0, "trellis_assistant": 1}  # a plain Llama, or a TrellisLlama (its cache is cropped too)
    kwargs = ({"prompt_lookup_num_tokens": 5} if draft == "prompt_lookup"
              else {"assistant_model": tiny_pair(seed=1)[assistants[draft]]})
    for _ in range(2):  # cold, then over the blocks the first run (rejected drafts included) cached
        assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False, **kwargs), want)
        assert model.prefix_cache.stats()["live_sessions"] == 0
        model.prefix_cache.check_integrity()
    assert sum(removed) > 0  # drafts were rejected and rolled back
    if draft == "trellis_assistant":
        assert kwargs["assistant_model"].prefix_cache.stats()["live_sessions"] == 0
        kwargs["assistant_model"].prefix_cache.check_integrity()


@pytest.mark.parametrize("wrapper", [None, "peft"])
def test_two_models_drafting_for_each_other_from_two_threads_do_not_deadlock(wrapper):
    """Each generate() holds its model's lock, and a TrellisLlama assistant's generate() takes the
    assistant's: both are taken in one order, or two threads that swap the roles wait for ever. So
    with an assistant that wraps a TrellisLlama (a PEFT model, whose adapters start as no-ops)."""
    (ref_a, a), (ref_b, b) = tiny_pair(seed=0), tiny_pair(seed=1)
    if wrapper == "peft":
        peft = installed("peft")
        a, b = (peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj"])) for m in (a, b))
    head = prompt(9, 30)
    ids = torch.cat([head, head[:, :20], head], 1)
    want = {id(a): ref_a.generate(ids, max_new_tokens=12, do_sample=False),
            id(b): ref_b.generate(ids, max_new_tokens=12, do_sample=False)}
    results, errors = [], []

    def draft_for_each_other(main, assistant):
        try:
            for _ in range(4):
                results.append(torch.equal(main.generate(ids, max_new_tokens=12, do_sample=False,
                                                         assistant_model=assistant), want[id(main)]))
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=draft_for_each_other, args=pair, daemon=True) for pair in ((a, b), (b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlocked"
    assert not errors and results == [True] * 8
    for model in (a, b):
        model.prefix_cache.check_integrity()


def generation_paused_midway(model: TrellisLlama, ids: torch.Tensor) -> tuple[threading.Thread, list[torch.Tensor]]:
    """A greedy generate() of 8 tokens started in another thread, and paused 0.3 s in its third
    step (a logits processor) by the time this returns: the thread and, once it ends, its output."""
    mid_generation, steps, got = threading.Event(), [0], []

    def slow_third_step(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        steps[0] += 1
        if steps[0] == 3:
            mid_generation.set()
            time.sleep(0.3)  # what the test does next arrives now
        return scores

    thread = threading.Thread(target=lambda: got.append(model.generate(
        ids, max_new_tokens=8, do_sample=False, logits_processor=[slow_third_step])), daemon=True)
    thread.start()
    assert mid_generation.wait(60)
    return thread, got


def test_a_conversion_from_another_thread_waits_for_the_generation_in_progress():
    """``model.to(bf16)`` while another thread's generate() is between two forwards: it waits for
    that call (the runner's lock), which ends on the fp32 weights it began with (it converted them
    under it: the next forward failed on mixed dtypes)."""
    ref, model = tiny_pair()
    ids = prompt(5, 20)
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)
    thread, got = generation_paused_midway(model, ids)
    model.to(torch.bfloat16)
    thread.join(60)
    assert len(got) == 1 and torch.equal(got[0], want)
    assert model.dtype == torch.bfloat16 and model.prefix_cache.stats()["live_sessions"] == 0


def test_a_prefix_cache_reset_from_another_thread_waits_for_the_generation_in_progress():
    """``prefix_cache.reset()`` makes the packed weight copies afresh, which forwards read: from
    another thread it waits for the call in progress (the runner's lock) before it does."""
    ref, model = tiny_pair()
    ids = prompt(6, 20)
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)
    thread, got = generation_paused_midway(model, ids)
    model.prefix_cache.reset()
    assert len(got) == 1 and torch.equal(got[0], want)  # the generation had ended
    thread.join(60)
    assert model.prefix_cache.stats()["cached_blocks"] == 0


def test_prompt_lookup_with_a_wrapped_rotary_embedding_matches_transformers():
    """A rotary embedding wrapped in another module (no ``rope_type`` of its own) is the default
    kind to Trellis' RoPE checks (prompt lookup read the attribute bare, and failed)."""

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    ref, model = tiny_pair()
    for m in (ref, model):
        m.model.rotary_emb = Wrapped(m.model.rotary_emb)
    head = prompt(9, 20)
    ids = torch.cat([head, head, head[:, :10]], 1)
    want = ref.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4), want)


def test_drafts_past_the_last_position_are_computed_as_transformers_computes_them():
    """Prompt lookup copies up to ``prompt_lookup_num_tokens`` drafts however little room the
    generation has left, so its verifying forward runs past ``max_position_embeddings``;
    transformers computes those columns and discards them, and so does Trellis (their K/V rolled
    back). A forward of the caller's own past the last position is still refused."""
    ref, model = tiny_pair(config=tiny_config(max_position_embeddings=128))
    head = prompt(9, 40)
    ids = torch.cat([head, head, head[:, :20]], 1)  # 100 tokens that repeat: long drafts
    for do_sample in (False, True):
        settings = {"max_new_tokens": 28, "do_sample": do_sample, "eos_token_id": None, "prompt_lookup_num_tokens": 10,
                    "return_dict_in_generate": True, "output_scores": True}
        torch.manual_seed(3)
        want = ref.generate(ids, **settings)
        torch.manual_seed(3)
        got = model.generate(ids, **settings)
        assert torch.equal(got.sequences, want.sequences) and got.sequences.shape[1] == 128
        for got_scores, want_scores in zip(got.scores, want.scores, strict=True):
            torch.testing.assert_close(got_scores, want_scores, atol=ATOL, rtol=0)
    handle = got[CACHE_ARG]
    with pytest.raises(ValueError, match="129 tokens exceeds the model's 128 positions"):
        model(torch.tensor([[5, 6]]), **{CACHE_ARG: handle})
    assert len(handle.seqs[0].token_ids) == 127
    model.prefix_cache.check_integrity()
    # Dynamic RoPE: transformers rescales the whole forward once a position passes the limit (so its
    # drafts change its tokens); such a draft is refused as any position past the model's.
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    _, dynamic = tiny_pair(config=tiny_config(max_position_embeddings=128, rope_parameters=rope))
    with pytest.raises(ValueError, match="tokens exceeds the model's 128 positions"):
        dynamic.generate(ids, **settings)
    assert dynamic.prefix_cache.stats()["live_sessions"] == 0
    # So are a caller's positions past it: transformers would keep the rescaled frequencies for
    # later forwards, and the cache (a live handle's too) would no longer hold for them.
    live = dynamic(ids[:, :8])[CACHE_ARG]
    cached = dynamic.prefix_cache.stats()["cached_blocks"]
    with pytest.raises(ValueError, match="position_ids reach 137, past the model's 128 positions"):
        dynamic(ids[:, :10], position_ids=torch.arange(128, 138)[None])
    assert dynamic.prefix_cache.stats()["cached_blocks"] == cached
    dynamic(ids[:, 8:9], **{CACHE_ARG: live})  # the handle still continues


def test_early_exit_drafting_keeps_the_cache_and_live_handles():
    """``assistant_early_exit`` drafts with the model's first layers (transformers lowers
    ``config.num_hidden_layers`` meanwhile): the cached prefixes and a live handle stay, the drafts'
    K/V are never cached, and the tokens are transformers'."""
    ref, model = tiny_pair(config=tiny_config(num_hidden_layers=4))
    head = prompt(9, 30)
    ids = torch.cat([head, head[:, :20], head], 1)
    first = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cached = model.prefix_cache.stats()["cached_blocks"]
    for exit_layer in (1, 3):
        got = model.generate(ids, max_new_tokens=20, do_sample=False, assistant_early_exit=exit_layer)
        assert torch.equal(got, ref.generate(ids, max_new_tokens=20, do_sample=False))
        assert model.prefix_cache.stats()["cached_blocks"] >= cached
    want = ref.generate(first.sequences, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(first.sequences, max_new_tokens=3, do_sample=False,
                                      **{CACHE_ARG: first[CACHE_ARG]}), want)
    with torch.no_grad():  # a prompt over the answer's cached blocks: the full model's K/V, not a draft's
        torch.testing.assert_close(model(got, logits_to_keep=1).logits, ref(got).logits[:, -1:], atol=ATOL, rtol=0)
    model.prefix_cache.check_integrity()


def test_a_generate_waiting_on_an_early_exit_draft_keeps_every_layer():
    """A plain generate() started while another thread's early-exit draft has the layer count
    lowered waits for the lock, then runs (and leaves the model with) all the layers."""
    ref, model = tiny_pair(seed=3, config=tiny_config(num_hidden_layers=3))
    ids = prompt(5, 12)
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)
    drafting = threading.Event()

    def pause_in_the_first_draft(module, args):
        if model.config.num_hidden_layers == 1 and not drafting.is_set():
            drafting.set()
            time.sleep(1.0)  # the other thread starts meanwhile

    hook = model.model.layers[0].register_forward_pre_hook(pause_in_the_first_draft)
    results = {}
    drafted = threading.Thread(target=lambda: results.setdefault(
        "early_exit", model.generate(ids, assistant_early_exit=1, max_new_tokens=8, do_sample=False)))
    drafted.start()
    assert drafting.wait(60)
    plain = threading.Thread(target=lambda: results.setdefault("plain", model.generate(ids, max_new_tokens=8,
                                                                                        do_sample=False)))
    plain.start()
    drafted.join(120)
    plain.join(120)
    hook.remove()
    assert model.config.num_hidden_layers == 3
    assert torch.equal(results["early_exit"], want) and torch.equal(results["plain"], want)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want)


def test_prompt_lookup_to_the_last_position_is_served():
    """The last new token is never fed back, so it needs no position: a generation accepted up
    front runs to it with drafts too (they may reach past the last position, as transformers
    computes and discards them)."""
    ref, model = tiny_pair(seed=23, config=tiny_config(max_position_embeddings=40), block_size=2)
    ids = torch.tensor([[188, 52, 71] * 5 + [188]])  # 16 tokens, 25 new: 40 positions used
    settings = {"max_new_tokens": 25, "do_sample": False, "prompt_lookup_num_tokens": 5, "max_matching_ngram_size": 2}
    want = ref.generate(ids, **settings)
    assert want.shape[1] == 41 and torch.equal(model.generate(ids, **settings), want)
    model.prefix_cache.check_integrity()


def test_an_early_exit_drafts_refusal_is_named_and_ends_its_sessions():
    """The model's first layers drafting from a sequence that ends in the pad id (the model
    generated it) raise the assistant's refusal, with a note naming early exit; the drafter's
    sessions end with the error, not when its traceback is dropped."""
    _, model = tiny_pair(seed=18, config=tiny_config(max_position_embeddings=32, num_hidden_layers=2))
    ids = torch.tensor([[163, 129, 49, 125, 78, 163, 129, 49, 125, 78, 163]])
    with pytest.raises(ValueError, match="holds the pad token 0") as refused:
        model.generate(ids, assistant_early_exit=1, max_new_tokens=22, do_sample=False)
    assert refused.value.__notes__ == [
        "(raised by the model's first 1 layers (assistant_early_exit) while it drafted candidate tokens)"]
    assert model.prefix_cache.stats()["live_sessions"] == 0 and model.config.num_hidden_layers == 2
    model.prefix_cache.check_integrity()


def test_beam_search_matches():
    ref, model = tiny_pair()
    ids = prompt(50, 13)
    want = ref.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False), want)
    model.prefix_cache.check_integrity()


def test_sampling_with_a_seed_matches():
    ref, model = tiny_pair()
    ids = prompt(60, 9)
    torch.manual_seed(7)
    want = ref.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(7)
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8), want)


@pytest.mark.parametrize("block_size", [1, 2, 8, 32, 256])
def test_block_sizes(block_size):
    ref, model = tiny_pair(block_size=block_size)
    ids = prompt(70, 40)
    want = ref.generate(ids, max_new_tokens=6, do_sample=False)
    for _ in range(2):
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    model.prefix_cache.check_integrity()


def test_dtype_and_device_change_rebuild_the_cache():
    _, model = tiny_pair()
    ids = prompt(80, 12)
    model.generate(ids, max_new_tokens=4, do_sample=False)
    old = model.prefix_cache
    model.to(torch.bfloat16)
    assert model.prefix_cache is not old and model.prefix_cache.pool.kv.dtype == torch.bfloat16
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    model.generate(ids, max_new_tokens=4, do_sample=False)


def test_load_state_dict_drops_stale_prefixes():
    ref, model = tiny_pair()
    ids = prompt(90, 12)
    model.generate(ids, max_new_tokens=4, do_sample=False)
    assert model.prefix_cache.stats()["cached_blocks"] > 0
    model.load_state_dict(ref.state_dict())
    assert model.prefix_cache.stats()["cached_blocks"] == 0


def test_other_attn_implementation_behaves_as_plain_llama():
    ref, _ = tiny_pair()
    plain = TrellisLlama._from_config(tiny_config(), attn_implementation="sdpa").eval()
    plain.load_state_dict(ref.state_dict())
    ids = prompt(100, 10)
    assert torch.equal(plain.generate(ids, max_new_tokens=5, do_sample=False),
                       ref.generate(ids, max_new_tokens=5, do_sample=False))


def test_save_and_reload(tmp_path):
    ref, model = tiny_pair()
    model.save_pretrained(tmp_path)
    again = TrellisLlama.from_pretrained(tmp_path, device="cpu", block_size=8)
    assert again.config._attn_implementation == "trellis" and again.prefix_cache.block_size == 8
    ids = prompt(110, 10)
    assert torch.equal(again.generate(ids, max_new_tokens=5, do_sample=False),
                       ref.generate(ids, max_new_tokens=5, do_sample=False))


def test_deepcopy_gets_its_own_empty_cache():
    ref, model = tiny_pair()
    ids = prompt(120, 10)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    twin = copy.deepcopy(model)
    assert twin.prefix_cache is not model.prefix_cache and twin.prefix_cache.stats()["cached_blocks"] == 0
    assert torch.equal(twin.generate(ids, max_new_tokens=5, do_sample=False),
                       ref.generate(ids, max_new_tokens=5, do_sample=False))


def test_a_cpu_model_runs_the_compiled_kernels():
    """A silent fall-back to the reference would leave a green suite without C++ coverage: on the
    CPU the model's attention runs the C++ kernels (where they cannot be built this skips, except
    in CI, where Trellis builds them)."""
    ref, model = tiny_pair()
    if model.attention_backend() != "cpp":
        if IN_CI:
            pytest.fail(f"the model runs the {model.attention_backend()} attention backend: the C++ kernels did not load")
        pytest.skip("the C++ kernels cannot be built here")
    ids = torch.arange(3, 30)[None]
    # The lean decoder path (fused ops), then transformers' forward with the attention function.
    kernels = {True: {"trellis_cpp::paged_attention", "trellis_cpp::rope_store_kv", "trellis_cpp::add_rms_norm",
                      "trellis_cpp::silu_mul"},
               False: {"trellis_cpp::paged_attention", "trellis_cpp::store_kv"}}
    for lean, expected in kernels.items():
        model.runner.use_lean_decoder = lean
        model.configure_cache(num_blocks=256)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            logits = model(ids).logits
        ran = {event.name for event in profile.events()}
        assert expected <= ran
        with torch.no_grad():
            assert (logits - ref(ids).logits).abs().max() <= ATOL
