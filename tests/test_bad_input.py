"""Bad arguments raise a clear exception and leave the cache and the model working."""

import copy

import numpy as np
import pytest
import torch

from tests.models import tiny_config, tiny_pair
from trellis.cache.block_pool import OutOfBlocksError
from trellis.engine import Engine
from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG


def warm(model, ref):
    ids = torch.arange(3, 23)[None]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=4, do_sample=False))
    return ids


def still_works(model, ref, ids, before):
    after = model.prefix_cache.stats()
    assert after["cached_blocks"] == before["cached_blocks"] and after["live_sessions"] == 0
    model.prefix_cache.check_integrity()
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                       ref.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("block_size", [0, -1, 3, 100, 512, True])
def test_block_size_must_be_a_power_of_two(block_size):
    with pytest.raises(ValueError, match="block_size must be a power of two between 1 and 256"):
        TrellisLlama(tiny_config(), block_size=block_size)
    _, model = tiny_pair()
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        model.configure_cache(block_size=block_size)


@pytest.mark.parametrize("bad", [{"num_blocks": 0}, {"num_blocks": -3}, {"num_blocks": True}, {"kv_cache_memory": 0},
                                 {"kv_cache_memory": "1GB"}, {"kv_cache_memory": 1.5}, {"kv_cache_memory": 10},
                                 {"backend": "fpga"}])
def test_bad_cache_settings(bad):
    _, model = tiny_pair()
    with pytest.raises(ValueError, match="num_blocks|kv_cache_memory|backend"):
        model.configure_cache(**bad)
        model.prefix_cache  # a budget too small for one block is found where the pool is built  # noqa: B018


def test_empty_prompt():
    ref, model = tiny_pair()
    ids = warm(model, ref)
    before = model.prefix_cache.stats()
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="row 1 of the batch has no tokens"):
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    for call in (model, lambda empty: model.generate(empty, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"the batch is empty: input of shape \(0, 5\)"):
            call(torch.zeros(0, 5, dtype=torch.long))
    for mask in (None, torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="the prompt has no tokens: generate"):
            model.generate(torch.zeros(1, 0, dtype=torch.long), attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq_len\], got shape \(3,\)"):
        model.generate(torch.tensor([5, 6, 7]), max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids must be a \\[batch, seq_len\\] tensor of token ids, got list"):
        model.generate([[5, 6, 7]], max_new_tokens=2)
    still_works(model, ref, ids, before)


def test_a_mask_that_does_not_fit_the_prompt_is_named():
    ref, model = tiny_pair()
    ids = warm(model, ref)
    before = model.prefix_cache.stats()
    mismatch = r"attention_mask of shape \(2, 20\) does not match input_ids of shape \(1, 20\)"
    with pytest.raises(ValueError, match=mismatch):
        model.generate(ids, attention_mask=torch.ones(2, 20, dtype=torch.long), max_new_tokens=2)
    still_works(model, ref, ids, before)


@pytest.mark.parametrize("keep", [0, 1, 3, 25, -2])
def test_logits_to_keep_keeps_transformers_columns(keep):
    """transformers slices ``[-k:]``: the last k columns, all of them for 0, all but the first -k for k < 0."""
    ref, model = tiny_pair()
    ids = torch.arange(3, 23)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=keep).logits, ref(ids, logits_to_keep=keep).logits)



@pytest.mark.parametrize("keep", [torch.tensor([-1, 0, 5]), torch.tensor([[19, 2], [-3, 0]]), "mask"])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_to_keep_tensors_keep_transformers_columns_in_every_row(keep, padded):
    """A tensor of columns for every row, columns per row, or a boolean mask (flattened), as
    transformers' slice_logits_to_keep reads them, on a batch of two, cold and over a cached prefix."""
    ref, model = tiny_pair()
    ids = torch.stack([torch.arange(3, 23), torch.arange(40, 60)])
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0  # left padding: its logits are zero in Trellis, the padding token's in transformers
    if isinstance(keep, str):
        keep = torch.zeros(2, 20, dtype=torch.bool)
        keep[0, [4, 19]] = keep[1, [7]] = True
    real = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, logits_to_keep=keep).logits
        for _ in range(2):  # the second forward is served the first's full blocks
            got = model(ids, attention_mask=mask, logits_to_keep=keep).logits
            assert got.shape == want.shape
            if keep.dtype == torch.bool:
                kept_real = real[keep]
            else:
                cols = keep.expand(2, -1) % 20
                kept_real = real.gather(1, cols)
            torch.testing.assert_close(got[kept_real], want[kept_real])
            assert not got[~kept_real].any()


