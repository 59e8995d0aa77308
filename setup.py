"""Packaging lives in pyproject.toml. This file adds what it cannot say: the C++ sources in
``kernels/`` are the package ``trellis.kernels`` (``trellis/kernels/`` once installed, so an
installed, non-editable copy can still compile them with ninja on first use; ``cpp.py`` finds
them through it), and the optional ahead-of-time build of those
kernels: ``TRELLIS_BUILD_CPP=1 pip install --no-build-isolation .`` (torch must already be installed)."""

import importlib.util
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("TRELLIS_BUILD_CPP") == "1":
    from torch.utils.cpp_extension import BuildExtension

    # Load trellis/ops/cpp.py by path: importing the package here would need its dependencies.
    spec = importlib.util.spec_from_file_location("trellis_ops_cpp", "trellis/ops/cpp.py")
    cpp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpp)
    ext_modules = [cpp.cpp_extension()]  # trellis/ops/trellis_cpp_<simd>*.so, which cpp.load() finds
    cmdclass = {"build_ext": BuildExtension}

setup(
    packages=[*find_packages(include=["trellis", "trellis.*"]), "trellis.kernels"],
    package_dir={"trellis.kernels": "kernels"},
    package_data={"trellis": ["py.typed"], "trellis.kernels": ["*.cpp", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
