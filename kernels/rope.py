"""Rotary embedding of a layer's query and key rows, and the write of the fresh keys and values into
the canvas caches, in one pass.

The torch twin is the exported layer's own math (``rope_cos_sin`` + ``apply_rope`` in fp32, rounded to
the model dtype) followed by a scatter into the caches. The Triton kernel reads cos/sin from a table
computed once per device with the same formula, applies the rotation in fp32 with the same operation
order and no fused multiply-add, and stores the rotated keys and the values straight into the caches:
it matches the twin bit for bit.
"""

from __future__ import annotations

import torch

from dllm.exporter.models.layers import apply_rope, rope_cos_sin
from dllm.kernels._triton import jit, next_pow2, tl


def rope_table(n: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim // 2] fp32 for positions 0..n-1, by ``rope_cos_sin``'s formula (its two halves
    repeat, so half is enough)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.arange(n, dtype=torch.float32, device=device).unsqueeze(-1) * inv_freq   # [n, hd/2]
    return freqs.cos(), freqs.sin()


def rope_to_cache_torch(q, key, v, pos, k_cache, v_cache, theta: float, table=None):
    """The plain twin. q [B,k,H,hd], key/v [B,k,Hkv,hd], pos [B,k] int; caches [B,N,Hkv,hd] (updated in
    place at ``pos``). Returns (q rotated, key rotated)."""
    cos, sin = rope_cos_sin(pos, q.shape[-1], theta)
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
    idx = pos.long()[:, :, None, None].expand(-1, -1, key.shape[2], key.shape[3])
    k_cache.scatter_(1, idx, k_rot)
    v_cache.scatter_(1, idx, v)
    return q_rot, k_rot


@jit
def _rotate(row_ptr, heads, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate-half RoPE of one row's ``heads`` heads in fp32: x*cos + rotate_half(x)*sin, as two halves.
    Returns the in-row offsets of the first halves, their mask, and the two rotated halves."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, HALF)[None, :]
    m = h < heads
    off = h * (2 * HALF) + j
    x1 = tl.load(row_ptr + off, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptr + off + HALF, mask=m, other=0.0).to(tl.float32)
    return off, m, x1 * c - x2 * s, x2 * c + x1 * s


@jit
def _rope_to_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, kc_ptr, vc_ptr,
                          q_rs, k_rs, v_rs, rows_per_batch, N, H, HKV,
                          HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)                  # one row (batch b, position pos[r]) per program
    b = r // rows_per_batch
    p = tl.load(pos_ptr + r).to(tl.int64)
    j = tl.arange(0, HALF)[None, :]
    c = tl.load(cos_ptr + p * HALF + j)
    s = tl.load(sin_ptr + p * HALF + j)
    q_out, kv_out, cache_row = r * H * 2 * HALF, r * HKV * 2 * HALF, (b * N + p) * HKV * 2 * HALF
    # queries: rotated into their own output
    off, m, o1, o2 = _rotate(q_ptr + r * q_rs, H, c, s, HALF, BLOCK_H)
    tl.store(qo_ptr + q_out + off, o1.to(qo_ptr.dtype.element_ty), mask=m)
    tl.store(qo_ptr + q_out + off + HALF, o2.to(qo_ptr.dtype.element_ty), mask=m)
    # keys: rotated into the row output and into the cache row at pos
    off, m, o1, o2 = _rotate(k_ptr + r * k_rs, HKV, c, s, HALF, BLOCK_HKV)
    k1, k2 = o1.to(ko_ptr.dtype.element_ty), o2.to(ko_ptr.dtype.element_ty)
    tl.store(ko_ptr + kv_out + off, k1, mask=m)
    tl.store(ko_ptr + kv_out + off + HALF, k2, mask=m)
    tl.store(kc_ptr + cache_row + off, k1, mask=m)
    tl.store(kc_ptr + cache_row + off + HALF, k2, mask=m)
    # values: copied into the cache row at pos
    tl.store(vc_ptr + cache_row + off, tl.load(v_ptr + r * v_rs + off, mask=m), mask=m)
    tl.store(vc_ptr + cache_row + off + HALF, tl.load(v_ptr + r * v_rs + off + HALF, mask=m), mask=m)


def rope_to_cache_triton(q, key, v, pos, k_cache, v_cache, theta: float, table):
    B, k, H, hd = q.shape
    Hkv, N = key.shape[2], k_cache.shape[1]
    cos, sin = table
    if pos.numel() and cos.shape[0] < N:
        raise ValueError(f"rope table covers {cos.shape[0]} positions, the canvas has {N}")
    q, key, v = _packed_rows(q), _packed_rows(key), _packed_rows(v)
    pos = pos.contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_to_cache writes the caches through their data pointers; pass contiguous caches")
    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_rot = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if B * k:
        _rope_to_cache_kernel[(B * k,)](q, key, v, pos, cos, sin, q_rot, k_rot, k_cache, v_cache,
                                        _row_stride(q), _row_stride(key), _row_stride(v), k, N, H, Hkv,
                                        HALF=hd // 2, BLOCK_H=next_pow2(H), BLOCK_HKV=next_pow2(Hkv),
                                        num_warps=4, enable_fp_fusion=False)
    return q_rot, k_rot


def _packed_rows(t: torch.Tensor) -> torch.Tensor:
    """[B, k, heads, hd] whose rows may be strided (views into a fused q|k|v product) but whose heads and
    head dims are packed, and whose rows are evenly spaced across the batch; copied otherwise."""
    B, k, heads, hd = t.shape
    packed = t.stride(3) == 1 and t.stride(2) == hd and (B == 1 or t.stride(0) == k * t.stride(1))
    return t if packed else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(1) if t.shape[1] > 1 or t.shape[0] == 1 else t.stride(0)
