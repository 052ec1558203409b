"""Test-session set-up shared by all test modules."""

import os

import torch

# Triton kernels (the CUDA fast path) are validated on machines without a GPU through Triton's interpreter,
# which must be selected before Triton is first imported (torch._inductor, roma… import it early).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
