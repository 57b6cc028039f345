"""Triton, when it is installed; otherwise stand-ins so the kernel modules still import (their torch
twins work everywhere, and the Triton kernels are only launched where ``triton_usable`` says so).

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (at import of a kernel module): set
``TRITON_INTERPRET=1`` before importing ``dllm.kernels`` to run the kernels on the CPU (slow; tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:   # a CPU or Jetson install without Triton: the torch twins serve
    triton = None
    HAVE_TRITON = False

    class _NoTritonLanguage:
        """Only what kernel signatures evaluate at definition time (``tl.constexpr``)."""
        constexpr = None

    tl = _NoTritonLanguage()


def jit(fn):
    """``triton.jit`` where Triton exists; the plain function otherwise (never launched then)."""
    return triton.jit(fn) if HAVE_TRITON else fn


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """(can Triton kernels run on ``device``, why not)."""
    if not HAVE_TRITON:
        return False, "Triton is not installed (pip install triton, or the gpu extra)"
    if device.type == "cuda":
        return True, ""
    if interpreting():
        return True, ""
    return False, (f"Triton kernels run on CUDA devices, and this engine set is on {device}; set "
                   "TRITON_INTERPRET=1 before starting Python to run them in Triton's CPU interpreter (slow, for "
                   "testing), or use --kernels torch")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_options(device: torch.device, width: int) -> dict:
    """num_warps for a row-per-program kernel over ``width`` elements (ignored by the interpreter)."""
    warps = 1 if width <= 256 else 2 if width <= 1024 else 4 if width <= 2048 else 8
    return {"num_warps": warps}
