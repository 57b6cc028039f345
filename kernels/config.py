"""Which implementation of the work around the engines a run uses."""

from __future__ import annotations

import enum

import torch

from dllm.errors import ConfigError


class KernelPath(str, enum.Enum):
    """How the runtime does the work around the engines (and inside the torch backend's layers).

    | path     | what runs                                                                   |
    |----------|-----------------------------------------------------------------------------|
    | `auto`   | `triton` on CUDA when Triton is installed, `torch` otherwise (the default)     |
    | `triton` | the fused structure with Triton kernels (CUDA; the CPU with TRITON_INTERPRET=1) |
    | `torch`  | the fused structure with each kernel's plain-torch twin                       |
    | `plain`  | the original unfused torch path (the reference the fused paths are tested against) |
    """
    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"
    PLAIN = "plain"


def resolve_kernel_path(path: KernelPath | str, device: torch.device | str) -> KernelPath:
    """``path`` with ``auto`` decided for ``device``; raises ConfigError when ``triton`` cannot run there."""
    from dllm.kernels._triton import HAVE_TRITON, triton_usable

    try:
        path = KernelPath(str(getattr(path, "value", path)).strip().lower())
    except ValueError:
        raise ConfigError(f"--kernels {path!r}: expected one of {', '.join(p.value for p in KernelPath)}") from None
    device = torch.device(device)
    if path == KernelPath.AUTO:
        return KernelPath.TRITON if device.type == "cuda" and HAVE_TRITON else KernelPath.TORCH
    if path == KernelPath.TRITON:
        ok, why = triton_usable(device)
        if not ok:
            raise ConfigError(f"--kernels triton: {why}")
    return path
