"""Row selection and row gather for the cache policies.

``select_rows(d, window, k, P)``: DCU's rows for one layer: the forced window (a contiguous range of gen
rows) plus the ``k`` other gen rows with the largest change score ``d``, as sorted absolute positions.
Ties go to the lower row (a stable descending sort), so the choice is deterministic on every device.
The torch twin sorts; the Triton kernel ranks every row against every other in one program and writes
the selected rows in order with a prefix sum: one launch instead of about eight, bit-identical rows.

``select_rows_batched(d, win_start, win, k, gen_start, k_slot)``: the same choice for every sequence of a
batch at once (d [B, G], each sequence its own window start and first gen row, the same window length), so
a batch of 16 costs one launch per layer instead of 16 and a stack: rows [B, win + k], row b equal to
``select_rows`` of sequence b alone. With ``k_slot`` [B] (DCU's proportional budgets differ per sequence)
sequence b takes its own k_slot[b] <= k rows and pads its row of the result with copies of its last row,
as the executor pads any shorter list.

``gather_rows(h, rows, slot)``: each sequence's input rows ``h[b, rows[b]]`` (rows [B, k]: every
sequence of a batch recomputes its own rows, as many for each; a shorter list is padded with copies of
its last row, which compute and write the same values) and their positions as int32, and (Triton) each
row's slot in ``slot`` [B, N] for the fused residual update (``kernels/residual.py``), which resets it.
"""

from __future__ import annotations

import torch

from dllm.kernels._triton import jit, launch_options, next_pow2, tl


def select_rows_torch(d: torch.Tensor, window: torch.Tensor | None, k: int, prompt_len: int) -> torch.Tensor:
    """d [G] fp32 change scores; window [W] gen rows (ascending, contiguous) or None -> rows [W + k] int64."""
    if window is None:
        window = torch.empty(0, dtype=torch.long, device=d.device)
    k = min(k, d.shape[0] - window.numel())             # as many as there are rows outside the window
    if k <= 0:
        return window + prompt_len
    vote = d.index_fill(0, window, float("-inf")) if window.numel() else d
    top = torch.sort(vote, descending=True, stable=True).indices[:k]
    return torch.cat([window, top]).sort().values + prompt_len


def select_rows_batched_torch(d: torch.Tensor, win_start: torch.Tensor, win: int, k: int,
                              gen_start: torch.Tensor, k_slot: torch.Tensor | None = None) -> torch.Tensor:
    """d [B, G] fp32; win_start [B] (gen-relative, read only when win > 0); gen_start [B] each sequence's
    first gen row; k_slot [B] each sequence's own k (at most k; needs win > 0, for a row to repeat) or None
    -> rows [B, win + k] int64: row b is ``select_rows_torch(d[b], window_b, k_b, gen_start[b])``, padded
    with its last row. No host sync (graphs can hold it)."""
    B, G = d.shape
    k = batched_k(G, win, k, k_slot)
    i = torch.arange(G, device=d.device)
    ws = win_start.to(torch.long)[:, None]
    sel = (i >= ws) & (i < ws + win)                                  # [B, G] the forced windows
    if k:
        vote = d.masked_fill(sel, float("-inf"))
        top = torch.sort(vote, dim=1, descending=True, stable=True).indices[:, :k]
        take = True if k_slot is None else torch.arange(k, device=d.device) < k_slot.to(torch.long)[:, None]
        sel = sel.scatter(1, top, take)
    # the selected rows in ascending order: unselected ones sort after every selected one
    rows = torch.sort(torch.where(sel, i, i + G), dim=1).values[:, :win + k]
    if k_slot is not None:                                            # past its own rows: its last row again
        n = win + k_slot.to(torch.long).clamp(0, k)[:, None]                 # [B, 1]
        rows = torch.where(torch.arange(win + k, device=d.device) < n, rows, rows.gather(1, n - 1))
    return rows + gen_start.to(torch.long)[:, None]


def batched_k(G: int, win: int, k: int, k_slot: torch.Tensor | None) -> int:
    """The batch's k, held to the rows outside the window; a k per sequence needs a window. (The executor
    counts a batched choice's rows with it too.)"""
    if k_slot is not None and win == 0:
        raise ValueError("per-sequence k needs a window: a sequence without rows has no row to repeat")
    return max(0, min(k, G - win))


