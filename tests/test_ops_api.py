"""The public ops API on every backend: a plan made once serves every layer; ``torch.ops.trellis``
on CPU tensors runs the C++ kernels after a plain ``import trellis``; the Triton launch with a plan
reads nothing back from the device."""

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.attention_cases import SHAPES, make_case, naive_attention, opcheck_ops, tolerance
from trellis import ops
from trellis.ops import cpp

ROOT = Path(__file__).parents[1]
# (backend, dtype): the Triton kernels run in the interpreter here (no bf16 there), or on CUDA.
BACKEND_DTYPES = [
    ("reference", torch.float32),
    ("cpp", torch.float32),
    ("cpp", torch.float16),
    ("triton", torch.float32),
    ("triton", torch.float16),
]


def require_backend(name: str) -> torch.device:
    """The device ``name`` runs on here; skip (fail in CI, which builds the C++ backend) if none."""
    device = torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")
    try:
        ops.check_backend(name, device)
    except (ValueError, RuntimeError) as exc:
        if name == "cpp" and os.environ.get("CI"):
            raise
        pytest.skip(f"no {name} backend here: {exc}")
    return device


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_one_plan_serves_every_layer(shape, backend, dtype):
    device = require_backend(backend)
    case = make_case(*SHAPES[shape], block_size=4, dtype=dtype)
    plan = case.to(device).plan(backend)
    for layer in (case, case.next_layer(1), case.next_layer(2)):
        on_device = layer.to(device)
        out = torch.zeros_like(on_device.q)
        ops.run_attention(plan, on_device.q, on_device.k_cache, on_device.v_cache, layer.scale, out=out)
        tol = tolerance(dtype)
        torch.testing.assert_close(out.cpu().double(), naive_attention(layer), atol=tol, rtol=tol)


def test_run_refuses_a_q_the_plan_does_not_fit():
    case = make_case([2, 1], [5, 9])
    plan = case.plan("reference")
    with pytest.raises(ValueError, match="does not fit the plan"):
        ops.run_attention(plan, case.q[:2], case.k_cache, case.v_cache, case.scale)


def test_cpp_plan_refuses_another_block_table():
    require_backend("cpp")
    case = make_case([2, 1], [5, 9])
    plan = replace(case.plan("cpp"), block_table=case.block_table.clone())
    with pytest.raises(RuntimeError, match="the plan was made for another block_table tensor"):
        ops.run_attention(plan, case.q, case.k_cache, case.v_cache, case.scale)


def test_cpp_plan_refuses_block_ids_written_past_the_version_counter():
    """A plan trusts the block table it was made for (its data pointer and version); a write that
    bypasses the version counter is still caught where each block id is read, not a crash."""
    require_backend("cpp")
    case = make_case([2, 1], [5, 9])
    plan = case.plan("cpp")
    case.block_table.data[0, 0] = 10**8  # (.data: no version bump)
    with pytest.raises(ValueError, match="block 0 of sequence 0 is 100000000, outside the cache"):
        ops.run_attention(plan, case.q, case.k_cache, case.v_cache, case.scale)


# An encoded C++ plan (kernels/attention_plan.h) as int64 words: the header (magic, 14 facts,
# threads, split slots, their rows, the counts of items, merges and parts, and whether the plan is
# batch-invariant), then the items (9
# words: seq, kv_head, kv_heads, q_begin, q_tokens, first_limit, kv_begin, kv_end, partial), the
# merges (an item, first_part, count) and the parts (partial, rows, offset).
HEADER_WORDS, ITEM_WORDS, MERGE_WORDS = 22, 9, 11
EDITS = {  # name: (the word's index given the counts of items and merges, the value written)
    "no threads": (lambda items, merges: 15, 0),
    "split slots beyond the items": (lambda items, merges: 16, 10**9),
    "an item's queries past q": (lambda items, merges: HEADER_WORDS + 3, 10**6),
    "an item's KV head past the cache's": (lambda items, merges: HEADER_WORDS + 1, 2),
    "an item's keys before the first": (lambda items, merges: HEADER_WORDS + 6, -64),
    "an item's split slot past the scratch": (lambda items, merges: HEADER_WORDS + 8, 99),
    "a merge's parts past the parts": (lambda items, merges: HEADER_WORDS + items * ITEM_WORDS + 10, 100),
    "a part's row offset past its slot": (
        lambda items, merges: HEADER_WORDS + items * ITEM_WORDS + merges * MERGE_WORDS + 2,
        10**6,
    ),
}


