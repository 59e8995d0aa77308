"""Starting a grid: the start-up handshake and each rank's part.

Every rank connects to the rendezvous (``rendezvous.py``), publishes who it is — Trellis (version
and sources), torch and transformers versions, a digest of the model files, dtype, block size,
device, free memory — and waits for the coordinator's verdict. The coordinator refuses a grid whose stages differ,
naming the difference; otherwise it places the layers (``--layers`` or in proportion to free
memory), agrees the pool size (the most blocks every stage can hold for its layers) and publishes
both. Then every rank loads its share of the model and joins the gloo (CPU) or NCCL (CUDA)
process group. ``local.py`` starts a whole grid on one machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import PretrainedConfig

from trellis.cache.block_pool import BlockPool
from trellis.grid.devices import check_grid_device, stage_device
from trellis.grid.placement import Placement, parse_layers, split_by_memory
from trellis.grid.rendezvous import Endpoint, connect, process_group, wait_for, wait_for_plan_read
from trellis.grid.runner import GridRunner
from trellis.grid.shared_host import default_micro_batches, warn_if_spinning
from trellis.grid.stage import StageWorker, first_floating_dtype, load_stage_model, safetensors_files
from trellis.grid.transport import GridError, Link
from trellis.models.embedded import embedded_model_dir
from trellis.models.gguf_reading import gguf_parsed_once
from trellis.models.loading import DTYPES, device_named, load_llama_config, preferred_dtype
from trellis.ops import cpp
from trellis.runner.runner import CacheSettings, default_kv_cache_memory, free_memory
from trellis.utils import head_dim_of, package_version

log = logging.getLogger("trellis.grid")

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


@dataclass
class GridOptions:
    """What every rank of one grid is started with (the handshake checks they agree)."""

    model: str | None = None  # a checkpoint directory; None: the embedded SmolLM2
    gguf_file: str | None = None
    dtype: str = "float32"  # or "auto": each rank chooses for its own device (grid_dtype)
    device: str = "auto"
    block_size: int = 32
    num_blocks: int | None = None  # default: what every stage's KV budget holds
    kv_cache_memory: int | None = None  # bytes of KV per stage; default: default_kv_cache_memory
    linear_kernel: str | None = None
    layers: str | None = None  # "0-10,11-29"; default: in proportion to free memory
    micro_batches: int | None = None  # steps in flight; default: one per machine
    threads: int | None = None  # torch threads of this process
    step_timeout: float = 60.0  # seconds a step may take on the other stages before the grid fails
    start_timeout: float = 300.0  # seconds to wait for every stage to join and load

    def __post_init__(self) -> None:
        """Checked before any stage starts: a bad value would otherwise surface on a stage, while
        the coordinator waits for it to join."""
        CacheSettings(self.block_size, self.num_blocks, self.kv_cache_memory)  # the pool's own checks
        check_grid_device(self.device)
        if self.dtype != "auto" and self.dtype not in DTYPES:  # (a stage would refuse it only once started)
            raise ValueError(f"unknown dtype {self.dtype!r} (--dtype); choose 'auto' or one of {', '.join(DTYPES)}")
        if self.dtype == "auto":
            self.dtype = grid_dtype(self.device, self.model_path, self.load_kwargs())
        for name in ("micro_batches", "threads", "step_timeout", "start_timeout"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be positive and finite, got {value!r}")

    @property
    def model_path(self) -> str:
        return self.model or str(embedded_model_dir())

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {self.dtype!r}")  # noqa: TRY004 -- a bad name, not a bad type
        return dtype

    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


@dataclass(frozen=True)
class StageIdentity:
    """What must agree across the stages for the grid to compute what one process would."""

    trellis: str
    code_digest: str  # the source itself: checkouts at other commits share a version string
    torch: str
    transformers: str
    model_digest: str
    dtype: str
    block_size: int
    device_type: str
    world_size: int
    linear_kernel: str | None  # as given: one process runs one kernel, whose rounding every layer shares
    layers: str | None  # as given, spaces dropped; None on a stage: the coordinator's placement
    num_blocks: int | None  # as given; None on a stage: the coordinator's (or what every budget holds)
    free_memory: int = field(compare=False)
    kv_budget: int = field(compare=False)
    host: str = field(compare=False)

    def differences(self, other: StageIdentity) -> list[str]:
        """What ``other`` (a stage's) has otherwise than this (the coordinator's), named."""
        mine, theirs = asdict(self), asdict(other)
        names = [f.name for f in self.__dataclass_fields__.values() if f.compare
                 and not (f.name in ("layers", "num_blocks") and theirs[f.name] is None)]
        hints = {"code_digest": " (the stages run other Trellis sources: install one commit everywhere)",
                 "dtype": " (--dtype auto chooses for each machine: give every stage one --dtype)",
                 "layers": " (the coordinator places the layers: give it --layers, and the stages the same or none)",
                 "num_blocks": " (the coordinator sizes every stage's pool: give it --num-blocks, and the stages "
                               "the same or none)"}
        return [f"{name}: {mine[name]} on the coordinator, {theirs[name]} here{hints.get(name, '')}" for name in names
                if mine[name] != theirs[name]]


def grid_dtype(device: str, model_path: str, load_kwargs: dict) -> str:
    """What ``--dtype auto`` runs a stage in: on the CPU ``preferred_dtype`` (bf16 where it has
    native bf16 dot products, else fp32), on CUDA the checkpoint's dtype as transformers' "auto"
    reads it (the config's, else its first floating-point tensor's; a GGUF's is fp32). Each rank
    chooses for its own device, so stages on machines of different kinds may choose differently:
    the handshake then refuses the grid, naming the dtypes."""
    dtype = preferred_dtype(device_named(device)).dtype
    if not isinstance(dtype, torch.dtype):  # "auto" off the CPU: the checkpoint's
        named = getattr(load_llama_config(model_path, load_kwargs), "dtype", None)
        dtype = getattr(torch, named, None) if isinstance(named, str) else named
        if not isinstance(dtype, torch.dtype):
            files = None if load_kwargs.get("gguf_file") else safetensors_files(model_path)
            dtype = first_floating_dtype(files) if files else torch.float32
    return str(dtype).removeprefix("torch.")


def model_digest(path: str, gguf_file: str | None = None) -> str:
    """BLAKE2b of the checkpoint's config and weight files (names, sizes and bytes)."""
    root = Path(path)
    files = [root / gguf_file] if gguf_file else sorted(
        p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        digest.update(f"{file.name}:{file.stat().st_size}:".encode())
        with open(file, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def code_digest() -> str:
    """BLAKE2b of the Trellis sources this process runs: its Python modules and, where found, the
    C++ kernel sources (what a stage that builds them compiles)."""
    package = Path(__file__).resolve().parents[1]
    files = {path.relative_to(package).as_posix(): path for path in package.rglob("*.py")
             if path.relative_to(package).parts[0] != "kernels"}  # (a wheel's copy of kernels/: below)
    try:
        files.update({f"kernels/{p.name}": p for p in cpp.kernel_dir().iterdir() if p.suffix in (".cpp", ".h")})
    except cpp.BuildToolsMissing:  # (a bare PYTHONPATH: this stage runs the reference kernels)
        pass
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(files):
        digest.update(f"{name}:".encode())
        digest.update(files[name].read_bytes())
    return digest.hexdigest()


def identity(options: GridOptions, device: torch.device, world_size: int) -> StageIdentity:
    return StageIdentity(
        trellis=package_version(), code_digest=code_digest(), torch=torch.__version__,
        transformers=transformers.__version__,
        model_digest=model_digest(options.model_path, options.gguf_file), dtype=options.dtype,
        block_size=options.block_size, device_type=device.type, world_size=world_size,
        linear_kernel=options.linear_kernel, layers="".join(options.layers.split()) if options.layers else None,
        num_blocks=options.num_blocks,
        free_memory=free_memory(device), kv_budget=options.kv_cache_memory or default_kv_cache_memory(device),
        host=os.uname().nodename)


def kv_bytes_per_block(config, block_size: int, num_layers: int, dtype: torch.dtype) -> int:
    return BlockPool.bytes_per_block(block_size, num_layers, config.num_key_value_heads, head_dim_of(config), dtype)


def plan_grid(options: GridOptions, config, identities: list[StageIdentity]) -> tuple[Placement, int]:
    """The coordinator's decision: the layers of each stage and the blocks of every pool."""
    world = len(identities)
    dtype_bytes = torch.empty((), dtype=options.torch_dtype).element_size()
    hidden, inter = config.hidden_size, config.intermediate_size
    attn = hidden * head_dim_of(config) * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    layer_bytes = (attn + 3 * hidden * inter + 2 * hidden) * dtype_bytes
    head_bytes = (1 if config.tie_word_embeddings else 2) * config.vocab_size * hidden * dtype_bytes  # on stage 0
    if options.layers:
        placement = parse_layers(options.layers, config.num_hidden_layers, world)
    else:
        # Stages on one machine share its memory: one reading (the first rank's) for all of them,
        # so that their split does not follow the moments at which each process read it.
        memory_of_host: dict[str, int] = {}
        for s in identities:
            memory_of_host.setdefault(s.host, s.free_memory)
        placement = split_by_memory(config.num_hidden_layers, layer_bytes, head_bytes,
                                    [memory_of_host[s.host] for s in identities])

    def kv_budget(rank: int, stage: StageIdentity) -> int:
        """A stage's KV budget. On CUDA the default is half of what the GPU has free once the weights
        are loaded, as in one process; a stage reported its free memory before loading, so its
        share of the weights is taken off here. (The CPU's default is capped: as reported.)"""
        if stage.device_type != "cuda" or options.kv_cache_memory:
            return stage.kv_budget
        weights = len(placement.ranges[rank]) * layer_bytes + (head_bytes if rank == 0 else 0)
        return max(stage.free_memory - weights, 0) // 2

    num_blocks = options.num_blocks or min(
        kv_budget(rank, s) // kv_bytes_per_block(config, options.block_size, len(r), options.torch_dtype)
        for rank, (s, r) in enumerate(zip(identities, placement.ranges)))
    if num_blocks < 1:
        raise GridError("a stage's KV budget cannot hold one block; raise --kv-cache-memory")
    return placement, num_blocks


def start_coordinator(options: GridOptions, endpoint: Endpoint,
                      lost: Callable[[], str | None] = lambda: None) -> GridRunner:
    """Rank 0: check the stages, place the layers, load stage 0 and return the grid's runner
    (which ``model.runner`` also becomes, so ``generate`` runs on the grid). ``lost`` says why
    the grid cannot start when a stage is known to be gone (``wait_for``)."""
    device = stage_device(options.device)
    _set_threads(options)
    store = connect(endpoint, options.start_timeout)
    mine = identity(options, device, endpoint.world_size)
    store.set("identity/0", json.dumps(asdict(mine)))
    ranks = range(1, endpoint.world_size)
    joined = wait_for(store, [f"identity/{r}" for r in ranks], options.start_timeout, lost,
                      "not every stage joined")
    with gguf_parsed_once():  # (a GGUF's config and weights from one parse, as load_stage_model reads them)
        config = load_llama_config(options.model_path, options.load_kwargs())
        plan = publish_plan(store, options, config, mine, joined)
        model = load_stage_model(options.model_path, plan.placement.ranges[0], first=True, last=False,
                                 dtype=options.torch_dtype, device=device, linear_kernel=options.linear_kernel,
                                 **options.load_kwargs())
    model.requires_grad_(False)
    # Every stage has loaded before the process group forms, whose own wait cannot be cut short.
    loaded = wait_for(store, [f"loaded/{r}" for r in ranks], options.start_timeout, lost,
                      "not every stage loaded its layers")
    group = process_group(store, endpoint, device, options.start_timeout)
    link = Link(group, 0, endpoint.world_size, config.hidden_size, options.torch_dtype, device, options.step_timeout)
    settings = CacheSettings(options.block_size, num_blocks=plan.num_blocks)
    runner = GridRunner(model, settings, link, plan.placement,
                        options.micro_batches or default_micro_batches(plan.hosts))
    model.runner = runner
    kv_bytes = plan.num_blocks * kv_bytes_per_block(config, options.block_size, len(plan.placement.ranges[0]),
                                                    options.torch_dtype)
    runner.stage_memory = [{"weight_bytes": weight_bytes(model), "kv_bytes": kv_bytes}, *loaded]
    for r, memory in enumerate(runner.stage_memory):
        log.info("stage %d holds %.0f MB of weights and %.0f MB of KV pool", r, memory["weight_bytes"] / 1e6,
                 memory["kv_bytes"] / 1e6)
    return runner


@dataclass(frozen=True)
class GridPlan:
    """What the coordinator decided: where the layers go, the pool's size, and each stage's machine."""

    placement: Placement
    num_blocks: int
    hosts: list[str]


def publish_plan(store: dist.Store, options: GridOptions, config: PretrainedConfig, mine: StageIdentity,
                 joined: list[dict]) -> GridPlan:
    """Check the stages that ``joined`` against the coordinator (``mine``), plan the grid and publish
    the plan, or publish the refusal (and wait for the stages to read it) and raise it as a GridError."""
    ranks = range(1, len(joined) + 1)
    try:
        # (A stage of another Trellis release may report other fields: named as a difference.)
        stages = [mine] + [StageIdentity(**fields) if fields.keys() == asdict(mine).keys() else None for fields in joined]
        problems = [f"stage {r}: another Trellis release ({joined[r - 1].get('trellis')}) than the coordinator's "
                    f"({mine.trellis})" if s is None else f"stage {r} ({s.host}): " + "; ".join(diff)
                    for r, s in enumerate(stages[1:], 1) if s is None or (diff := mine.differences(s))]
        if problems:
            raise GridError("the stages differ, so the grid would not compute what one model does:\n  "
                            + "\n  ".join(problems))
        hosts = [s.host for s in stages]
        warn_if_spinning(hosts)
        placement, num_blocks = plan_grid(options, config, stages)
    except (GridError, ValueError) as exc:
        store.set("plan", json.dumps({"error": str(exc)}))
        wait_for_plan_read(store, ranks)
        raise GridError(str(exc)) from exc
    store.set("plan", json.dumps({"layers": placement.spec(), "num_blocks": num_blocks}))
    log.info("grid of %d stages, %d KV blocks of %d tokens each:\n%s", len(stages), num_blocks,
             options.block_size, placement.describe())
    return GridPlan(placement, num_blocks, hosts)


def start_stage(options: GridOptions, endpoint: Endpoint) -> StageWorker:
    """Rank ≥ 1: report to the coordinator, load this stage's layers, join the process group."""
    device = stage_device(options.device)
    _set_threads(options)
    store = connect(endpoint, options.start_timeout)
    store.set(f"identity/{endpoint.rank}", json.dumps(asdict(identity(options, device, endpoint.world_size))))
    try:
        plan = json.loads(store.get("plan"))
        store.set(f"plan_read/{endpoint.rank}", "")  # the coordinator may go now, whatever the plan says
    except RuntimeError as exc:
        raise GridError(f"no plan from the coordinator within {options.start_timeout:.0f} s, or its rendezvous "
                        f"closed first (see the coordinator's log: it may have refused this stage): {exc}") from exc
    if "error" in plan:
        raise GridError(f"the coordinator refused this grid: {plan['error']}")
    with gguf_parsed_once():
        config = load_llama_config(options.model_path, options.load_kwargs())
        layers = parse_layers(plan["layers"], config.num_hidden_layers, endpoint.world_size).ranges[endpoint.rank]
        last = endpoint.rank == endpoint.world_size - 1
        model = load_stage_model(options.model_path, layers, first=False, last=last, dtype=options.torch_dtype,
                                 device=device, linear_kernel=options.linear_kernel, **options.load_kwargs())
    model.requires_grad_(False)
    pool = BlockPool(plan["num_blocks"], options.block_size, len(layers), config.num_key_value_heads,
                     head_dim_of(config), dtype=options.torch_dtype, device=device, layer_ids=layers)
    log.info("stage %d of %d: layers %d-%d, %d KV blocks", endpoint.rank, endpoint.world_size, layers.start,
             layers.stop - 1, plan["num_blocks"])
    store.set(f"loaded/{endpoint.rank}", json.dumps({"weight_bytes": weight_bytes(model), "kv_bytes": pool.kv.nbytes}))
    group = process_group(store, endpoint, device, options.start_timeout)
    link = Link(group, endpoint.rank, endpoint.world_size, config.hidden_size, options.torch_dtype, device,
                options.step_timeout)
    return StageWorker(model, pool, link)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages a stage holds (a tied head counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def _set_threads(options: GridOptions) -> None:
    if options.threads is not None:
        torch.set_num_threads(options.threads)