@pytest.mark.parametrize(("keep", "message"), [
    (torch.tensor([0, 20]), "logits_to_keep column 20 is out of range for an input of 20 columns"),
    (torch.tensor([-21]), "logits_to_keep column -21 is out of range for an input of 20 columns"),
    (torch.tensor([1.0]), r"logits_to_keep must be an int, .* got a torch.float32 tensor of shape \(1,\)"),
    (torch.zeros(3, 2, dtype=torch.long), r"got a torch.int64 tensor of shape \(3, 2\)"),
    (torch.ones(1, 19, dtype=torch.bool), r"a boolean logits_to_keep must be \[batch, seq_len\] = \(1, 20\)"),
])
def test_logits_to_keep_out_of_range_or_malformed_is_named(keep, message):
    ref, model = tiny_pair()
    ids = warm(model, ref)
    before = model.prefix_cache.stats()
    with pytest.raises(ValueError, match=message):
        model(ids, logits_to_keep=keep)
    still_works(model, ref, ids, before)


def test_a_numpy_logits_to_keep_is_refused():
    """transformers reads an int as a count of last columns, but indexes with anything else: a NumPy
    integer k would give column k's logits alone, [B, V]. Trellis refuses it, not guessing which was meant."""
    ref, model = tiny_pair()
    ids = warm(model, ref)
    before = model.prefix_cache.stats()
    assert ref(ids, logits_to_keep=np.int64(2)).logits.shape == (1, 256)  # what transformers makes of it
    with pytest.raises(TypeError, match=r"logits_to_keep must be an int or a tensor, got int64 np.int64\(2\)"):
        model(ids, logits_to_keep=np.int64(2))
    still_works(model, ref, ids, before)

@pytest.mark.parametrize("bad_id", [-1, 256, 10_000])
def test_token_ids_outside_the_vocabulary(bad_id):
    ref, model = tiny_pair()
    ids = warm(model, ref)
    before = model.prefix_cache.stats()
    bad = torch.tensor([[5, 6, bad_id, 7]])
    with pytest.raises(ValueError, match=f"token id {bad_id} is outside the vocabulary"):
        model(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(bad, max_new_tokens=2)
    still_works(model, ref, ids, before)


def test_prompt_that_cannot_fit_in_the_pool():
    ref, model = tiny_pair(num_blocks=12)  # 48 tokens of KV
    ids = warm(model, ref)
    before = model.prefix_cache.stats()
    with pytest.raises(OutOfBlocksError, match="KV cache full"):
        model(torch.arange(3, 103)[None])
    with pytest.raises(OutOfBlocksError, match="KV cache full"):
        model.generate(torch.arange(3, 103)[None], max_new_tokens=2)
    still_works(model, ref, ids, before)


@pytest.mark.skipif(CACHE_ARG != "cache", reason="before transformers 5.24 the cache has one name")
def test_a_cache_under_both_names_is_refused():
    _, model = tiny_pair()
    ids = torch.arange(3, 10)[None]
    handle = model(ids).past_key_values
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, :1], past_key_values=handle, cache=handle)
    with pytest.raises(ValueError, match="not both"):  # (transformers' generate() would warn and take `cache`)
        model.generate(ids, past_key_values=handle, cache=handle, max_new_tokens=2)
    assert len(handle.seqs[0].token_ids) == ids.shape[1]  # the session is unchanged
    model.prefix_cache.check_integrity()


def test_foreign_past_key_values_and_ambiguous_inputs_are_refused():
    ref, model = tiny_pair()
    ids = torch.arange(3, 10)[None]
    with pytest.raises(TypeError, match="PagedKVCache"):
        model(ids, past_key_values=ref(ids).past_key_values)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=torch.zeros(1, 7, 64))
    with pytest.raises(ValueError, match="4D attention masks are not supported"):
        model(ids, attention_mask=torch.ones(1, 1, 7, 7))
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(ids, output_attentions=True)
    model.prefix_cache.check_integrity()


