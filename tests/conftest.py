"""Test-session setup shared by every package's tests.

Triton decides between compiling for the GPU and its CPU interpreter when a kernel module is imported,
so the interpreter is switched on here, before anything imports dllm.kernels, on machines without CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
