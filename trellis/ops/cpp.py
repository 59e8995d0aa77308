"""The ``cpp`` backend: the C++ CPU kernels (``kernels/*.cpp``), found prebuilt or compiled with ninja.

``load()`` loads the library, which implements the ``trellis_cpp::`` ops (``schema.py``) for CPU
tensors; ``KERNELS`` (``torch.ops.trellis_cpp``) is how Trellis calls them. It uses a library
built ahead of time by setup.py (``cpp_extension()``) when one for this CPU is installed in the
package, otherwise compiles the sources once with ``torch.utils.cpp_extension.load`` (cached by
torch under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, in a folder of each
checkout's own, ``build_name()``; ninja rebuilds when a source or header changes). A prebuilt
library wins over the sources: rebuild or delete it after editing ``kernels/``. Importing this module builds nothing.

The sources are the package ``trellis.kernels``: setup.py maps it to ``kernels/``, which an
editable install and a wheel both serve (``pip install -e .`` in a checkout).

The kernels are compiled for the SIMD level PyTorch itself picked for this machine
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or portable code). That level is
part of the library's name, so a cache shared between machines never hands one of them
instructions it lacks, and ``ATEN_CPU_CAPABILITY=avx2`` selects (and builds) the AVX2 variant.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from setuptools import Extension

# The library's ops, callable once load() returned True (schema.py defines them).
KERNELS = torch.ops.trellis_cpp
SOURCES = (
    "store_kv_cpu.cpp", "paged_attention_cpu.cpp", "quant_linear_cpu.cpp", "panel_linear_cpu.cpp", "decoder_ops_cpu.cpp",
    "decoder_layers_cpu.cpp",
)

BUILD_WAIT_NOTICE = 5.0  # seconds another process's build may hold the kernels before waiting for it is said

# at::vec picks its implementation from these macros; the -m flags let the compiler emit it.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}


def capability() -> str:
    """The SIMD level the kernels are built for: ``AVX512``, ``AVX2`` or ``DEFAULT``."""
    level = torch.backends.cpu.get_cpu_capability()
    return level if level in _ISA_FLAGS else "DEFAULT"


def library_name() -> str:
    return f"trellis_cpp_{capability().lower()}"


def build_name() -> str:
    """The name of this checkout's build in torch's extension cache: the library's, and a digest
    of where its sources and torch lie. ninja's build file holds those absolute paths, so two
    checkouts (or virtual environments) sharing one folder would rebuild each other's kernels
    whenever they took turns. The paths as the build spells them, symbolic links unresolved: one
    environment reached by two paths (a linked ``.venv``) writes two build files."""
    where = f"{kernel_dir().absolute()}\n{Path(os.path.abspath(torch.__file__)).parent}\n{torch.__version__}"
    return f"{library_name()}_{hashlib.blake2b(where.encode(), digest_size=4).hexdigest()}"


def build_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for this machine's SIMD level."""
    # at::parallel_for is inlined from the OpenMP build of ATen: without -fopenmp it runs serially.
    # Linking -fopenmp resolves to the libgomp torch already loaded (same soname), so one thread pool.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # No floating-point contraction: a product and a sum round apart, as in ATen's separate ops,
    # so the fused decoder ops give transformers' fp32 results bit for bit. The kernels that
    # want fused multiply-adds (attention, quant_linear) ask for them explicitly (at::vec::fmadd).
    # The sources include the headers of the ATen functions they call, not <ATen/ATen.h> (every
    # operator's declarations: a third of each file's compile time); the macro keeps it so.
    return ["-O3", "-ffp-contract=off", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS", *_ISA_FLAGS.get(capability(), []),
            *openmp], openmp


