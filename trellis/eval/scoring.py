"""Log-likelihood of continuations, each distinct context computed once (lm-eval semantics).

Requests are grouped by context. Each context is prefilled once, on top of whatever prefix the
radix cache already holds (say, a few-shot preamble shared by every document), and its last
position gives the log-probability of every continuation's first token. The rest of each
continuation then runs on a fork of its context's session (full blocks shared, the partial
tail block copied), so it computes only its own tokens. A context with a single continuation
(a rolling window, a lone question) runs both in one sequence. lm-eval's HF backend instead
runs the whole context again for every answer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from trellis.cache.manager import KVCacheManager, PagedSequence
from trellis.models.llama import TrellisLlama
from trellis.runner import PagedModelRunner, runner_of
from trellis.utils import token_ids

LM_HEAD_ROWS = 256  # rows per lm_head matmul: keeps the [rows, vocab] logits small


@dataclass(eq=False)
class _Group:
    """The requests that share one (truncated) context."""

    context: list[int]
    members: list[int] = field(default_factory=list)  # request indices


def max_length_for(model: TrellisLlama, max_length: int | None) -> int:
    """``max_length``, checked, or by default the longest input the model takes
    (``max_position_embeddings``, as lm-eval reads it)."""
    if max_length is None:
        return model.config.max_position_embeddings
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer (or None: the model's positions), got {max_length!r}")
    return max_length


def score_continuations(
    model: TrellisLlama,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_length: int | None = None,
    max_batch_tokens: int = 2048,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """``(log P(continuation | context), is_greedy)`` for each ``(context, continuation)`` of token ids.

    ``is_greedy`` says whether greedy decoding from the context yields exactly the continuation.
    Both parts must be non-empty. As in lm-eval, a request of more than ``max_length + 1`` tokens
    (default: the model's ``max_position_embeddings``) loses context tokens on the left. One
    forward packs about ``max_batch_tokens`` new tokens. The contexts' full blocks stay in the
    prefix cache.
    """
    max_length = max_length_for(model, max_length)
    runner = runner_of(model)
    groups: dict[tuple[int, ...], _Group] = {}
    continuations: list[list[int]] = []
    for i, (context, continuation) in enumerate(requests):
        # Plain ints: they become the prefix cache's keys (a float or a tensor there would never match).
        context = token_ids(context, f"request {i}: context")
        continuation = token_ids(continuation, f"request {i}: continuation")
        if not context or not continuation:
            raise ValueError(f"request {i}: context and continuation must both be non-empty")
        try:
            runner.check_token_ids([context, continuation])
        except ValueError as exc:
            raise ValueError(f"request {i}: {exc}") from None
        if len(continuation) > max_length:
            raise ValueError(f"request {i}: continuation of {len(continuation)} tokens exceeds max_length {max_length}")
        context = (context + continuation)[-(max_length + 1):][:-len(continuation)]
        groups.setdefault(tuple(context), _Group(context)).members.append(i)
        continuations.append(continuation)
    scores: list[list] = [[0.0, True] for _ in continuations]  # [log-prob, greedy] per request
    manager = runner.prefix_cache
    ordered = [groups[key] for key in sorted(groups)]  # contexts sharing a prefix become neighbours
    # no_grad, not inference_mode: a step's attention plan is checked against its batch tensors'
    # version counters, which inference tensors lack (the C++ kernel would plan in every layer).
    with torch.no_grad(), tqdm(total=len(scores), desc="scoring", disable=not progress) as bar:
        for chunk in _chunks(ordered, manager, continuations, max_batch_tokens):
            with runner.lock:  # one forward at a time on the shared pool, as the engine does
                _score_chunk(runner, manager, chunk, continuations, scores, max_batch_tokens)
            bar.update(sum(len(group.members) for group in chunk))
    return [(logprob, greedy) for logprob, greedy in scores]


def _chunks(groups: list[_Group], manager: KVCacheManager, continuations: list[list[int]],
            budget: int) -> Iterator[list[_Group]]:
    """Runs of consecutive groups scored together: about ``budget`` new tokens each, and never two
    contexts sharing a full block that is not cached yet, so a shared prefix is computed once
    and the contexts after it hit the cache. Evaluated lazily: each run sees the cache as the
    runs before it left it."""
    pending = deque(groups)
    while pending:
        chunk: list[_Group] = []
        tokens = 0
        while pending:
            group = pending[0]
            cached = manager.admission_cost(group.context).cached_tokens
            cost = len(group.context) - cached + sum(len(continuations[i]) - 1 for i in group.members)
            if chunk and (tokens + cost > budget
                          or _shared_tokens(chunk[-1].context, group.context, manager.block_size) > cached):
                break
            chunk.append(pending.popleft())
            tokens += cost
        yield chunk


def _shared_tokens(earlier: list[int], tokens: list[int], block_size: int) -> int:
    """The whole blocks of ``tokens`` that admission could take from ``earlier``'s cached blocks
    (never all of ``tokens``: admission leaves at least one token to compute)."""
    limit = min(len(earlier), len(tokens) - 1)
    n = 0
    while n < limit and earlier[n] == tokens[n]:
        n += 1
    return n // block_size * block_size


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

        # The rest of a shared context's continuations: their tokens but the last, each on a fork.
        forks: list[tuple[int, PagedSequence]] = []
        for group, context in zip(chunk, contexts):
            if len(group.members) == 1:
                continue  # its continuation ran with the context
            for i in group.members:
                if len(continuations[i]) > 1:
                    fork = manager.fork(context)
                    sessions.append(fork)
                    manager.append(fork, continuations[i][:-1])
                    forks.append((i, fork))
        for part in _packed(forks, budget):
            hidden = runner.forward(manager, [fork for _, fork in part]).hidden
            owners = [i for i, _ in part for _ in continuations[i][1:]]
            _add_scores(runner, hidden, [t for i, _ in part for t in continuations[i][1:]], owners, scores)
    finally:
        for seq in sessions:
            manager.release(seq)


def _packed(forks: list[tuple[int, PagedSequence]], budget: int) -> Iterator[list[tuple[int, PagedSequence]]]:
    """Consecutive forks with about ``budget`` new tokens per forward."""
    part: list[tuple[int, PagedSequence]] = []
    tokens = 0
    for item in forks:
        if part and tokens + item[1].num_new > budget:
            yield part
            part, tokens = [], 0
        part.append(item)
        tokens += item[1].num_new
    if part:
        yield part


def _add_scores(runner: PagedModelRunner, hidden: torch.Tensor, targets: list[int], owners: list[int],
                scores: list[list]) -> None:
    """Add the log-probability of ``targets[r]`` under the logits of ``hidden[r]`` to the score of
    request ``owners[r]``, and clear its greedy flag unless the target is the argmax."""
    target = torch.tensor(targets, device=hidden.device)  # [R]
    logprobs, greedy = [], []
    for h, t in zip(hidden.split(LM_HEAD_ROWS), target.split(LM_HEAD_ROWS)):
        logits = runner.logits(h).float()  # [r, V]
        # log_softmax, not logsumexp: the same rounding as transformers and lm-eval's HF backend.
        logprobs.append(torch.log_softmax(logits, -1).gather(1, t[:, None])[:, 0])  # [r]
        greedy.append(logits.argmax(-1) == t)  # [r]
    for i, logprob, is_greedy in zip(owners, torch.cat(logprobs).tolist(), torch.cat(greedy).tolist()):
        scores[i][0] += logprob
        scores[i][1] = scores[i][1] and is_greedy
