"""Without a GPU, the Triton kernels run in Triton's CPU interpreter, which must be chosen before
the kernels are defined, i.e. before any test imports ``trellis.ops.triton_*``."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
