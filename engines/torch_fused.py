"""The torch backend's fused subgraph modules: the same contract as the exported ones, fewer kernels.

``FusedLayerModule`` computes ``layer_i`` (h_rows, pos, k_cache, v_cache -> k_rows, v_rows, attn_rows,
mlp_rows) with the layer's own weights and the kernels of ``dllm.kernels``:

    a = rms_norm(h)                     one pass, model dtype, fp32 accumulation
    q, k, v = q_proj(a), k_proj(a), v_proj(a)
    q, k = rope_to_cache(q, k, v, pos)  RoPE from a table; k and v written into the caches in place
    attn = attention(q, caches)         over the caches themselves (padding rows masked): no copy of the cache;
                                        opt-in split-KV Triton kernel for a few rows (kernels/attention.py)
    n = rms_norm(h + attn)              the sum is never written
    mlp = down_proj(silu_mul(gate_proj(n), up_proj(n)))

Unlike the exported graph it writes the fresh key and value rows into ``k_cache``/``v_cache`` (the
executor then skips its own scatter of them: ``writes_cache``). With Triton kernels (a GPU) q|k|v and
gate|up are one matrix product each: with few rows a product is bound by reading its weights, and one
wide product reads them at a better rate than three narrow ones (the original projections become views
of the joined weights, so no weight is stored twice). The torch twins keep the separate products, so on
the CPU the fused path stays bit for bit equal to the plain one. ``FusedHeadModule`` is the head with
the fused RMSNorm. These modules serve the torch backend only; ONNX export never sees them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dllm.exporter.models.layers import DecoderLayer


def join_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum(out), in] weight (and bias) for several Linears over the same input; each Linear's own
    weight becomes a view of it, so memory is not doubled and later edits stay visible to both."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.detach() for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[start:start + n]
        if bias is not None:
            lin.bias.data = bias[start:start + n]
        start += n
    return weight, bias


class FusedLayerModule(nn.Module):
    writes_cache = True

    def __init__(self, layer: DecoderLayer, ops):
        super().__init__()
        self.layer, self.ops = layer, ops
        self.joined = ops.triton
        self.qkv_weight = self.qkv_bias = self.gate_up_weight = None    # joined at the first call, on its device

    def _join(self) -> None:
        L = self.layer
        if self.qkv_weight is None or self.qkv_weight.device != L.q_proj.weight.device:
            self.qkv_weight, self.qkv_bias = join_linears(L.q_proj, L.k_proj, L.v_proj)
            self.gate_up_weight, _ = join_linears(L.gate_proj, L.up_proj)

    def forward(self, h_rows, pos, kv_len, k_cache, v_cache):
        L, ops = self.layer, self.ops
        B, k, _ = h_rows.shape
        H, Hkv, hd = L.n_heads, L.n_kv_heads, L.head_dim
        a = ops.rms_norm(h_rows, L.attn_norm.weight, L.attn_norm.eps)
        if self.joined:
            self._join()
            qkv = F.linear(a, self.qkv_weight, self.qkv_bias)               # [B, k, (H + 2 Hkv) hd]
            q, key, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        else:
            q, key, v = L.q_proj(a), L.k_proj(a), L.v_proj(a)
        q, key, v = q.view(B, k, H, hd), key.view(B, k, Hkv, hd), v.view(B, k, Hkv, hd)
        q, k_rows = ops.rope_to_cache(q, key, v, pos, k_cache, v_cache, L.rope_theta)
        attn_rows = L.o_proj(ops.attention(q, k_cache, v_cache, kv_len))   # [B, k, D]
        n = ops.rms_norm(h_rows, L.mlp_norm.weight, L.mlp_norm.eps, delta=attn_rows)
        if self.joined:
            gate, up = F.linear(n, self.gate_up_weight).chunk(2, dim=-1)   # [B, k, Fh] each (views)
        else:
            gate, up = L.gate_proj(n), L.up_proj(n)
        mlp_rows = L.down_proj(ops.silu_mul(gate, up))
        return k_rows, v, attn_rows, mlp_rows


class FusedHeadModule(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Linear, ops):
        super().__init__()
        self.norm, self.lm_head, self.ops = norm, lm_head, ops

    def forward(self, h_rows):
        return self.lm_head(self.ops.rms_norm(h_rows, self.norm.weight, self.norm.eps))   # [B, k, V]
