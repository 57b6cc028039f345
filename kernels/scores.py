"""DCU's change scores: the cosine distance of each gen row to its previous value, and the refresh of
that previous value, in one pass.

``d[b, r] = 1 - cos(a[b, r], prev[b, r])`` in fp32 over the last dims, then ``prev <- a``. For the input
proxy ``a`` is the layer's input rows and ``prev`` their copy from the last step; for the value proxy
``a`` is the fresh V of every gen row and ``prev`` the V cache's gen rows (which then hold fresh values).
The torch twin is ``F.cosine_similarity`` (eps 1e-12) and a copy; the sums run in another order in
the kernel, so the scores agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dllm.kernels._triton import jit, launch_options, next_pow2, tl

EPS = 1e-12


def cosine_distance_copy_torch(a: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """a, prev [B, R, ...] (same shape) -> d [B, R] fp32; prev is overwritten with a."""
    d = 1 - F.cosine_similarity(a.flatten(2).float(), prev.flatten(2).float(), dim=-1, eps=EPS)
    prev.copy_(a)
    return d


@jit
def _cosine_copy_kernel(a_ptr, p_ptr, d_ptr, a_bs, a_rs, p_bs, p_rs, R, W, eps, BLOCK_W: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    m = cols < W
    x = tl.load(a_ptr + b * a_bs + r * a_rs + cols, mask=m, other=0.0)
    y = tl.load(p_ptr + b * p_bs + r * p_rs + cols, mask=m, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    dot = tl.sum(xf * y, axis=0)
    nx = tl.maximum(tl.sqrt(tl.sum(xf * xf, axis=0)), eps)
    ny = tl.maximum(tl.sqrt(tl.sum(y * y, axis=0)), eps)
    tl.store(d_ptr + b * R + r, 1.0 - dot / (nx * ny))
    tl.store(p_ptr + b * p_bs + r * p_rs + cols, x, mask=m)


def _as_rows(t: torch.Tensor) -> tuple[int, int]:
    """Batch and row strides of [B, R, ...] whose trailing dims are packed (checked)."""
    B, R = t.shape[:2]
    W = t[0, 0].numel() if B and R else 0
    inner = t.flatten(2) if t.dim() > 2 else t.unsqueeze(-1)
    if inner.stride(-1) != 1 or (t.dim() > 3 and not t[0, 0].is_contiguous()):
        raise ValueError("cosine_distance_copy needs rows whose trailing dims are contiguous")
    return t.stride(0), t.stride(1) if W else 0


def cosine_distance_copy_triton(a: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    B, R = a.shape[:2]
    W = a[0, 0].numel() if B and R else 0
    a_bs, a_rs = _as_rows(a)
    p_bs, p_rs = _as_rows(prev)
    d = torch.empty((B, R), dtype=torch.float32, device=a.device)
    if B * R:
        _cosine_copy_kernel[(R, B)](a, prev, d, a_bs, a_rs, p_bs, p_rs, R, W, EPS, BLOCK_W=next_pow2(W),
                                    **launch_options(a.device, W))
    return d
