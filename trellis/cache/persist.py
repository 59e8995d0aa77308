"""Save the radix tree and its blocks to a safetensors file, and load them back.

A file records what its K/V are valid for (the model's weights fingerprint, dtype, block size
and KV geometry) and a checksum; loading refuses any mismatch or damage before touching the
cache, and allocates every block it needs in one request, so it either applies fully or not at
all. Prefixes already cached are kept; the file's duplicates of them are dropped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trellis.cache.manager import KVCacheManager

FORMAT = "trellis-prefix-cache/1"


class PrefixCacheFileError(ValueError):
    """A saved prefix cache that does not fit this model or cache, or is damaged."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _header(manager: KVCacheManager, model_fingerprint: str) -> dict[str, str]:
    num_layers, _, _, block_size, num_kv_heads, head_dim = manager.pool.kv.shape
    return {
        "format": FORMAT,
        "dtype": str(manager.pool.kv.dtype),
        "block_size": str(block_size),
        "geometry": f"layers={num_layers},kv_heads={num_kv_heads},head_dim={head_dim}",
        "model": model_fingerprint,  # last: a dtype change also changes the weights' fingerprint
    }


def save_prefix_cache(manager: KVCacheManager, path: str | os.PathLike, model_fingerprint: str) -> int:
    """Write every cached prefix to ``path`` (atomically); returns the number of blocks saved."""
    with manager.lock:
        nodes = list(manager.radix.nodes())  # parents before children
        index = {id(node): i for i, node in enumerate(nodes)}
        blocks = [b for node in nodes for b in node.blocks]
        tensors = {
            "kv": manager.pool.kv[:, :, blocks].cpu(),  # [L, 2, n, S, Hkv, D]
            "tokens": torch.tensor([t for node in nodes for t in node.tokens], dtype=torch.int64),
            "node_parent": torch.tensor([index.get(id(node.parent), -1) for node in nodes], dtype=torch.int64),
            "node_num_blocks": torch.tensor([len(node.blocks) for node in nodes], dtype=torch.int64),
        }
        metadata = {**_header(manager, model_fingerprint), "checksum": _checksum(tensors)}
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    save_file(tensors, staging, metadata=metadata)
    staging.replace(path)
    return len(blocks)


def load_prefix_cache(manager: KVCacheManager, path: str | os.PathLike, model_fingerprint: str) -> int:
    """Add the prefixes saved in ``path`` to the cache; returns the number of blocks loaded.

    Raises ``PrefixCacheFileError`` for a file of another model, dtype, block size or geometry,
    or a damaged one, and ``OutOfBlocksError`` if the pool cannot hold it; either way the cache
    is unchanged.
    """
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 -- safe_open is not a mapping
    except (SafetensorError, OSError) as exc:
        raise PrefixCacheFileError(f"cannot read prefix cache file {path}: {exc}") from exc
    expected = _header(manager, model_fingerprint)
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise PrefixCacheFileError(
                f"prefix cache file {path} is for {key}={metadata.get(key)!r}, this cache needs {value!r}"
            )
    if set(tensors) != {"kv", "tokens", "node_parent", "node_num_blocks"} or metadata.get("checksum") != _checksum(tensors):
        raise PrefixCacheFileError(f"prefix cache file {path} is damaged (checksum mismatch)")

    bs = manager.block_size
    parents, counts = tensors["node_parent"].tolist(), tensors["node_num_blocks"].tolist()
    tokens, kv = tensors["tokens"].tolist(), tensors["kv"]
    if any(not -1 <= p < i for i, p in enumerate(parents)) or sum(counts) * bs != len(tokens) or kv.shape[2] != sum(counts):
        raise PrefixCacheFileError(f"prefix cache file {path} has an inconsistent tree")
    with manager.lock:
        blocks = manager.allocate(sum(counts))  # all or nothing
        manager.pool.kv[:, :, blocks] = kv.to(manager.pool.kv.device)
        paths: list[tuple[list[int], list[int]]] = []  # each node's full token path and blocks
        start = 0
        for parent, n in zip(parents, counts):
            path_tokens, path_blocks = paths[parent] if parent >= 0 else ([], [])
            own = slice(start, start + n)
            paths.append((path_tokens + tokens[own.start * bs : own.stop * bs], path_blocks + blocks[own]))
            start += n
        for path_tokens, path_blocks in paths:
            manager.radix.insert(path_tokens, path_blocks)
        manager.pool.decref(blocks)  # the tree holds what it adopted; duplicates of cached prefixes go back
    return len(blocks)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: each parameter's name, shape, dtype and a strided
    sample of its bytes (about 4k values per tensor)."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].cpu().contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]
