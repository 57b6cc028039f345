"""RMSNorm in the model dtype with fp32 accumulation, optionally on the sum of two inputs.

LLaDA's order: ``y = (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(dtype) * weight``. The torch twin spells
out exactly that (the same ops as ``exporter.models.layers.RMSNorm``); the Triton kernel reads each row
once and writes it once, with no fp32 copy of the activations in memory. ``add_rms_norm(x, d)`` norms
``x + d`` (the sum rounded to the model dtype first, as the layer does) without writing the sum.

Exactness: the mean is a sum over the row, whose order differs between the two, so results agree
to rounding (the normalised value can differ by one unit in the last place), not bit for bit.
"""

from __future__ import annotations

import torch

from dllm.kernels._triton import jit, launch_options, next_pow2, tl


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The plain twin. x [..., D] (and delta, same shape), weight [D] -> [..., D] in x's dtype."""
    if delta is not None:
        x = x + delta
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


@jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, y_ptr, x_stride, d_stride, y_stride, D, eps,
                     HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    x = tl.load(x_ptr + row * x_stride + cols, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * d_stride + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(y_ptr.dtype.element_ty)   # the sum in the model dtype
    xf = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    y = (xf * r).to(y_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    tl.store(y_ptr + row * y_stride + cols, (y.to(tl.float32) * w.to(tl.float32)).to(y_ptr.dtype.element_ty),
             mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> a 2-D [R, D] view with unit stride in D (copied only when needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
                    ) -> torch.Tensor:
    D = x.shape[-1]
    x2 = _rows(x)
    d2 = _rows(delta) if delta is not None else x2
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, D)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, d2, weight, y2, x2.stride(0), d2.stride(0), y2.stride(0), D, eps,
                                         HAS_DELTA=delta is not None, BLOCK_D=next_pow2(D),
                                         **launch_options(x.device, D))
    return y
