"""Attention of a few recomputed rows over the canvas caches, split along the keys (split-KV).

A DCU step recomputes about 65 rows per layer. A flash-attention kernel gives each (sequence, head, block of
64 queries) one program: 64 programs for LLaDA-8B's 32 heads, on a GPU with 132 streaming processors, each
walking all 1280 keys alone. This kernel also splits the keys into ranges of ``KEYS_PER_RANGE``, so that
the GPU is full: each program computes its query block's attention over one key range with an online
softmax and writes the unnormalized output, its running maximum and its sum of exponentials; a second
kernel combines the ranges of each query row (exactly: each range's output is rescaled by
exp(max_s - max)). ``KernelOps`` uses it only when asked (``split_kv``) until GPU timings favour it.
Keys at rows >= kv_len[b] (a padded sequence of a batch) are never read.

The torch twin is the layer's own attention (``dllm.exporter.models.layers.attention``: explicit fp32 on
the CPU, torch's fused attention on CUDA). The kernel matches it to rounding: scores and the softmax
are fp32, and the probabilities meet the values in the model dtype as in flash attention (fp32
models: full fp32 products, no TF32). Triton's CPU interpreter computes every product in fp32 (its
bf16 ``tl.dot`` returns garbage in Triton 3.9).
"""

from __future__ import annotations

import math

import torch

from dllm.exporter.models.layers import attention, key_valid
from dllm.kernels._triton import interpreting, jit, next_pow2, tl

# Above this many query rows per sequence the caller uses torch's attention: a full recompute has enough
# query blocks to fill the GPU without splitting the keys.
MAX_ROWS = 128
BLOCK_N = 64          # keys per inner iteration
# Keys per range: fixed, so that the ranges over a sequence's keys are the same whatever the canvas
# (a batch's canvas is longer than a sequence's own, and the ranges past its kv_len are empty and weigh
# exactly 0) and its sums run in the same order alone and in a batch. 1280 keys make 10 ranges: 320
# programs for LLaDA-8B's 32 heads, more than two per processor of an H100/H200.
KEYS_PER_RANGE = 128


def attention_torch(q, k_cache, v_cache, kv_len, padded: bool = True):
    """The twin. q [B,k,H,hd], caches [B,N,Hkv,hd], kv_len [B] int -> [B, k, H*hd] in q's dtype.
    ``padded`` False promises kv_len == N for every sequence (no mask: torch's fastest attention)."""
    valid = key_valid(kv_len, k_cache.shape[1]) if padded else None
    return attention(q, k_cache, v_cache, valid)


@jit
def _split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, m_ptr, l_ptr,
                  rows, H, GROUP, split_len, S, scale,
                  q_sb, q_sr, c_sb, c_sr,
                  HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    bh = tl.program_id(0)                               # sequence b, query head h
    mb = tl.program_id(1)                               # block of query rows
    s = tl.program_id(2)                                # key range
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP                                     # the key/value head this query head reads
    n_valid = tl.load(len_ptr + b)
    start = s * split_len
    end = tl.minimum(start + split_len, n_valid)
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + b * q_sb + m[:, None] * q_sr + h * HD + d[None, :], mask=m[:, None] < rows, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    kv_base = b * c_sb + hk * HD
    for n0 in tl.range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        kt = tl.load(k_ptr + kv_base + n[None, :] * c_sr + d[:, None], mask=valid[None, :], other=0.0)  # [HD, N]
        if IEEE:
            sc = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            sc = tl.dot(q, kt)
        sc = tl.where(valid[None, :], sc * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))     # finite: every iteration has a valid key
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_base + n[:, None] * c_sr + d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # partials [B*H, S, rows_pad(, HD)]: a range with no valid keys leaves max -inf, sum 0, output 0
    part = (bh * S + s).to(tl.int64) * tl.num_programs(1) * BLOCK_M + m
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(o_ptr + part[:, None] * HD + d[None, :], acc)


@jit
def _combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, rows, rows_pad, H, S,
                    HD: tl.constexpr, BLOCK_R: tl.constexpr):
    bh = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)     # a block of query rows per program
    b = bh // H
    h = bh % H
    d = tl.arange(0, HD)
    base = (bh * S).to(tl.int64) * rows_pad
    m_all = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(S):                                  # the largest maximum over the key ranges
        m_all = tl.maximum(m_all, tl.load(m_ptr + base + s * rows_pad + r))
    num = tl.zeros([BLOCK_R, HD], tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for s in range(S):                                  # each range rescaled to it; empty ranges weigh 0
        m_s = tl.load(m_ptr + base + s * rows_pad + r)
        w = tl.where(m_s > float("-inf"), tl.exp(m_s - m_all), 0.0)
        den += w * tl.load(l_ptr + base + s * rows_pad + r)
        num += w[:, None] * tl.load(o_ptr + (base + s * rows_pad + r)[:, None] * HD + d[None, :])
    out = num / tl.where(den > 0, den, 1.0)[:, None]   # an empty sequence (kv_len 0): 0, not NaN
    dst = ((b * rows + r) * H + h).to(tl.int64) * HD
    tl.store(out_ptr + dst[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=(r < rows)[:, None])


def split_plan(rows: int, n: int, keys_per_range: int = KEYS_PER_RANGE) -> tuple[int, int]:
    """(BLOCK_M, number of key ranges) for ``rows`` queries per sequence over ``n`` keys."""
    if keys_per_range <= 0 or keys_per_range % BLOCK_N:
        raise ValueError(f"keys_per_range must be a positive multiple of {BLOCK_N}, got {keys_per_range}")
    return min(128, max(16, next_pow2(rows))), math.ceil(n / keys_per_range)


def attention_triton(q, k_cache, v_cache, kv_len, padded: bool = True, keys_per_range: int = KEYS_PER_RANGE):
    """The kernel; same contract as the twin (``padded`` is ignored: kv_len is always honoured)."""
    B, k, H, hd = q.shape
    N, Hkv = k_cache.shape[1], k_cache.shape[2]
    if hd != next_pow2(hd) or hd < 16:
        raise ValueError(f"split-KV attention needs a power-of-two head dim >= 16, got {hd}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(3) == 1 and q.stride(2) == hd):
        q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    out = torch.empty(B, k, H * hd, dtype=q.dtype, device=q.device)
    if B * k == 0:
        return out
    block_m, S = split_plan(k, N, keys_per_range)
    m_blocks = math.ceil(k / block_m)
    rows_pad = m_blocks * block_m
    o_part = torch.empty(B * H, S, rows_pad, hd, dtype=torch.float32, device=q.device)
    m_part = torch.empty(B * H, S, rows_pad, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    kv_len = kv_len.to(torch.int32).contiguous()
    _split_kernel[(B * H, m_blocks, S)](
        q, k_cache, v_cache, kv_len, o_part, m_part, l_part,
        k, H, H // Hkv, keys_per_range, S, hd ** -0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        HD=hd, BLOCK_M=block_m, BLOCK_N=BLOCK_N, IEEE=q.dtype == torch.float32 or interpreting(),
        num_warps=4 if block_m <= 64 else 8)
    block_r = min(32, block_m)                         # divides rows_pad; 32 x HD fp32 sums fit in registers
    _combine_kernel[(B * H, rows_pad // block_r)](o_part, m_part, l_part, out, k, rows_pad, H, S,
                                                  HD=hd, BLOCK_R=block_r, num_warps=4)
    return out
