"""The residual update after a layer, fused with the scatter of its recomputed rows' deltas.

Every canvas row's layer output is ``(h + attn_cache) + mlp_cache`` (the cached residual deltas), which
is bit for bit the full layer's ``y = h + attn; y + mlp(y)``. Two savings over updating every row:

- only rows ``[start, N)`` are updated: the executor passes the lowest row that anything later in the
  step reads (the next layers' rows and change scores, the head), so rows nobody reads again this step
  (the prompt, in a DCU step) are skipped; the embedding rewrites every row at the next step;
- the layer's fresh deltas (``attn_rows``/``mlp_rows`` [B, k, D] for the rows in ``rows`` [B, k], each
  sequence its own) are written into the caches in the same pass: the Triton kernel finds a row's slot in
  ``slot`` [B, N] (its index in ``rows[b]``, or -1), which the row gather filled, and resets it to -1 for
  the next layer;
- with ``prev`` [B, G, D] (the next layer's input proxy, DCU) it also takes the next layer's change
  scores from the rows it has just written: each sequence's G generation rows (from ``gen_start[b]``)
  against ``prev``, which then holds them, the scores going into ``d`` [B, G] fp32 (``kernels/scores.py``'s
  cosine distance and copy, in the same pass; without ``d`` only the copy). The next layer then needs no pass of its own over them.

Both paths add in the model dtype with the same two roundings, so they agree bit for bit; the scores
agree with ``cosine_distance_copy`` of the updated rows to rounding (bit for bit with its Triton kernel,
whose sums this kernel runs in the same order).
"""

from __future__ import annotations

import torch

from dllm.kernels._triton import jit, launch_options, next_pow2, tl
from dllm.kernels.scores import EPS, cosine_distance_copy_torch


def residual_update_torch(h, attn_cache, mlp_cache, start: int, rows=None, attn_rows=None, mlp_rows=None,
                          slot=None, prev=None, gen_start=None, d=None) -> None:
    """The plain twin: scatter the rows' deltas (when ``rows`` [B, k] is given), then update h[:, start:];
    with ``prev``, the next layer's scores into ``d`` (when given) and prev <- the gen rows."""
    if rows is not None:
        scatter_rows(attn_cache, rows, attn_rows)
        scatter_rows(mlp_cache, rows, mlp_rows)
    h[:, start:].add_(attn_cache[:, start:]).add_(mlp_cache[:, start:])
    if prev is None:
        return
    idx = gen_start.long()[:, None] + torch.arange(prev.shape[1], device=h.device)          # [B, G]
    gen = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
    if d is None:
        prev.copy_(gen)
    else:
        d.copy_(cosine_distance_copy_torch(gen, prev))


def scatter_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """dst[b, rows[b]] = src[b] for dst [B, N, ...], rows [B, k], src [B, k, ...] (repeated rows carry
    the same values, so which copy lands does not matter)."""
    if rows.shape[0] == 1:     # one sequence: the copy used before batching
        dst.index_copy_(1, rows[0], src)
        return
    idx = rows.reshape(rows.shape + (1,) * (dst.dim() - 2)).expand(src.shape)
    dst.scatter_(1, idx, src)


@jit
def _residual_kernel(h_ptr, ac_ptr, mc_ptr, ar_ptr, mr_ptr, slot_ptr, prev_ptr, d_ptr, gs_ptr, start, N, k, D, G,
                     eps, HAS_ROWS: tl.constexpr, HAS_PREV: tl.constexpr, SCORES: tl.constexpr,
                     BLOCK_D: tl.constexpr):
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
    if HAS_PREV:
        g = n - tl.load(gs_ptr + b).to(tl.int64)
        if (g >= 0) & (g < G):                             # a generation row: the next layer's proxy
            p = prev_ptr + (b * G + g) * D + cols
            if SCORES:                                     # as kernels/scores.py, same order of sums
                yf = y.to(tl.float32)
                x_prev = tl.load(p, mask=m, other=0.0).to(tl.float32)
                dot = tl.sum(yf * x_prev, axis=0)
                ny = tl.maximum(tl.sqrt(tl.sum(yf * yf, axis=0)), eps)
                npv = tl.maximum(tl.sqrt(tl.sum(x_prev * x_prev, axis=0)), eps)
                tl.store(d_ptr + b * G + g, 1.0 - dot / (ny * npv))
            tl.store(p, y, mask=m)


def residual_update_triton(h, attn_cache, mlp_cache, start: int, rows=None, attn_rows=None, mlp_rows=None,
                           slot=None, prev=None, gen_start=None, d=None) -> None:
    """``rows`` must all lie in [start, N) and be marked in ``slot`` (see ``gather_rows``); with ``prev``
    [B, G, D] (contiguous), every sequence's generation rows [gen_start[b], gen_start[b] + G) in [start, N)."""
    B, N, D = h.shape
    has_rows = rows is not None
    k = rows.shape[1] if has_rows else 0
    if has_rows:
        attn_rows, mlp_rows = attn_rows.contiguous(), mlp_rows.contiguous()
    else:
        attn_rows = mlp_rows = attn_cache
        slot = torch.empty(0, dtype=torch.int32, device=h.device) if slot is None else slot
    has_prev = prev is not None
    G = prev.shape[1] if has_prev else 0
    if has_prev and not (prev.is_contiguous() and (d is None or d.is_contiguous())):
        raise ValueError("residual_update's prev [B, G, D] and d [B, G] must be contiguous")
    if N - start > 0:
        _residual_kernel[(N - start, B)](h, attn_cache, mlp_cache, attn_rows, mlp_rows, slot,
                                         prev if has_prev else h, d if d is not None else h,
                                         gen_start if has_prev else slot, start, N, k, D, G, EPS,
                                         HAS_ROWS=has_rows, HAS_PREV=has_prev, SCORES=d is not None,
                                         BLOCK_D=next_pow2(D), **launch_options(h.device, D))
