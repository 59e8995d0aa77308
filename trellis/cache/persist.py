"""Save the radix tree and its blocks to a safetensors file, and load them back.

A file records what its K/V are valid for (``model_fingerprint``: every weight and buffer, the
config and the kernels that computed them; the dtype, block size and KV geometry) and a checksum
of its tensors. Loading checks every header field, every tensor's name, dtype and shape, and the
tree itself (what ``save_prefix_cache`` could have written) before touching the cache; then it
allocates every block it needs in one request, and undoes what it did if anything later fails
(only the colder prefixes evicted to make room stay evicted), so it applies fully or not at all
and never leaks a block. Prefixes already cached are kept; the file's duplicates of them are dropped.

Layout: ``kv [L, 2, n + m, S, Hkv, D]`` (the nodes' n blocks, then the m tails'), ``tokens int64
[n * S]``, per node, parents before children, ``node_parent int64 [N]`` (-1: the root) and
``node_num_blocks int64 [N]`` (its edge: the next blocks of ``kv`` and ``tokens``), and per tail
(a partly filled block kept after a node's path) ``tail_node int64 [m]`` (-1: the root),
``tail_num_tokens int64 [m]`` (1 to S - 1) and ``tail_tokens int64`` (theirs, one after another).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trellis.cache.block_pool import OutOfBlocksError
from trellis.cache.manager import KVCacheManager
from trellis.cache.radix import RadixCache, TailMatch
from trellis.utils import outside_vocabulary

FORMAT = "trellis-prefix-cache/6"
TENSORS = ("kv", "tokens", "node_parent", "node_num_blocks", "tail_node", "tail_num_tokens", "tail_tokens")


class PrefixCacheFileError(ValueError):
    """A saved prefix cache that does not fit this model or cache, or is damaged."""


# --- what a file's K/V are valid for -------------------------------------------------------------


def model_fingerprint(module: torch.nn.Module, config: Mapping[str, object], linear_kernel: str, *,
                      adapters: str, hardware: str, modules: str) -> dict[str, str]:
    """An exact identity of the computation that produced a model's K/V, in parts that a mismatch
    can name (``DIGESTS``): ``weights``, every byte of every parameter and buffer, persistent or not
    (RoPE's ``inv_freq`` is not in the state dict), with its name, dtype and shape; ``config``, the
    settings that shape the computation (JSON-serialisable); ``adapters``, which adapters run and at
    what scales; ``modules``, what the modules run besides their tensors
    (``weights_watcher.module_identity``: classes, settings such as RMSNorm's eps, hooks); and,
    named as they are, the ``hardware`` the kernels run on (``loading.hardware_identity``) and
    ``linear_kernel`` itself, since both change how results round.

    Tensors hash by value, not layout (oneDNN stores weights input-major). A tensor shared under
    two names (tied embeddings) is read once. SmolLM2-135M in fp32 (538 MB): ~0.8 s on the 2-core
    reference machine, paid at each save and load.
    """
    # Parameters and buffers by their state-dict names, read in place (no state-dict copies).
    tensors = {name: t.detach() for name, t in (*module.named_parameters(remove_duplicate=False),
                                                *module.named_buffers(remove_duplicate=False))}
    unique = {_storage_key(t): t for t in tensors.values()}
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # hashlib releases the GIL
        digests = dict(zip(unique, pool.map(_tensor_digest, unique.values())))
    weights = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        weights.update(digests[_storage_key(tensor)])
    settings = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    return {"hardware": hardware, "linear_kernel": linear_kernel, "config": settings.hexdigest(),
            "adapters": hashlib.sha256(adapters.encode()).hexdigest(), "weights": weights.hexdigest(),
            "modules": hashlib.sha256(modules.encode()).hexdigest()}


# The fingerprint's digests, by what a mismatch of each means.
DIGESTS = {"config": "settings (config)", "adapters": "adapters (which run, at what scales)",
           "weights": "weights or buffers",
           "modules": "modules (their classes, settings such as RMSNorm's eps or attention's scale, or hooks)"}


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for two views of the same values."""
    return tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)  # a copy only if strided
    return hashlib.sha256(data.numpy()).digest()


def _header(manager: KVCacheManager, fingerprint: Mapping[str, str]) -> dict[str, str]:
    num_layers, _, _, block_size, num_kv_heads, head_dim = manager.pool.kv.shape
    return {
        "format": FORMAT,  # first: another version is refused as such, whatever its other fields
        "dtype": str(manager.pool.kv.dtype),
        "block_size": str(block_size),
        "geometry": f"layers={num_layers},kv_heads={num_kv_heads},head_dim={head_dim}",
        **fingerprint,  # after the dtype, which changes the weights' digest too
    }


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# --- save ----------------------------------------------------------------------------------------


def check_save_path(path: str | os.PathLike) -> Path:
    """``path``, where a prefix cache can be saved: a saved prefix cache (of any model or version), an
    empty file or nothing yet, in a directory that exists. Anything else is never replaced: a
    mistyped path must not cost the user a file of weights or notes."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a directory, a device
        raise ValueError(f"{path} exists and is not a regular file: name a file to save the prefix cache to")
    if path.is_file() and path.stat().st_size and not is_prefix_cache_file(path):
        raise ValueError(f"{path} exists and is not a saved prefix cache: it is not replaced; name another file "
                         "to save the prefix cache to")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no directory {path.parent} to save the prefix cache {path.name} in")
    return path


def is_prefix_cache_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a prefix cache saved by Trellis, of any format version (its header alone is read)."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format", "").startswith(FORMAT.split("/")[0] + "/")
    except (SafetensorError, OSError):
        return False


def save_prefix_cache(manager: KVCacheManager, path: str | os.PathLike, fingerprint: Mapping[str, str]) -> int:
    """Write every cached prefix and tail to ``path`` (atomically); returns the number of blocks
    saved. ``fingerprint``: the ``model_fingerprint`` of the model that computed the cache."""
    path = check_save_path(path)
    with manager.lock:
        manager.release_pending()  # a finished session's tail joins the tree at its release
        nodes = list(manager.radix.nodes())  # parents before children
        index = {id(node): i for i, node in enumerate(nodes)}
        tails = [(index.get(id(node), -1), tokens, block) for node in manager.radix.every_node()
                 for tokens, block in node.tails.items()]
        blocks = [b for node in nodes for b in node.blocks] + [block for _, _, block in tails]
        kv = manager.pool.kv
        saved_kv = kv.index_select(2, torch.tensor(blocks, dtype=torch.int64, device=kv.device)).cpu()  # [L, 2, n, S, Hkv, D]
        # A tail block's slots past its tokens hold whatever the pool's block held before (an
        # evicted session's K/V, or never-written memory): zeroed, so a file carries its own
        # prompts' K/V only and the same cache always saves the same bytes.
        first_tail = len(blocks) - len(tails)
        for i, (_, tokens, _) in enumerate(tails):
            saved_kv[:, :, first_tail + i, len(tokens):] = 0
        tensors = {
            "kv": saved_kv,
            "tokens": torch.tensor([t for node in nodes for t in node.tokens], dtype=torch.int64),  # [n * S]
            "node_parent": torch.tensor([index.get(id(node.parent), -1) for node in nodes], dtype=torch.int64),
            "node_num_blocks": torch.tensor([len(node.blocks) for node in nodes], dtype=torch.int64),
            "tail_node": torch.tensor([i for i, _, _ in tails], dtype=torch.int64),
            "tail_num_tokens": torch.tensor([len(tokens) for _, tokens, _ in tails], dtype=torch.int64),
            "tail_tokens": torch.tensor([t for _, tokens, _ in tails for t in tokens], dtype=torch.int64),
        }
        metadata = {**_header(manager, fingerprint), "checksum": _checksum(tensors)}
    # A staging file of this save's own: two saves to one path (two processes) each rename a whole
    # file. The name's first 32 characters only, so that a name the file system takes has a staging
    # name it takes. A saved cache takes the umask's permissions, as any new file does: created here
    # to learn them, since safetensors writes its files private to the user.
    staging = path.with_name(f".{path.name[:32]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = staging.stat().st_mode
        save_file(tensors, staging, metadata=metadata)
        staging.chmod(mode)
        staging.replace(path)
    except BaseException:
        staging.unlink(missing_ok=True)  # a failed save leaves nothing behind
        raise
    return len(blocks)


# --- load ----------------------------------------------------------------------------------------


def load_prefix_cache(manager: KVCacheManager, path: str | os.PathLike, fingerprint: Mapping[str, str],
                      vocab_size: int) -> int:
    """Add the prefixes and tails saved in ``path`` that the cache does not hold yet; returns the
    number of blocks added. Only those take blocks from the pool (evicting colder prefixes if it
    must, never what the file and the cache share); a saved tail joins its node's unless the node
    already holds its tokens, and replaces a tail that holds fewer of them, as a finished
    session's tail does.

    ``fingerprint``: this model's ``model_fingerprint``; ``vocab_size``: token ids must be below it.
    Raises ``PrefixCacheFileError`` for a file of another format, model, dtype, block size or
    geometry, or a damaged or inconsistent one, and ``OutOfBlocksError`` if the pool cannot hold
    what it adds; either way the cache is unchanged. Any other failure (an interrupt) undoes the
    load, except the eviction of colder prefixes that made room for it.
    """
    metadata, tensors = _read(path)
    _check_header(metadata, _header(manager, fingerprint), path)
    if metadata["checksum"] != _checksum(tensors):
        raise PrefixCacheFileError(f"prefix cache file {path} is damaged (checksum mismatch)")
    _check_shapes(tensors, manager, path)
    paths = _node_paths(tensors, manager.block_size, vocab_size, path)
    tails = _tails(tensors, len(paths), manager.block_size, vocab_size, path)
    radix = manager.radix
    with manager.lock:
        manager.release_pending()
        held = [radix.held(path_tokens) for path_tokens, _ in paths]
        first_tail = tensors["kv"].shape[2] - len(tails)  # the tails' K/V come last in the file
        new = sorted({i for (_, path_blocks), (blocks, _) in zip(paths, held) for i in path_blocks[len(blocks):]})
        held_tails = [_held_tail(radix, paths[node_index][0] if node_index >= 0 else [], tokens)
                      for node_index, tokens in tails]
        new_tails = [t for t, tail in enumerate(held_tails) if tail is None]
        new += [first_tail + t for t in new_tails]
        # What the file shares with the cache stays while the pool makes room: its nodes locked,
        # the children whose first blocks hold its tails locked, the nodes' tails holding them spared.
        pins = [node for _, node in held] + [tail.node for tail in held_tails if tail is not None and not tail.loose]
        for node in pins:
            radix.lock(node)
        try:
            with radix.sparing([tail for tail in held_tails if tail is not None]):
                blocks = _allocate(manager, len(new), path)
        finally:
            for node in pins:
                radix.unlock(node)
        slot = dict(zip(new, blocks))  # the file's block -> the pool's
        before = radix.snapshot()
        replaced: list[int] = []  # the blocks of the tails the file's replace or cover: the tree's references, held
        try:
            manager.pool.write_blocks(blocks, tensors["kv"][:, :, new])
            for (path_tokens, path_blocks), (cached, _) in zip(paths, held):
                radix.insert(path_tokens, cached + [slot[i] for i in path_blocks[len(cached):]], replaced=replaced)
            for t in new_tails:
                node_index, tokens = tails[t]
                node = radix.node_at(paths[node_index][0] if node_index >= 0 else [])
                assert node is not None, "a tail's node path was inserted above"
                replaced += radix.add_tail(node, tokens, slot[first_tail + t], release=False)
        except BaseException:
            radix.restore(before)  # the replaced tails come back with the references kept for them
            # Freshly allocated blocks have no holder but us and, once adopted, the tree.
            manager.pool.decref([b for b in blocks if manager.pool.ref_counts[b] > 1])
            manager.pool.decref(blocks)
            raise
        manager.pool.decref(replaced)
        added = sum(manager.pool.ref_counts[b] > 1 for b in blocks)
        manager.pool.decref(blocks)  # the tree holds what it adopted
    return added


def _held_tail(radix: RadixCache, path: list[int], tokens: tuple[int, ...]) -> TailMatch | None:
    """Where the tree holds the K/V of ``tokens`` (fewer than a block) after ``path``: a child's
    first block or a tail of the node there that begins with them (``RadixCache.add_tail`` keeps
    nothing new then); None where it does not."""
    match = radix.peek([*path, *tokens], max_tokens=len(path) + len(tokens))
    held = (len(match.blocks) * radix.block_size == len(path) and match.tail is not None
            and match.tail.num_tokens == len(tokens))
    return match.tail if held else None


def _allocate(manager: KVCacheManager, n: int, path: str | os.PathLike) -> list[int]:
    """``n`` blocks for a load, or an ``OutOfBlocksError`` that names the file."""
    try:
        return manager.allocate(n)
    except OutOfBlocksError as exc:
        raise OutOfBlocksError(
            f"cannot load prefix cache file {path}: it adds {n} blocks of {manager.block_size} tokens that the "
            f"cache does not hold, and {manager.pool.num_free} are free and {manager.radix.evictable_blocks()} "
            f"evictable of {manager.pool.num_blocks}; load it into a larger pool (num_blocks / kv_cache_memory)"
        ) from exc


def _read(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 -- safe_open is not a mapping
    except (SafetensorError, OSError) as exc:
        raise PrefixCacheFileError(f"cannot read prefix cache file {path}: {exc}") from exc
    if sorted(tensors) != sorted(TENSORS):
        raise PrefixCacheFileError(f"prefix cache file {path} holds tensors {sorted(tensors)}, expected {sorted(TENSORS)}")
    return metadata, tensors


def _check_header(metadata: Mapping[str, str], expected: Mapping[str, str], path: str | os.PathLike) -> None:
    if metadata.get("format") != FORMAT:
        raise PrefixCacheFileError(f"prefix cache file {path} has format {metadata.get('format')!r}; this version "
                                   f"of trellis reads only {FORMAT!r} (save the cache again)")
    for key, value in expected.items():
        if metadata.get(key) == value:
            continue
        if key in DIGESTS:
            raise PrefixCacheFileError(f"prefix cache file {path} was computed by a model with other {DIGESTS[key]}: "
                                       f"its K/V do not hold for this one")
        raise PrefixCacheFileError(f"prefix cache file {path} is for {key}={metadata.get(key)!r}, "
                                   f"this cache needs {value!r}")
    if sorted(metadata) != sorted([*expected, "checksum"]):
        raise PrefixCacheFileError(f"prefix cache file {path} has header fields {sorted(metadata)}, "
                                   f"expected {sorted([*expected, 'checksum'])}")


def _check_shapes(tensors: Mapping[str, torch.Tensor], manager: KVCacheManager, path: str | os.PathLike) -> None:
    for name in ("tokens", "node_parent", "node_num_blocks", "tail_node", "tail_num_tokens", "tail_tokens"):
        if tensors[name].dtype != torch.int64 or tensors[name].dim() != 1:
            raise PrefixCacheFileError(f"prefix cache file {path}: {name} must be a 1-D int64 tensor, "
                                       f"not {tensors[name].dtype} of shape {list(tensors[name].shape)}")
    if len(tensors["node_parent"]) != len(tensors["node_num_blocks"]):
        raise PrefixCacheFileError(f"prefix cache file {path}: {len(tensors['node_parent'])} node parents for "
                                   f"{len(tensors['node_num_blocks'])} node block counts")
    if len(tensors["tail_node"]) != len(tensors["tail_num_tokens"]):
        raise PrefixCacheFileError(f"prefix cache file {path}: {len(tensors['tail_node'])} tail nodes for "
                                   f"{len(tensors['tail_num_tokens'])} tail lengths")
    kv, pool = tensors["kv"], manager.pool.kv
    if kv.dtype != pool.dtype or kv.dim() != 6 or kv.shape[:2] != pool.shape[:2] or kv.shape[3:] != pool.shape[3:]:
        expected = [*pool.shape[:2], "n", *pool.shape[3:]]
        raise PrefixCacheFileError(f"prefix cache file {path}: kv is {kv.dtype} of shape {list(kv.shape)}, "
                                   f"this cache needs {pool.dtype} of shape {expected}")


def _node_paths(tensors: Mapping[str, torch.Tensor], block_size: int, vocab_size: int,
                path: str | os.PathLike) -> list[tuple[list[int], list[int]]]:
    """Each node's full token path and the indices of its blocks in the file's ``kv``, after
    checking that the tree is one ``save_prefix_cache`` could have written."""
    parents, counts = tensors["node_parent"].tolist(), tensors["node_num_blocks"].tolist()
    tokens, num_blocks = tensors["tokens"].tolist(), tensors["kv"].shape[2] - len(tensors["tail_node"])

    def refuse(problem: str) -> PrefixCacheFileError:
        return PrefixCacheFileError(f"prefix cache file {path} has an inconsistent tree: {problem}")

    for i, (parent, count) in enumerate(zip(parents, counts)):
        if count < 1:
            raise refuse(f"node {i} owns {count} blocks; every node owns at least one block")
        if not -1 <= parent < i:
            raise refuse(f"node {i} has parent {parent}; a parent is -1 (the root) or an earlier node")
    if not sum(counts) * block_size == len(tokens) == num_blocks * block_size:
        raise refuse(f"the nodes own {sum(counts)} blocks of {block_size} tokens, the file holds {len(tokens)} "
                     f"tokens and {num_blocks} blocks of K/V besides its tails'")
    if (problem := outside_vocabulary(tokens, vocab_size)) is not None:
        raise refuse(problem)
    paths: list[tuple[list[int], list[int]]] = []
    keys: set[tuple[int, tuple[int, ...]]] = set()  # (parent, first block of tokens) of every node
    start = 0
    for i, (parent, count) in enumerate(zip(parents, counts)):
        own = tokens[start * block_size : (start + count) * block_size]
        key = (parent, tuple(own[:block_size]))
        if key in keys:  # the radix tree's key: siblings must diverge in their first block
            raise refuse(f"node {i} starts with the same block of tokens as an earlier sibling")
        keys.add(key)
        path_tokens, path_blocks = paths[parent] if parent >= 0 else ([], [])
        paths.append((path_tokens + own, path_blocks + list(range(start, start + count))))
        start += count
    return paths


def _tails(tensors: Mapping[str, torch.Tensor], num_nodes: int, block_size: int, vocab_size: int,
           path: str | os.PathLike) -> list[tuple[int, list[int]]]:
    """Each tail's node (an index into the file's nodes, -1 the root) and tokens, after checking
    them as ``_node_paths`` checks the nodes."""
    nodes, lengths, tokens = (tensors[name].tolist() for name in ("tail_node", "tail_num_tokens", "tail_tokens"))

    def refuse(problem: str) -> PrefixCacheFileError:
        return PrefixCacheFileError(f"prefix cache file {path} has inconsistent tails: {problem}")

    for i, (node, length) in enumerate(zip(nodes, lengths)):
        if not -1 <= node < num_nodes:
            raise refuse(f"tail {i} follows node {node}; the file has nodes -1 (the root) to {num_nodes - 1}")
        if not 0 < length < block_size:
            raise refuse(f"tail {i} holds {length} tokens; a tail holds 1 to {block_size - 1}")
    if sum(lengths) != len(tokens):
        raise refuse(f"the tails hold {sum(lengths)} tokens, the file {len(tokens)}")
    if (problem := outside_vocabulary(tokens, vocab_size)) is not None:
        raise refuse(problem)
    starts = [0, *itertools.accumulate(lengths)]
    return [(node, tokens[start : start + length]) for node, start, length in zip(nodes, starts, lengths)]
