"""Building blocks shared by LLaDA and Dream: RMSNorm, RoPE and one decoder layer.

Both architectures are pre-norm SwiGLU transformers with rotate-half RoPE and
non-causal attention; they differ only in head counts (MHA vs GQA), q/k/v bias
and where logits are read. One layer class serves both.

The layer has two forwards:
- ``forward(h)``: the plain full-sequence layer, the reference.
- ``forward_rows(h_rows, pos, kv_len, k_cache, v_cache)``: recompute only the rows at
  ``pos`` against cached keys/values of the whole canvas (the exported contract,
  docs/engine-dir.md), never attending to keys past each sequence's length ``kv_len``
  (right padding). With ``pos = 0..N-1`` and ``kv_len = N`` it equals ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from dllm.spec import ModelSpec


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled (LLaDA's order)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [.., k, head_dim] in fp32 for integer positions ``pos`` [.., k]."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device) / head_dim)
    freqs = pos.to(torch.float32).unsqueeze(-1) * inv_freq          # [.., k, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)                         # [.., k, hd]
    return emb.cos(), emb.sin()


def key_valid(kv_len: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] bool: the canvas rows before each sequence's length ``kv_len`` [B] (the rest is padding)."""
    return torch.arange(n, device=kv_len.device)[None, :] < kv_len[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32. x [B, k, H, hd]; cos/sin [B, k, hd]."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    out = xf * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)
    return out.to(x.dtype)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention of q [B,k,H,hd] over keys/values [B,N,Hkv,hd] (Hkv divides H); softmax in fp32.
    ``key_valid`` [B, N] bool: the keys each sequence may attend to (None: all). Returns [B, k, H*hd]."""
    B, k, H, hd = q.shape
    group = H // keys.shape[2]
    if q.is_cuda and not torch.onnx.is_in_onnx_export():
        # Fused attention on the GPU (fp32 accumulation inside); the explicit path below is
        # what gets exported and what CPU runs, so CPU results match the ONNX graphs.
        mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2),
                                             values.transpose(1, 2), attn_mask=mask, enable_gqa=group > 1)
        return out.transpose(1, 2).reshape(B, k, H * hd)
    qh = q.transpose(1, 2).float()                                       # [B, H, k, hd]
    kh = keys.transpose(1, 2).float().repeat_interleave(group, dim=1)    # [B, H, N, hd]
    vh = values.transpose(1, 2).float().repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * (hd ** -0.5)       # [B, H, k, N]
    if key_valid is not None:   # padding keys: exp(-inf) = 0, so every valid score is unchanged
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vh).to(q.dtype)                            # [B, H, k, hd]
    return out.transpose(1, 2).reshape(B, k, H * hd)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP. Parameter names are internal; the loader maps HF names."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        D, H, Hkv, hd, Fh = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.mlp_hidden
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, hd
        self.rope_theta = spec.rope_theta
        kw = dict(dtype=dtype)
        self.attn_norm = RMSNorm(D, spec.norm_eps, dtype)
        self.q_proj = nn.Linear(D, H * hd, bias=spec.qkv_bias, **kw)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=spec.qkv_bias, **kw)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=spec.qkv_bias, **kw)
        self.o_proj = nn.Linear(H * hd, D, bias=False, **kw)
        self.mlp_norm = RMSNorm(D, spec.norm_eps, dtype)
        self.gate_proj = nn.Linear(D, Fh, bias=False, **kw)
        self.up_proj = nn.Linear(D, Fh, bias=False, **kw)
        self.down_proj = nn.Linear(Fh, D, bias=False, **kw)

    # -- pieces -----------------------------------------------------------
    def project_qkv(self, h: torch.Tensor, pos: torch.Tensor):
        """q, k (after RoPE) and v for rows h [B, k, D] at positions pos [B, k]."""
        B, k, _ = h.shape
        a = self.attn_norm(h)
        q = self.q_proj(a).view(B, k, self.n_heads, self.head_dim)
        key = self.k_proj(a).view(B, k, self.n_kv_heads, self.head_dim)
        v = self.v_proj(a).view(B, k, self.n_kv_heads, self.head_dim)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(key, cos, sin), v

    def value_rows(self, h: torch.Tensor) -> torch.Tensor:
        """V = W_V * attn_norm(h): the cheap change probe of DCU's value proxy. [B, k, Hkv, hd]."""
        B, k, _ = h.shape
        return self.v_proj(self.attn_norm(h)).view(B, k, self.n_kv_heads, self.head_dim)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """o_proj of ``attention(q, keys, values, key_valid)``: q [B,k,H,hd] -> [B, k, D]."""
        return self.o_proj(attention(q, keys, values, key_valid))

    def mlp(self, y: torch.Tensor) -> torch.Tensor:
        n = self.mlp_norm(y)
        return self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))

    # -- forwards ---------------------------------------------------------
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Full layer on all rows h [B, N, D]."""
        B, N, _ = h.shape
        pos = torch.arange(N, device=h.device).expand(B, N)
        q, key, v = self.project_qkv(h, pos)
        y = h + self.attend(q, key, v)
        return y + self.mlp(y)

    def forward_rows(self, h_rows, pos, kv_len, k_cache, v_cache):
        """Recompute rows at ``pos`` against the canvas caches.

        h_rows [B,k,D], pos [B,k] int (canvas rows = positions), kv_len [B] int (each sequence's canvas
        length: keys at rows >= kv_len are padding), k_cache/v_cache [B,N,Hkv,hd] (keys after RoPE).
        Returns k_rows, v_rows [B,k,Hkv,hd] and the residual deltas attn_rows, mlp_rows [B,k,D]. The
        caches are not modified: fresh rows are scattered into copies for attention.
        """
        q, k_rows, v_rows = self.project_qkv(h_rows, pos)
        idx = pos.long()[:, :, None, None].expand(-1, -1, self.n_kv_heads, self.head_dim)
        keys = k_cache.scatter(1, idx, k_rows)
        values = v_cache.scatter(1, idx, v_rows)
        attn_rows = self.attend(q, keys, values, key_valid(kv_len, k_cache.shape[1]))
        mlp_rows = self.mlp(h_rows + attn_rows)
        return k_rows, v_rows, attn_rows, mlp_rows
