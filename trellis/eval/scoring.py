"""Log-likelihood of continuations, each distinct context computed once (lm-eval semantics).

Requests are grouped by context. Each context is prefilled once, on top of whatever prefix the
radix cache already holds (say, a few-shot preamble shared by every document), and its last
position gives the log-probability of every continuation's first token. The rest of each
continuation then runs on a fork of its context's session (full blocks shared, the partial
tail block copied), so it computes only its own tokens. A context with a single continuation
(a rolling window, a lone question) runs both in one sequence. lm-eval's HF backend instead
runs the whole context again for every answer.

Each forward is planned against the blocks the KV pool can give at that moment (free, or held
only by the radix cache), so a small pool means smaller forwards, never a failure, as long as
each request fits the pool by itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from trellis.cache.block_pool import OutOfBlocksError
from trellis.cache.manager import KVCacheManager, PagedSequence, blocks_for_fork
from trellis.cache.radix import shared_whole_blocks
from trellis.eval.requests import request_pairs
from trellis.models.llama import TrellisLlama
from trellis.runner import PagedModelRunner, runner_of
from trellis.utils import cdiv, is_positive_int, token_ids


@dataclass(eq=False)
class _Group:
    """The requests that share one (truncated) context."""

    context: list[int]
    members: list[int] = field(default_factory=list)  # request indices


def max_length_for(model: TrellisLlama | PagedModelRunner, max_length: int | None) -> int:
    """``max_length``, checked, or by default the longest input the model takes
    (``max_position_embeddings``, as lm-eval reads it; with LongRoPE its original length:
    ``runner.max_positions``)."""
    if max_length is None:
        return runner_of(model).max_positions()
    if not is_positive_int(max_length):
        raise ValueError(f"max_length must be a positive integer (or None: the model's positions), got {max_length!r}")
    return max_length


def check_max_batch_tokens(max_batch_tokens: int) -> int:
    """``max_batch_tokens``, checked: a positive integer."""
    if not is_positive_int(max_batch_tokens):
        raise ValueError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}")
    return max_batch_tokens


def score_continuations(
    model: TrellisLlama | PagedModelRunner,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_length: int | None = None,
    max_batch_tokens: int = 2048,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """``(log P(continuation | context), is_greedy)`` for each ``(context, continuation)`` of token ids.

    ``is_greedy`` says whether greedy decoding from the context yields exactly the continuation.
    Both parts must be non-empty. As in lm-eval, a request of more than ``max_length + 1`` tokens
    (default: the positions the model takes, ``max_length_for``) loses context tokens on the left. One
    forward packs about ``max_batch_tokens`` new tokens, and no more sessions than the KV pool
    has blocks for now (free or evictable): any set of requests that each fit the pool alone is
    scored, and a request that cannot fit it is an ``OutOfBlocksError`` before anything runs.
    The contexts' full blocks stay in the prefix cache.
    """
    max_length = max_length_for(model, max_length)
    check_max_batch_tokens(max_batch_tokens)
    runner = runner_of(model)
    manager = runner.prefix_cache  # (its geometry; each chunk takes the cache as it is then)
    groups: dict[tuple[int, ...], _Group] = {}
    continuations: list[list[int]] = []
    for i, (context, continuation) in enumerate(request_pairs(requests, "continuation")):
        # Plain ints: they become the prefix cache's keys (a float or a tensor there would never match).
        context = token_ids(context, f"request {i}: context")
        continuation = token_ids(continuation, f"request {i}: continuation")
        if not context:
            raise ValueError(f"request {i}: the context has no tokens: condition on a prefix token (BOS) instead")
        if not continuation:
            raise ValueError(f"request {i}: the continuation has no tokens, so there is nothing to score")
        try:
            runner.check_token_ids([context, continuation])
        except ValueError as exc:
            raise ValueError(f"request {i}: {exc}") from None
        if len(continuation) > max_length:
            raise ValueError(f"request {i}: continuation of {len(continuation)} tokens exceeds max_length {max_length}")
        context = (context + continuation)[-(max_length + 1):][:-len(continuation)]
        # The model sees every token but the last; in one sequence that is the least a request needs.
        seen = len(context) + len(continuation) - 1
        if not manager.can_ever_hold(seen):
            raise OutOfBlocksError(
                f"request {i}: {seen} tokens need {cdiv(seen, manager.block_size)} blocks of {manager.block_size}, "
                f"the KV pool has {manager.pool.num_blocks}; use a larger num_blocks / kv_cache_memory or a "
                "smaller max_length")
        groups.setdefault(tuple(context), _Group(context)).members.append(i)
        continuations.append(continuation)
    scores: list[list] = [[0.0, True] for _ in continuations]  # [log-prob, greedy] per request
    pending = deque(groups[key] for key in sorted(groups))  # contexts sharing a prefix become neighbours
    # no_grad, not inference_mode: a step's attention plan is checked against its batch tensors'
    # version counters, which inference tensors lack (the C++ kernel would plan in every layer).
    with torch.no_grad(), tqdm(total=len(scores), desc="scoring", disable=not progress) as bar:
        while pending:
            # One forward at a time on the shared pool, as the engine does; planned under the same
            # lock, so the plan sees the pool as its forwards will.
            with runner.lock:
                # Read again: weights changed between chunks (another thread's) rebuild the cache.
                manager = runner.prefix_cache
                chunk = _next_chunk(pending, manager, continuations, max_batch_tokens)
                _score_chunk(runner, manager, chunk, continuations, scores, max_batch_tokens)
            bar.update(sum(len(group.members) for group in chunk))
    return [(logprob, greedy) for logprob, greedy in scores]


def _next_chunk(pending: deque[_Group], manager: KVCacheManager, continuations: list[list[int]],
                budget: int) -> list[_Group]:
    """Take the next run of consecutive groups to score together from ``pending``: about ``budget``
    new tokens, no more blocks at its peak (contexts, then one fork at a time) than the pool can
    give now, and never two contexts sharing a full block that is not cached yet, so a shared
    prefix is computed once and the contexts after it hit the cache.

    A group whose context and a fork do not fit the pool together is split into its requests,
    each scored in one sequence: no more blocks than the request alone (a fork copies the
    context's partial tail block). A lone request that does not fit is still taken: admitting
    it raises ``OutOfBlocksError``."""
    bs = manager.block_size
    room = manager.available_blocks()
    chunk: list[_Group] = []
    tokens = held = max_fork = matched_before = 0  # held: blocks the contexts take or lock
    while pending:
        group = pending[0]
        context, multi = group.context, len(group.members) > 1
        lone = [] if multi else continuations[group.members[0]][:-1]
        cost = manager.admission_cost(context + lone, max_reuse=len(context) - 1)
        shared = shared_whole_blocks(chunk[-1].context, context, bs) if chunk else 0
        if shared > cost.cached_tokens:
            break
        matched = cost.cached_tokens // bs
        # Cached blocks it takes count too (they stop being evictable), once for neighbours that share them.
        group_held = cost.new_blocks + matched - min(matched, matched_before, shared // bs)
        fork = 0
        if multi:
            # Committing the context locks a cached twin of its last full block, which admission
            # (leaving a token to compute) did not take; a lone session is released before the forks.
            group_held += manager.cached_tokens(context, max_tokens=len(context)) // bs - matched
            fork = max((_fork_blocks(len(context), len(continuations[i]), bs) for i in group.members
                        if len(continuations[i]) > 1), default=0)
        new_tokens = len(context) - cost.cached_tokens + sum(len(continuations[i]) - 1 for i in group.members)
        if chunk and (tokens + new_tokens > budget or held + group_held + max(max_fork, fork) > room):
            break
        pending.popleft()
        if not chunk and multi and group_held + fork > room:
            pending.extendleft(_Group(context, [i]) for i in reversed(group.members))
            continue
        chunk.append(group)
        tokens += new_tokens
        held += group_held
        max_fork = max(max_fork, fork)
        matched_before = matched
    return chunk


def _fork_blocks(context_tokens: int, continuation_tokens: int, block_size: int) -> int:
    """Blocks a fork of a computed context allocates to compute a continuation's tokens but the last."""
    return blocks_for_fork(context_tokens, context_tokens + continuation_tokens - 1, block_size)



def _score_chunk(runner: PagedModelRunner, manager: KVCacheManager, chunk: list[_Group], continuations: list[list[int]],
                 scores: list[list], budget: int) -> None:
    sessions: list[PagedSequence] = []
    try:
        # Prefill each context, and a lone continuation along with its context. A context's last
        # position predicts the first token of its continuations: admission must leave it to compute.
        for group in chunk:
            lone = continuations[group.members[0]][:-1] if len(group.members) == 1 else []
            sessions.append(manager.admit(group.context + lone, max_reuse=len(group.context) - 1))
        contexts = list(sessions)
        step = runner.forward(manager, contexts)
        rows, targets, owners = [], [], []
        for group, end in zip(chunk, step.batch.cu_seqlens_q[1:].tolist()):
            if len(group.members) == 1:
                i = group.members[0]
                rows += range(end - len(continuations[i]), end)
                targets += continuations[i]
                owners += [i] * len(continuations[i])
            else:
                rows += [end - 1] * len(group.members)
                targets += [continuations[i][0] for i in group.members]
                owners += group.members
        _add_scores(runner, step.hidden[rows], targets, owners, scores)

        # The rest of a shared context's continuations: their tokens but the last, each on a fork,
        # made a forward's worth at a time. Done sessions go first: their blocks become evictable.
        forks: deque[tuple[int, PagedSequence]] = deque()
        for group, context in zip(chunk, contexts):
            if len(group.members) == 1:
                manager.release(context)
            else:
                forks.extend((i, context) for i in group.members if len(continuations[i]) > 1)
        while forks:
            part = _next_part(forks, manager, continuations, budget)
            for i, context in part:
                fork = manager.fork(context)
                sessions.append(fork)
                manager.append(fork, continuations[i][:-1])
            part_sessions = sessions[-len(part):]
            hidden = runner.forward(manager, part_sessions).hidden
            owners = [i for i, _ in part for _ in continuations[i][1:]]
            _add_scores(runner, hidden, [t for i, _ in part for t in continuations[i][1:]], owners, scores)
            for fork in part_sessions:
                manager.release(fork)
    finally:
        for seq in sessions:
            manager.release(seq)


def _next_part(forks: deque[tuple[int, PagedSequence]], manager: KVCacheManager, continuations: list[list[int]],
               budget: int) -> list[tuple[int, PagedSequence]]:
    """Take the next forks to run in one forward from ``forks`` (request, context session): about
    ``budget`` new tokens, and the blocks the pool can give now. The first is always taken."""
    room = manager.available_blocks()
    part: list[tuple[int, PagedSequence]] = []
    tokens = blocks = 0
    while forks:
        i, context = forks[0]
        new_tokens = len(continuations[i]) - 1
        new_blocks = _fork_blocks(len(context.token_ids), len(continuations[i]), manager.block_size)
        if part and (tokens + new_tokens > budget or blocks + new_blocks > room):
            break
        part.append(forks.popleft())
        tokens += new_tokens
        blocks += new_blocks
    return part


def _add_scores(runner: PagedModelRunner, hidden: torch.Tensor, targets: list[int], owners: list[int],
                scores: list[list]) -> None:
    """Add the log-probability of ``targets[r]`` under the logits of ``hidden[r]`` to the score of
    request ``owners[r]``, and clear its greedy flag unless the target is the argmax."""
    target = torch.tensor(targets, device=hidden.device)  # [R]
    logprobs, greedy = [], []
    for offset, logits in runner.chunked_logits(hidden):
        logits, t = logits.float(), target[offset : offset + logits.shape[0]]  # [r, V], [r]
        # log_softmax, not logsumexp: the same rounding as transformers and lm-eval's HF backend.
        logprobs.append(torch.log_softmax(logits, -1).gather(1, t[:, None])[:, 0])  # [r]
        greedy.append(logits.argmax(-1) == t)  # [r]
    for i, logprob, is_greedy in zip(owners, torch.cat(logprobs).tolist(), torch.cat(greedy).tolist()):
        scores[i][0] += logprob
        scores[i][1] = scores[i][1] and is_greedy