def test_crop_refuses_what_it_cannot_do_and_changes_nothing():
    _, model = tiny_pair()
    out = model.generate(torch.arange(3, 13)[None], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    handle = out[CACHE_ARG]
    tokens, columns = list(handle.seqs[0].token_ids), handle.get_seq_length()
    with pytest.raises(ValueError, match="minus the number of tokens"):
        handle.crop(2)  # transformers' old absolute-length convention
    with pytest.raises(ValueError, match=f"shortest row holds {len(tokens)}"):
        handle.crop(-len(tokens) - 1)
    with pytest.raises(TypeError, match="an integer"):
        handle.crop(-1.5)
    assert handle.seqs[0].token_ids == tokens and handle.get_seq_length() == columns
    handle.crop(torch.tensor(-2))  # as transformers' caches take it (a 0-d tensor broke every later release)
    handle.crop(-2)
    assert handle.seqs[0].token_ids == tokens[:-4] and handle.get_seq_length() == columns - 4
    handle.release()
    model.prefix_cache.check_integrity()
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_another_caches_session_is_refused_and_changes_nothing():
    """A session holds block ids of its own pool: releasing, forking, truncating or extending it
    through another model's cache would free or share that cache's blocks (double frees after)."""
    ref, model = tiny_pair()
    _, other = tiny_pair()
    ids = warm(model, ref)
    before = model.prefix_cache.stats()
    foreign = other.prefix_cache.admit(list(range(100, 130)))
    manager = model.prefix_cache
    for call in (lambda: manager.release(foreign), lambda: manager.fork(foreign),
                 lambda: manager.truncate([foreign], [4]), lambda: manager.append(foreign, [5])):
        with pytest.raises(ValueError, match="belongs to another KV cache"):
            call()
    other.prefix_cache.release(foreign)
    other.prefix_cache.check_integrity()
    still_works(model, ref, ids, before)


def test_other_malformed_forward_inputs_are_named():
    ref, model = tiny_pair()
    ids = warm(model, ref)
    before = model.prefix_cache.stats()
    prompt = torch.arange(3, 7)[None]
    with torch.no_grad():
        # transformers reads such a mask from its first columns, Trellis read its last: refused instead
        with pytest.raises(ValueError, match="attention_mask has 6 columns, more than the cache's 0 and the input's 4"):
            model(prompt, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
        with pytest.raises(TypeError, match="position_ids must hold integer positions, got torch.float32"):
            model(prompt, position_ids=torch.tensor([[0.0, 1.5, 2.0, 3.0]]))
    with pytest.raises(TypeError, match="not bytes: tokenize it first"):
        Engine(model).add(b"abc")
    with pytest.raises(TypeError, match="got a set, which has no order"):
        model.generate_batch([{5, 6, 7}], max_new_tokens=2)
    still_works(model, ref, ids, before)
    manager = model.prefix_cache
    with pytest.raises(ValueError, match="the cpp kernels take float32, float16 and bfloat16, not float64"):
        model.double().configure_cache(backend="cpp")
    assert model.prefix_cache is not manager  # (the conversion's rebuild) and the settings unchanged:
    assert model.runner.settings.backend is None


# --- the cache handle transformers holds ---------------------------------------------------------


def _prefilled(model, ref, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask)[CACHE_ARG], ref(ids, attention_mask=mask)[CACHE_ARG]


@pytest.mark.parametrize("change", ["a real past column marked padding", "a padding past column marked real"])
def test_a_mask_that_marks_past_columns_otherwise_than_their_forward_is_refused(change):
    """The sessions hold K/V of the real tokens only: transformers would mask the past anew, so
    Trellis refuses (naming the column) where it used to attend as before, and the cache goes on
    with the right mask as transformers' does."""
    ref, model = tiny_pair()
    ids, nxt = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0)), torch.tensor([[7], [9]])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # row 0 left-padded
    cache, ref_cache = _prefilled(model, ref, ids, mask)
    wrong = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    if change.startswith("a real"):
        wrong[1, 5] = 0
        column, row = 5, 1
    else:
        wrong[0, 1] = 1
        column, row = 1, 0
    with torch.no_grad():
        with pytest.raises(ValueError, match=f"attention_mask marks past column {column} of row {row}"):
            model(nxt, attention_mask=wrong, **{CACHE_ARG: cache})
        right = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        got = model(nxt, attention_mask=right, **{CACHE_ARG: cache}).logits
        want = ref(nxt, attention_mask=right, **{CACHE_ARG: ref_cache}).logits
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)  # (row 0's padded columns: transformers' own)
    with torch.no_grad(), pytest.raises(ValueError, match="batch of 1 rows continues a cache of 2"):
        model(nxt[:1], attention_mask=torch.ones(1, 12, dtype=torch.long), **{CACHE_ARG: cache})  # the batch, first
    del cache
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_rows_selected_or_repeated_continue_as_transformers_caches_do():
    ref, model = tiny_pair()
    ids, nxt = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(1)), torch.tensor([[7], [9]])
    cache, ref_cache = _prefilled(model, ref, ids)
    mask_cache, ref_mask_cache = _prefilled(model, ref, ids)
    for handle in (mask_cache, ref_mask_cache):  # a boolean mask keeps the rows it marks
        handle.batch_select_indices(torch.tensor([False, True]))
    with torch.no_grad():
        got, want = model(nxt[1:], **{CACHE_ARG: mask_cache}).logits, ref(nxt[1:], **{CACHE_ARG: ref_mask_cache}).logits
    assert got.shape == want.shape == (1, 1, 256)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    del mask_cache
    for handle in (cache, ref_cache):
        handle.batch_select_indices(torch.tensor([1, 0]))
    with torch.no_grad():
        got, want = model(nxt, **{CACHE_ARG: cache}).logits, ref(nxt, **{CACHE_ARG: ref_cache}).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for handle in (cache, ref_cache):
        handle.batch_repeat_interleave(2)
    nxt = torch.tensor([[5], [6], [7], [8]])
    with torch.no_grad():
        got, want = model(nxt, **{CACHE_ARG: cache}).logits, ref(nxt, **{CACHE_ARG: ref_cache}).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with pytest.raises(IndexError, match="row indices"):
        cache.reorder_cache(torch.tensor([0, -1, 1, 2]))
    with pytest.raises(NotImplementedError, match="release"):
        cache.reset()
    with pytest.raises(TypeError, match="deepcopy"):
        copy.copy(cache)
    del cache
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


