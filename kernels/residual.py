"""The residual update after a layer, fused with the scatter of its recomputed rows' deltas.

Every canvas row's layer output is ``(h + attn_cache) + mlp_cache`` (the cached residual deltas), which
is bit for bit the full layer's ``y = h + attn; y + mlp(y)``. Two savings over updating every row:

- only rows ``[start, N)`` are updated: the executor passes the lowest row that anything later in the
  step reads (the next layers' rows and change scores, the head), so rows nobody reads again this step
  (the prompt, in a DCU step) are skipped; the embedding rewrites every row at the next step;
- the layer's fresh deltas (``attn_rows``/``mlp_rows`` [B, k, D] for the rows in ``rows`` [B, k], each
  sequence its own) are written into the caches in the same pass: the Triton kernel finds a row's slot in
  ``slot`` [B, N] (its index in ``rows[b]``, or -1), which the row gather filled, and resets it to -1 for
  the next layer.

Both paths add in the model dtype with the same two roundings, so they agree bit for bit.
"""

from __future__ import annotations

import torch

from dllm.kernels._triton import jit, launch_options, next_pow2, tl


def residual_update_torch(h, attn_cache, mlp_cache, start: int, rows=None, attn_rows=None, mlp_rows=None,
                          slot=None) -> None:
    """The plain twin: scatter the rows' deltas (when ``rows`` [B, k] is given), then update h[:, start:]."""
    if rows is not None:
        scatter_rows(attn_cache, rows, attn_rows)
        scatter_rows(mlp_cache, rows, mlp_rows)
    h[:, start:].add_(attn_cache[:, start:]).add_(mlp_cache[:, start:])


def scatter_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """dst[b, rows[b]] = src[b] for dst [B, N, ...], rows [B, k], src [B, k, ...] (repeated rows carry
    the same values, so which copy lands does not matter)."""
    if rows.shape[0] == 1:     # one sequence: the copy used before batching
        dst.index_copy_(1, rows[0], src)
        return
    idx = rows.reshape(rows.shape + (1,) * (dst.dim() - 2)).expand(src.shape)
    dst.scatter_(1, idx, src)


@jit
def _residual_kernel(h_ptr, ac_ptr, mc_ptr, ar_ptr, mr_ptr, slot_ptr, start, N, k, D,
                     HAS_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    n = start + tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    row = (b * N + n) * D + cols
    if HAS_ROWS:
        s = tl.load(slot_ptr + b * N + n).to(tl.int64)
        if s >= 0:                                         # recomputed this step: take the fresh deltas
            fresh = (b * k + s) * D + cols
            a = tl.load(ar_ptr + fresh, mask=m, other=0.0)
            mm = tl.load(mr_ptr + fresh, mask=m, other=0.0)
            tl.store(ac_ptr + row, a, mask=m)
            tl.store(mc_ptr + row, mm, mask=m)
            tl.store(slot_ptr + b * N + n, -1)            # clean for the next layer's gather
        else:
            a = tl.load(ac_ptr + row, mask=m, other=0.0)
            mm = tl.load(mc_ptr + row, mask=m, other=0.0)
    else:
        a = tl.load(ac_ptr + row, mask=m, other=0.0)
        mm = tl.load(mc_ptr + row, mask=m, other=0.0)
    x = tl.load(h_ptr + row, mask=m, other=0.0)
    y = (x.to(tl.float32) + a.to(tl.float32)).to(h_ptr.dtype.element_ty)
    y = (y.to(tl.float32) + mm.to(tl.float32)).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row, y, mask=m)


def residual_update_triton(h, attn_cache, mlp_cache, start: int, rows=None, attn_rows=None, mlp_rows=None,
                           slot=None) -> None:
    """``rows`` must all lie in [start, N) and be marked in ``slot`` (see ``gather_rows``)."""
    B, N, D = h.shape
    has_rows = rows is not None
    k = rows.shape[1] if has_rows else 0
    if has_rows:
        attn_rows, mlp_rows = attn_rows.contiguous(), mlp_rows.contiguous()
    else:
        attn_rows = mlp_rows = attn_cache
        slot = torch.empty(0, dtype=torch.int32, device=h.device) if slot is None else slot
    if N - start > 0:
        _residual_kernel[(N - start, B)](h, attn_cache, mlp_cache, attn_rows, mlp_rows, slot, start, N, k, D,
                                         HAS_ROWS=has_rows, BLOCK_D=next_pow2(D), **launch_options(h.device, D))
