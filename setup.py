"""Packaging lives in pyproject.toml. This file only adds the optional ahead-of-time build of
the C++ CPU kernels: ``TRELLIS_BUILD_CPP=1 pip install --no-build-isolation .`` (torch must
already be installed). Without it the kernels are compiled with ninja on first use."""

import importlib.util
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("TRELLIS_BUILD_CPP") == "1":
    from torch.utils.cpp_extension import BuildExtension

    # Load trellis/ops/cpu.py by path: importing the package here would need its dependencies.
    spec = importlib.util.spec_from_file_location("trellis_ops_cpu", "trellis/ops/cpu.py")
    cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu)
    ext_modules = [cpu.cpp_extension()]  # trellis/ops/trellis_cpu_<simd>*.so, which cpu.load() finds
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