def test_use_cache_false_leaves_a_callers_cache_going_as_transformers_does():
    ref, model = tiny_pair()
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    cache, ref_cache = _prefilled(model, ref, ids)
    with torch.no_grad():
        out = model(torch.tensor([[7]]), use_cache=False, **{CACHE_ARG: cache})
        ref(torch.tensor([[7]]), use_cache=False, **{CACHE_ARG: ref_cache})
        assert getattr(out, CACHE_ARG) is None and cache.get_seq_length() == ref_cache.get_seq_length() == 11
        got, want = model(torch.tensor([[8]]), **{CACHE_ARG: cache}).logits, ref(torch.tensor([[8]]),
                                                                                 **{CACHE_ARG: ref_cache}).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_release_interrupted_part_way_leaves_the_rest_queued(monkeypatch):
    _, model = tiny_pair()
    with torch.no_grad():
        cache = model(torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(3)))[CACHE_ARG]
    manager = model.prefix_cache
    release = manager.release
    calls = []

    def interrupted_once(seq, commit=True):
        calls.append(seq)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return release(seq, commit)

    monkeypatch.setattr(manager, "release", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        cache.release()
    monkeypatch.setattr(manager, "release", release)
    assert manager.stats()["live_sessions"] == 0  # the rest were queued, and stats releases them
    manager.check_integrity()


def test_a_released_cache_is_refused_by_name():
    _, model = tiny_pair()
    with torch.no_grad():
        cache = model(torch.arange(3, 12)[None])[CACHE_ARG]
        cache.release()
        with pytest.raises(ValueError, match=r"was released \(release\(\) ended its sessions\)"):
            model(torch.tensor([[5]]), **{CACHE_ARG: cache})
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_autocast_is_refused_by_name_and_changes_nothing():
    """Under ``torch.autocast`` transformers computes some layers in another dtype, which the paged
    kernels and fused layers cannot follow: refused, rather than answered in the model's dtype."""
    ref, model = tiny_pair()
    ids = torch.arange(3, 20)[None]
    model.generate(ids, max_new_tokens=2, do_sample=False)
    before = model.prefix_cache.stats()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for call in (lambda: model(ids), lambda: model.generate(ids, max_new_tokens=2, do_sample=False)):
            with pytest.raises(ValueError, match=r"torch.autocast is not supported: Trellis runs every layer in the "
                                                 r"model's dtype \(float32\)"):
                call()
    still_works(model, ref, ids, before)
