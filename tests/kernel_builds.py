"""A test file's C++ kernel tests again, in a child pytest run over another build of the library:
sanitized (AddressSanitizer), or for a lower SIMD level than this machine's (ATEN_CPU_CAPABILITY).
Such a build compiles only the sources whose ops the file tests (each source registers its own
ops): the whole library takes minutes on 2 cores, and a fresh checkout (CI) builds every one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from trellis.ops import cpp

ROOT = Path(__file__).resolve().parents[1]
# Set in a child run: the build its tests run over, a key of BUILD_FLAGS.
BUILD = "TRELLIS_TEST_KERNEL_BUILD"
# -O1 -g for readable reports. Workspace vectors are sized exactly per item, and libstdc++'s
# annotations report an access between a vector's size and its capacity.
SANITIZE_CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address", "-D_GLIBCXX_SANITIZE_VECTOR",
                   "-DTRELLIS_EXACT_WORKSPACE"]
# -O0 for another SIMD level: the same code paths, compiled in a fraction of the time (-O3 unrolls
# the no-SIMD level's scalar vector emulation for minutes). quant_linear_cpu.cpp's rerun, build
# included, on a 2-core Zen 3: 95 s at -O3, 51 s at -O2, 29 s at -O0; the tests' shapes are small.
BUILD_FLAGS = {"sanitized": (SANITIZE_CFLAGS, ["-fsanitize=address"]), "simd_level": (["-O0"], [])}


@contextmanager
def kernels_for(sources: Sequence[str]) -> Iterator[None]:
    """The C++ kernels a test file calls: the usual library, or in a child run the build it was
    started for, compiled from ``sources`` alone (``cpp.load`` then reports it loaded). Builds are
    kept in torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so
    a later run rebuilds only what changed."""
    build = os.environ.get(BUILD)
    with pytest.MonkeyPatch.context() as patch:
        try:
            if build is None:
                cpp.load()
            else:
                if build == "simd_level":
                    assert cpp.capability() == os.environ["ATEN_CPU_CAPABILITY"].upper(), cpp.capability()
                cflags, ldflags = BUILD_FLAGS[build]
                parts = "_".join(Path(source).stem.removesuffix("_cpu") for source in sources)
                cpp.jit_build(f"{cpp.build_name()}_{build}_{parts}", cflags, ldflags, sources)
                patch.setattr(cpp, "load", lambda: True)
        except cpp.BuildToolsMissing as exc:
            if os.environ.get("CI"):
                raise  # CI builds the C++ backend: a missing tool there is a failure
            pytest.skip(f"the C++ kernels cannot be built here: {exc}")
        yield


def rerun_over(build: str, test_file: str, selection: str, env: dict[str, str] | None = None) -> str:
    """Run the tests of ``test_file`` that ``selection`` (pytest's -k) picks in a child pytest over
    ``build``, which must pass; its stderr. (--capture=no: AddressSanitizer writes its report to
    fd 2 just before the process aborts.)"""
    if os.environ.get(BUILD):
        pytest.skip("this is a child run")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--capture=no", "-p", "no:cacheprovider", test_file,
                          "-k", selection], env={**os.environ, **(env or {}), BUILD: build}, cwd=ROOT,
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    return run.stderr


def rerun_at_simd_level(capability: str, test_file: str, selection: str) -> None:
    """``rerun_over`` the kernels built for ``capability`` ("avx2", "default": no SIMD extension),
    unless that is this machine's own level, which the usual run covers."""
    if cpp.capability() == capability.upper() and not os.environ.get(BUILD):
        pytest.skip(f"{capability} is this machine's own level: the other tests cover it")
    rerun_over("simd_level", test_file, selection, {"ATEN_CPU_CAPABILITY": capability})
