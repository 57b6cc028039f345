"""Per-row statistics of the head's logits that the commit policies need, in one read of the logits.

For logits [B, R, V] (and, for APD's stability term, the same rows' logits of the previous step):

| output | meaning                                                                   | used by |
|--------|---------------------------------------------------------------------------|---------|
| x0     | argmax (first index on ties)                                              | every commit at temperature 0 |
| conf   | p(x0) with p = float64 softmax                                            | schedule, threshold, factor, apd |
| c      | 1 - (second-largest p)                                                    | apd |
| H      | 1 - cos(p, p_prev) over the whole vocabulary                              | apd |

``prev_rows`` [B, R] (int64) reads the previous logits from a table ``prev`` [B, G, V] instead: row (b, i)
of the logits against ``prev[b, prev_rows[b, i]]``, so a batch whose sequences sit at different rows of
their tables needs no gathered copy of them.

The torch twin materialises the float64 softmax of every row (and of the previous logits); the Triton
kernel makes two passes over each row in fp64 registers instead: the max/argmax/second max, then
S = sum e, A = sum e*e', B = sum e^2, C = sum e'^2 with e = exp(l - max), so conf = 1/S,
c = 1 - exp(l2 - max)/S and cos(p, p') = A / sqrt(B*C). The sums run in another order, so the
float64 results agree to about 1e-15; x0 is identical.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dllm.kernels._triton import jit, tl


@dataclasses.dataclass
class VocabStats:
    x0: torch.Tensor                 # [B, R] int64
    conf: torch.Tensor               # [B, R] float64
    c: torch.Tensor | None           # [B, R] float64 (want_c)
    H: torch.Tensor | None           # [B, R] float64 (prev given)


def vocab_stats_torch(logits: torch.Tensor, prev: torch.Tensor | None = None, want_c: bool = False,
                      prev_rows: torch.Tensor | None = None) -> VocabStats:
    if prev is not None and prev_rows is not None:
        prev = prev[torch.arange(prev.shape[0], device=prev.device)[:, None], prev_rows]    # [B, R, V]
    x0 = logits.argmax(-1)
    p = F.softmax(logits.double(), dim=-1)                                      # [B, R, V]
    conf = p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    c = 1 - torch.topk(p, min(2, p.shape[-1]), dim=-1).values[..., -1] if want_c else None
    H = None
    if prev is not None:
        q = F.softmax(prev.double(), dim=-1)
        H = 1 - (p * q).sum(-1) / (p.norm(dim=-1) * q.norm(dim=-1))
    return VocabStats(x0, conf, c, H)


@jit
def _vocab_kernel(l_ptr, p_ptr, pi_ptr, x0_ptr, conf_ptr, c_ptr, h_ptr, V, R, GP, HAS_PREV: tl.constexpr,
                  PREV_ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row, prow = l_ptr + r * V, p_ptr + r * V
    if PREV_ROWS:                                     # row (b, i) against prev[b, prev_rows[b, i]]
        prow = p_ptr + ((r // R) * GP + tl.load(pi_ptr + r)) * V
    neg = float("-inf")
    m1 = tl.full([], neg, tl.float32)                 # largest logit, second largest, first argmax
    m2 = tl.full([], neg, tl.float32)
    idx = tl.full([], 0, tl.int64)
    pm = tl.full([], neg, tl.float32)
    for v0 in tl.range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        m = offs < V
        x = tl.load(row + offs, mask=m, other=neg).to(tl.float32)
        cm = tl.max(x, axis=0)
        ci = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int64)
        cm2 = tl.max(tl.where(offs == v0 + ci, neg, x), axis=0)
        idx = tl.where(cm > m1, v0 + ci, idx)
        m2 = tl.maximum(tl.minimum(m1, cm), tl.maximum(m2, cm2))
        m1 = tl.maximum(m1, cm)
        if HAS_PREV:
            pm = tl.maximum(pm, tl.max(tl.load(prow + offs, mask=m, other=neg).to(tl.float32), axis=0))
    mx = m1.to(tl.float64)
    S = tl.full([], 0.0, tl.float64)
    A = tl.full([], 0.0, tl.float64)
    B = tl.full([], 0.0, tl.float64)
    C = tl.full([], 0.0, tl.float64)
    for v0 in tl.range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        m = offs < V
        e = tl.exp(tl.load(row + offs, mask=m, other=neg).to(tl.float64) - mx)
        S += tl.sum(e, axis=0)
        if HAS_PREV:
            e2 = tl.exp(tl.load(prow + offs, mask=m, other=neg).to(tl.float64) - pm.to(tl.float64))
            A += tl.sum(e * e2, axis=0)
            B += tl.sum(e * e, axis=0)
            C += tl.sum(e2 * e2, axis=0)
    tl.store(x0_ptr + r, idx)
    tl.store(conf_ptr + r, 1.0 / S)
    tl.store(c_ptr + r, 1.0 - tl.exp(m2.to(tl.float64) - mx) / S)
    if HAS_PREV:
        tl.store(h_ptr + r, 1.0 - A / tl.sqrt(B * C))


def vocab_stats_triton(logits: torch.Tensor, prev: torch.Tensor | None = None, want_c: bool = False,
                       prev_rows: torch.Tensor | None = None) -> VocabStats:
    B, R, V = logits.shape
    logits = logits.contiguous()
    prev = prev.contiguous() if prev is not None else None
    prev_rows = prev_rows.contiguous() if prev is not None and prev_rows is not None else None
    dev = logits.device
    x0 = torch.empty((B, R), dtype=torch.long, device=dev)
    conf = torch.empty((B, R), dtype=torch.float64, device=dev)
    c = torch.empty((B, R), dtype=torch.float64, device=dev)
    H = torch.empty((B, R), dtype=torch.float64, device=dev) if prev is not None else None
    if B * R:
        _vocab_kernel[(B * R,)](logits, prev if prev is not None else logits,
                                prev_rows if prev_rows is not None else x0, x0, conf, c,
                                H if H is not None else conf, V, R, prev.shape[1] if prev_rows is not None else 0,
                                HAS_PREV=prev is not None, PREV_ROWS=prev_rows is not None,
                                BLOCK_V=min(4096, 1 << max(0, V - 1).bit_length()), num_warps=8)
    return VocabStats(x0, conf, c if want_c else None, H)