@pytest.mark.parametrize("edit", EDITS)
def test_cpp_plan_refuses_work_outside_its_tensors(edit):
    """A plan's work (items, merges) is checked against the shapes it was made for: an edited plan
    is refused, not run outside ``out`` or the split scratch."""
    require_backend("cpp")
    case = make_case([1, 1], [40, 40], block_size=4)
    case.block_table[1, :8] = case.block_table[0, :8]  # 32 shared keys: a shared item and merges
    plan = case.plan("cpp")
    encoded = plan.backend_plan
    items, merges, parts = encoded[18:21].tolist()
    assert merges == 2 and parts == 4  # each session: the shared keys and its own
    expected = ops.run_attention(plan, case.q, case.k_cache, case.v_cache, case.scale)
    word, value = EDITS[edit]
    edited = encoded.clone()
    edited[word(items, merges)] = value
    with pytest.raises(RuntimeError, match="its work reaches outside the tensors it was made for"):
        ops.run_attention(replace(plan, backend_plan=edited), case.q, case.k_cache, case.v_cache, case.scale)
    torch.testing.assert_close(ops.run_attention(plan, case.q, case.k_cache, case.v_cache, case.scale), expected)


@pytest.mark.parametrize("shape", ["decode", "mixed"])
def test_triton_run_reads_nothing_back(shape, monkeypatch):
    """Per layer, the launcher reads only the plan (host memory), never a batch tensor."""
    device = require_backend("triton")
    from trellis.ops import triton as triton_backend

    case = make_case(*SHAPES[shape], block_size=4).to(device)
    plan = case.plan("triton")
    layers = (case, case.next_layer(1), case.next_layer(2))
    max_q_len, num_splits = plan.backend_plan.tolist()
    launches: list[dict] = []
    for kernel in ("decode_attention", "extend_attention"):
        monkeypatch.setattr(triton_backend, kernel, lambda *args, **numbers: launches.append(numbers))
    reads: list[torch.Tensor] = []
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, recording(getattr(torch.Tensor, name), reads))
    for layer in layers:
        ops.run_attention(plan, layer.q, layer.k_cache, layer.v_cache, layer.scale)
    monkeypatch.undo()
    assert reads and all(t is plan.backend_plan for t in reads), [tuple(t.shape) for t in reads]
    expected = {"num_splits": num_splits} if shape == "decode" else {"max_q_len": max_q_len}
    assert launches == [expected] * 3


def recording(method, reads: list):
    def read(self, *args, **kwargs):
        reads.append(self)
        return method(self, *args, **kwargs)

    return read


def test_opcheck():
    opcheck_ops()


# What a fresh process sees after a plain `import trellis`: which kernels torch.ops.trellis ran.
DIRECT_CALLS = """
import json, torch, trellis
registered = torch._C._dispatch_has_kernel_for_dispatch_key("trellis::paged_attention", "CPU")
from tests.attention_cases import make_case, naive_attention
case = make_case([3, 1], [9, 14])
out = torch.empty_like(case.q)
k = torch.randn(5, 2, 16)
slots = torch.randperm(case.k_cache.shape[0] * case.k_cache.shape[1])[:5]
k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    torch.ops.trellis.paged_attention(
        case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, case.scale, out
    )
    torch.ops.trellis.store_kv(k, 2 * k, k_cache, v_cache, slots)
print(json.dumps({
    "registered_by_import": registered,
    "cpp_loaded": trellis.ops.load_backend("cpp"),  # loaded by the calls above, or failed there
    "ops": sorted({event.name for event in profile.events() if "trellis" in event.name}),
    "attention_error": (out.double() - naive_attention(case)).abs().max().item(),
    "stored": torch.equal(k_cache.flatten(0, 1)[slots], k) and torch.equal(v_cache.flatten(0, 1)[slots], 2 * k),
}))
"""


def direct_calls(**env: str) -> tuple[dict, str]:
    child = [sys.executable, "-c", DIRECT_CALLS]
    run = subprocess.run(child, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.splitlines()[-1]), run.stderr


