"""Ctrl-C anywhere in the prefix cache's bookkeeping leaves it whole: SIGINT is raised at every
line of the cache modules an operation runs in turn (the way a real Ctrl-C lands between two
bytecodes), and after the KeyboardInterrupt the cache's invariants hold, nothing is left held,
and prompts that share the interrupted ones' prefixes get transformers' answers."""

import copy
import functools
import gc
import signal
import sys
from pathlib import Path

import pytest
import torch

from tests.models import tiny_pair
from trellis.models.paged_cache import CACHE_ARG

# The modules whose lines a Ctrl-C may fall between: the cache's bookkeeping and its callers'.
WATCHED = tuple(str(Path(__file__).resolve().parents[1] / "trellis" / part)
                for part in ("cache", "models/paged_cache.py", "runner/runner.py", "engine"))
SYSTEM = list(range(3, 30))  # 27 tokens: whole blocks of 4, and a tail


def ids(*tokens: int) -> torch.Tensor:
    return torch.tensor([SYSTEM + list(tokens)])


def lines_run(call) -> int:
    """How many lines of the watched modules ``call`` runs."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename.startswith(WATCHED) else None)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def interrupted_at(line: int, call) -> bool:
    """Run ``call`` with SIGINT raised at its ``line``-th watched line: False where it ran fewer
    lines (a warmer cache runs fewer), else True once its KeyboardInterrupt came."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if count == line:
                signal.raise_signal(signal.SIGINT)
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename.startswith(WATCHED) else None)
    try:
        call()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
    assert count < line, f"SIGINT raised at line {line} of {count}, and no KeyboardInterrupt"
    return False


def generate(model, prompt, **settings):
    return model.generate(prompt, max_new_tokens=3, do_sample=False, **settings)


def held_handle(model):
    return model(ids(40, 41), use_cache=True, logits_to_keep=1)[CACHE_ARG]


OPERATIONS = {
    "generate": lambda model, handle, path: generate(model, ids(50, 51)),
    "beam search": lambda model, handle, path: generate(model, ids(52), num_beams=2),
    "prompt lookup": lambda model, handle, path: generate(model, ids(*SYSTEM[:6]), prompt_lookup_num_tokens=3),
    "release": lambda model, handle, path: handle.release(),
    "crop and continue": lambda model, handle, path: (handle.crop(-3), model(ids(40, 41)[:, -3:], **{CACHE_ARG: handle})),
    "fork": lambda model, handle, path: copy.deepcopy(handle).release(),
    "clear": lambda model, handle, path: model.prefix_cache.clear(),
    "load": lambda model, handle, path: model.load_prefix_cache(path),
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_ctrl_c_anywhere_leaves_the_cache_whole(operation, tmp_path):
    ref, model = tiny_pair(num_blocks=24)  # small: eviction, tails and copies all happen
    with torch.no_grad():
        generate(model, ids(60, 61, 62, 63, 64))
        path = tmp_path / "prefixes.safetensors"
        model.save_prefix_cache(path)
        generate(model, ids(70))
        want = {tokens: generate(ref, ids(*tokens)) for tokens in [(50, 51), (40, 41, 42), (60, 61, 62, 9)]}
        run = OPERATIONS[operation]
        total = lines_run(lambda: run(model, held_handle(model), path))
        gc.freeze()  # each collection below then walks only what the interrupted call left, not the whole suite's
        try:
            for line in range(1, total + 1, max(1, total // 40)):
                call = functools.partial(run, model, held_handle(model), path)
                interrupted_at(line, call)
                model.prefix_cache.check_integrity()
                del call  # (and the handle it held)
                gc.collect()
                stats = model.prefix_cache.stats()
                assert stats["live_sessions"] == 0, (line, stats)
                assert stats["free_blocks"] + stats["cached_blocks"] + stats["tail_blocks"] == stats["total_blocks"]
                for tokens, expected in want.items():
                    assert torch.equal(generate(model, ids(*tokens)), expected), (line, tokens)
        finally:
            gc.unfreeze()