@jit
def _select_kernel(d_ptr, win_ptr, win_stride, p_ptr, k_ptr, rows_ptr, G, win, k, P, HAS_WIN: tl.constexpr,
                   SLOT_P: tl.constexpr, SLOT_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)                         # one program per sequence
    d_ptr += b * G
    rows_ptr += b * (win + k)
    p = P
    if SLOT_P:
        p = tl.load(p_ptr + b).to(tl.int64)
    i = tl.arange(0, BLOCK_G)
    mi = i < G
    ws = 0
    if HAS_WIN:
        ws = tl.load(win_ptr + b * win_stride)
    in_win = (i >= ws) & (i < ws + win)
    vi = tl.where(in_win | (i >= G), float("-inf"), tl.load(d_ptr + i, mask=mi, other=0.0))
    rank = tl.zeros([BLOCK_G], dtype=tl.int32)
    for j0 in tl.range(0, G, BLOCK_J):                       # rank_i = #(v_j > v_i) + #(v_j == v_i, j < i)
        j = j0 + tl.arange(0, BLOCK_J)
        mj = j < G
        vj = tl.where(((j >= ws) & (j < ws + win)) | (j >= G), float("-inf"),
                      tl.load(d_ptr + j, mask=mj, other=0.0))
        before = (vj[None, :] > vi[:, None]) | ((vj[None, :] == vi[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & mj[None, :]).to(tl.int32), axis=1)
    kb = k
    if SLOT_K:
        kb = tl.minimum(tl.maximum(tl.load(k_ptr + b), 0), k)
    sel = mi & (in_win | (rank < kb))
    out = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    # NaN scores rank first without pushing others out, so more than win + k rows can be selected:
    # the bound keeps the writes inside this sequence's rows (finite scores select exactly win + k)
    tl.store(rows_ptr + out, (i + p).to(tl.int64), mask=sel & (out < win + kb))
    if SLOT_K:                                                # pad to win + k with the last row written
        n = tl.minimum(tl.sum(sel.to(tl.int32), axis=0), win + kb)
        last = tl.max(tl.where(sel & (out < n), i, -1), axis=0)
        tl.store(rows_ptr + i, (last + p).to(tl.int64), mask=(i >= n) & (i < win + k))


def _launch_select(d, win_ptr, win_stride, win, k, gen_start, prompt_len, rows, k_slot=None):
    B, G = d.shape
    _select_kernel[(B,)](d, win_ptr, win_stride, gen_start if gen_start is not None else rows,
                         k_slot if k_slot is not None else rows, rows, G, win, k, prompt_len, HAS_WIN=win > 0,
                         SLOT_P=gen_start is not None, SLOT_K=k_slot is not None, BLOCK_G=next_pow2(G),
                         BLOCK_J=min(32, next_pow2(G)), num_warps=4)


def select_rows_triton(d: torch.Tensor, window: torch.Tensor | None, k: int, prompt_len: int) -> torch.Tensor:
    G = d.shape[0]
    win = 0 if window is None else window.numel()
    k = max(0, min(k, G - win))
    rows = torch.empty(win + k, dtype=torch.long, device=d.device)
    if win + k:
        _launch_select(d.contiguous()[None], window if win else rows, 0, win, k, None, prompt_len, rows)
    return rows


def select_rows_batched_triton(d: torch.Tensor, win_start: torch.Tensor, win: int, k: int,
                               gen_start: torch.Tensor, k_slot: torch.Tensor | None = None) -> torch.Tensor:
    B, G = d.shape
    k = batched_k(G, win, k, k_slot)
    rows = torch.empty((B, win + k), dtype=torch.long, device=d.device)
    if B * (win + k):
        _launch_select(d.contiguous(), win_start if win else rows, win_start.stride(0) if win else 0, win, k,
                       gen_start, 0, rows, None if k_slot is None or not k else k_slot)
    return rows


def gather_rows_torch(h: torch.Tensor, rows: torch.Tensor, slot: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """h [B, N, D], rows [B, k] int64 -> (h[b, rows[b]] [B, k, D], pos [B, k] int32). ``slot`` is unused here."""
    if rows.shape[0] == 1:     # one sequence: the same copy as before batching, through index_select
        return h.index_select(1, rows[0]), rows.to(torch.int32)
    return torch.gather(h, 1, rows[..., None].expand(-1, -1, h.shape[-1])), rows.to(torch.int32)


@jit
def _gather_kernel(h_ptr, rows_ptr, out_ptr, pos_ptr, slot_ptr, N, k, D, HAS_SLOT: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    r = tl.load(rows_ptr + b * k + i)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    tl.store(out_ptr + (b * k + i) * D + cols, tl.load(h_ptr + (b * N + r) * D + cols, mask=m), mask=m)
    tl.store(pos_ptr + b * k + i, r.to(tl.int32))
    if HAS_SLOT:
        tl.store(slot_ptr + b * N + r, i.to(tl.int32))


def gather_rows_triton(h: torch.Tensor, rows: torch.Tensor, slot: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, D = h.shape
    k = rows.shape[1]
    rows = rows.contiguous()
    out = torch.empty((B, k, D), dtype=h.dtype, device=h.device)
    pos = torch.empty((B, k), dtype=torch.int32, device=h.device)
    if B * k:
        _gather_kernel[(k, B)](h, rows, out, pos, slot if slot is not None else pos, N, k, D,
                               HAS_SLOT=slot is not None, BLOCK_D=next_pow2(D), **launch_options(h.device, D))
    return out, pos