def test_torch_ops_on_cpu_run_the_cpp_kernels_after_import():
    result, stderr = direct_calls()
    assert result["registered_by_import"]
    if not result["cpp_loaded"]:
        message = f"the C++ kernels could not be built: {stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI builds them: the reference serving there would hide a broken build
        pytest.skip(message)
    assert {"trellis_cpp::paged_attention", "trellis_cpp::store_kv"} <= set(result["ops"]), result["ops"]
    assert result["attention_error"] <= 2e-5 and result["stored"]


def test_torch_ops_on_cpu_fall_back_to_the_reference_without_a_compiler(tmp_path):
    if cpp.prebuilt_library() is not None:
        pytest.skip("a prebuilt C++ library is installed: it needs no compiler")
    result, stderr = direct_calls(CXX=str(tmp_path / "no-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert not result["cpp_loaded"]
    assert stderr.count("the cpp backend is unavailable") == 1, stderr
    assert not any(name.startswith("trellis_cpp::") for name in result["ops"])
    assert result["attention_error"] <= 2e-5 and result["stored"]


def test_a_prebuilt_library_that_does_not_load_gives_way_to_a_build(tmp_path, monkeypatch):
    """A prebuilt library built against another torch (upgraded since the install) fails to load:
    the kernels are built from the shipped sources instead of falling back to the reference."""
    stale = tmp_path / cpp.library_name()
    stale.write_bytes(b"not a shared library")
    built = []
    monkeypatch.setattr(cpp, "prebuilt_library", lambda: stale)
    monkeypatch.setattr(cpp, "jit_build", lambda: built.append(True))
    with pytest.warns(UserWarning, match=r"prebuilt C\+\+ kernels .* do not load .*building them from the kernel"):
        assert cpp.load.__wrapped__()
    assert built == [True]


def test_an_environment_reached_by_a_link_builds_apart(tmp_path, monkeypatch):
    """ninja's build file holds torch's include paths as this interpreter spells them: one
    environment reached through a symbolic link (a linked .venv) would rewrite the other's build
    file at each turn, recompiling every kernel, if both shared a build folder."""
    try:
        name = cpp.build_name()
    except cpp.BuildToolsMissing as exc:  # no kernel sources (a bare PYTHONPATH)
        pytest.skip(str(exc))
    (tmp_path / "linked").symlink_to(Path(torch.__file__).parent.parent)
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "linked" / "torch" / "__init__.py"))
    assert cpp.build_name() != name and cpp.build_name().startswith(cpp.library_name())


def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    """torch's build lock (the file ``lock`` in the build directory) outlives a build whose process
    was killed, and torch then waits for it forever; Trellis' own lock tells a dead build's from a
    running one. Run over a copy of this machine's build, so that ninja has nothing to compile."""
    if cpp.prebuilt_library() is not None:
        pytest.skip("a prebuilt C++ library is installed: nothing is built")
    from torch.utils import cpp_extension

    try:
        name = cpp.build_name()
    except cpp.BuildToolsMissing as exc:  # no kernel sources (a bare PYTHONPATH)
        pytest.skip(str(exc))
    built = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not any(built.glob("*.so")):
        pytest.skip("the C++ kernels are not built here")
    shutil.copytree(built, tmp_path / name)
    (tmp_path / name / "lock").touch()  # what a build killed before linking leaves
    child = [sys.executable, "-c", "import trellis.ops.cpp as cpp; cpp.jit_build(); print('loaded')"]
    run = subprocess.run(child, cwd=ROOT, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "loaded", run.stderr[-3000:]
    assert not (tmp_path / name / "lock").exists()


def test_a_build_in_progress_is_waited_for_and_said_only_when_long(tmp_path, monkeypatch):
    """A second process waits for a live build (its flock); processes started together (a grid's
    stages) find it done within the notice time and say nothing."""

    def enter() -> float:
        start = time.monotonic()
        with cpp.build_lock(tmp_path):
            assert not (tmp_path / "lock").exists()
        return time.monotonic() - start

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; import trellis.ops.cpp as cpp\n"
        f"with cpp.build_lock(Path({str(tmp_path)!r})):\n"
        "    print('held', flush=True); time.sleep(1.5)")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "lock").touch()  # torch's lock of the live build: left alone while it runs
        monkeypatch.setattr(cpp, "BUILD_WAIT_NOTICE", 0.3)
        with pytest.warns(UserWarning, match="waiting for another process building the C\\+\\+ kernels"):
            waited = enter()
        assert waited > 0.5  # it entered when the holder let go, not before
    finally:
        holder.wait(timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enter()  # free: no notice