def cpp_extension() -> Extension:
    """The ahead-of-time build, for setup.py run from the repository root::

    ext_modules=[cpp_extension()], cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension}
    """
    from torch.utils.cpp_extension import CppExtension

    compile_flags, link_flags = build_flags()
    return CppExtension(
        f"trellis.ops.{library_name()}",
        [f"kernels/{source}" for source in SOURCES],
        extra_compile_args=[*compile_flags, "-g0"],  # Python's CFLAGS carry -g: an 18 MB library, not 1 MB
        extra_link_args=link_flags,
    )


def prebuilt_library() -> Path | None:
    return next(iter(sorted(Path(__file__).parent.glob(f"{library_name()}*.so"))), None)


class BuildToolsMissing(RuntimeError):
    """No prebuilt library and no way to build one here (compiler, ninja or sources missing)."""


def kernel_dir() -> Path:
    """The C++ sources: package ``trellis.kernels``, i.e. ``kernels/`` in a checkout installed with
    ``pip install -e .``, ``trellis/kernels/`` in a wheel (not found on a bare ``PYTHONPATH``)."""
    try:
        return Path(str(importlib.resources.files("trellis.kernels")))
    except ModuleNotFoundError as exc:
        raise BuildToolsMissing("kernel sources not found: install Trellis (in a checkout: pip install -e .)") from exc


def jit_build(name: str | None = None, extra_cflags: Sequence[str] = (), extra_ldflags: Sequence[str] = (),
              source_names: Sequence[str] = SOURCES) -> None:
    """Compile the sources with ninja (cached by torch; see the module docstring) and load the
    library. ``name``, the extra flags and fewer ``source_names`` (each registers its own ops)
    make a variant (the tests' sanitized build): the flags come after the usual ones, so a later
    ``-O`` wins."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BuildToolsMissing(f"no C++ compiler ({compiler!r} not found; install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise BuildToolsMissing("ninja not found (pip install ninja)")
    directory = kernel_dir()
    sources = [directory / source for source in source_names]
    if not all(source.is_file() for source in sources):
        raise BuildToolsMissing(f"kernel sources not found in {directory} and no prebuilt {library_name()} library")
    compile_flags, link_flags = build_flags()
    name = name or build_name()
    build_directory = cpp_extension._get_build_directory(name, verbose=False)
    with build_lock(Path(build_directory)):
        cpp_extension.load(
            name=name,
            sources=[str(source) for source in sources],
            extra_cflags=[*compile_flags, *extra_cflags],
            extra_ldflags=[*link_flags, *extra_ldflags],
            build_directory=build_directory,
            is_python_module=False,  # the library registers the kernels with the dispatcher as it loads
            verbose=os.environ.get("TRELLIS_VERBOSE_BUILD") == "1",
        )


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """This process's turn to build in ``directory``. torch's own lock, the file ``lock`` that it
    creates for a build and removes after, stays behind when the building process is killed (a
    Ctrl-C during the first import), and every later build waits for it forever. An ``flock`` is
    released by the system when its holder dies: with it held, no other Trellis build is running
    in ``directory``, so a ``lock`` file there is a dead build's and is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "trellis-build.lock", "w") as handle:
        deadline = time.monotonic() + BUILD_WAIT_NOTICE
        while True:  # (processes started together, a grid's stages, each find the build done within a second)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    warnings.warn(f"trellis: waiting for another process building the C++ kernels in {directory}")
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    break
                time.sleep(0.05)
        (directory / "lock").unlink(missing_ok=True)
        yield


def runs_on(device: torch.device) -> bool:
    return device.type == "cpu"


@functools.cache
def load() -> bool:
    """Load the C++ kernels (``KERNELS``); raises with the reason if they cannot be built. A prebuilt
    library that does not load (built against another torch, which has since been upgraded) gives
    way to a build from the shipped sources."""
    prebuilt = prebuilt_library()
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
            return True
        except OSError as exc:  # (torch keeps the loader's own message, an undefined symbol, as the cause)
            warnings.warn(f"trellis: the prebuilt C++ kernels {prebuilt} do not load ({exc.__cause__ or exc}); "
                          "building them from the kernel sources instead", stacklevel=2)
    jit_build()
    return True
