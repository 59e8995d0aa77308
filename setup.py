"""Packaging lives in pyproject.toml. This file only adds the optional ahead-of-time build of
the C++ CPU kernels: ``TRELLIS_BUILD_CPP=1 pip install --no-build-isolation .`` (torch must
already be installed). Without it the kernels are compiled with ninja on first use."""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("TRELLIS_BUILD_CPP") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension("trellis._C", ["kernels/paged_attention_cpu.cpp"], extra_compile_args=["-O3"])]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
