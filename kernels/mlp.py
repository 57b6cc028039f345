"""The SwiGLU gate: ``silu(gate) * up`` in one pass (the torch twin is two kernels and a temporary).

Both round to the model dtype after the SiLU and after the product, as torch does; the exponential
inside SiLU may differ in the last bit, so results agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dllm.kernels._triton import jit, tl


def silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, g_rs, u_rs, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(g_ptr + row * g_rs + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_rs + cols, mask=m, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * F + cols, (s.to(tl.float32) * u).to(y_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] as [R, F] with unit stride in F; views of a wider product (gate|up) stay views."""
    t2 = t.flatten(0, -2) if t.dim() > 2 else t          # a view whenever the leading dims allow it
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., F] (rows may be strided, e.g. halves of one gate|up product) -> [..., F] contiguous."""
    F = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    R, BLOCK = g2.shape[0], 1024
    if R * F:
        _silu_mul_kernel[(R, -(-F // BLOCK))](g2, u2, y, g2.stride(0), u2.stride(0), F, BLOCK=BLOCK, num_warps=4)
    return y
