"""KernelOps: the one object the executor, the torch layers and the policies call for fused work.

``KernelOps(KernelPath.TRITON, device)`` launches the Triton kernels; ``KernelPath.TORCH`` runs their
plain-torch twins (same signatures, same results up to the rounding each kernel module states). The
executor uses the fused structure (fewer passes, in-place cache writes, row-range residual updates)
with either; ``KernelPath.PLAIN`` keeps the executor's original unfused path and has no KernelOps.
"""

from __future__ import annotations

import torch

from dllm.kernels import attention, mlp, residual, rmsnorm, rope, scores, select, vocab
from dllm.kernels.config import KernelPath

# name -> (torch twin, Triton launcher); one row per kernel module
_KERNELS = {
    "rms_norm": (rmsnorm.rms_norm_torch, rmsnorm.rms_norm_triton),
    "silu_mul": (mlp.silu_mul_torch, mlp.silu_mul_triton),
    "rope_to_cache": (rope.rope_to_cache_torch, rope.rope_to_cache_triton),
    "attention": (attention.attention_torch, attention.attention_triton),
    "residual_update": (residual.residual_update_torch, residual.residual_update_triton),
    "cosine_distance_copy": (scores.cosine_distance_copy_torch, scores.cosine_distance_copy_triton),
    "select_rows": (select.select_rows_torch, select.select_rows_triton),
    "select_rows_batched": (select.select_rows_batched_torch, select.select_rows_batched_triton),
    "gather_rows": (select.gather_rows_torch, select.gather_rows_triton),
    "vocab_stats": (vocab.vocab_stats_torch, vocab.vocab_stats_triton),
}


class KernelOps:
    """The fused operations on one device, through Triton kernels or their torch twins."""

    def __init__(self, path: KernelPath, device: torch.device, split_kv: bool = False):
        if path not in (KernelPath.TRITON, KernelPath.TORCH):
            raise ValueError(f"KernelOps runs the triton or torch path, got {path}")
        self.path, self.device = path, torch.device(device)
        self.triton = path == KernelPath.TRITON
        # split-KV Triton attention for few rows (kernels/attention.py): opt-in until GPU timings show it
        # beats torch's attention at the step's shapes (dllm-bench --attention split-kv)
        self.split_kv = split_kv and self.triton
        self.launches = 0                   # kernel calls so far (a proxy for GPU launches; profiling)
        # whether any sequence of the current batch is shorter than the canvas (the executor sets it; a host
        # flag so that layers skip the key mask, and keep the fastest attention, when none is)
        self.padded = True
        self.profiling = False              # mark each call as a profiler range (tools/step_profile.py)
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _call(self, name: str, *args, triton: bool | None = None, **kwargs):
        self.launches += 1
        triton = self.triton if triton is None else triton
        fn = _KERNELS[name][1 if triton else 0]
        if not self.profiling:
            return fn(*args, **kwargs)
        with torch.profiler.record_function(f"dllm_kernel::{name}[{'triton' if triton else 'torch'}]"):
            return fn(*args, **kwargs)

    # -- inside a layer (torch backend) -------------------------------------
    def rms_norm(self, x, weight, eps, delta=None):
        return self._call("rms_norm", x, weight, eps, delta)

    def silu_mul(self, gate, up):
        return self._call("silu_mul", gate, up)

    def rope_to_cache(self, q, key, v, pos, k_cache, v_cache, theta: float):
        """RoPE on q/key at ``pos``; rotated keys and the values are written into the caches in place."""
        table = self.rope_table(k_cache.shape[1], q.shape[-1], theta) if self.triton else None
        return self._call("rope_to_cache", q, key, v, pos, k_cache, v_cache, theta, table)

    def attention(self, q, k_cache, v_cache, kv_len):
        """Attention of q [B,k,H,hd] over the caches -> [B, k, H*hd]. With ``split_kv``, Triton's split-KV
        kernel for a few rows per sequence; torch's attention otherwise (and for more rows: enough query
        blocks to fill the GPU without splitting)."""
        few_rows = q.shape[1] <= attention.MAX_ROWS
        return self._call("attention", q, k_cache, v_cache, kv_len, self.padded, triton=self.split_kv and few_rows)

    def rope_table(self, n: int, head_dim: int, theta: float):
        """cos/sin for positions 0..n-1, computed once per (head_dim, theta) and grown when n grows."""
        key = (head_dim, float(theta))
        table = self._rope_tables.get(key)
        if table is None or table[0].shape[0] < n:
            size = max(n, 2 * table[0].shape[0] if table is not None else n)
            table = self._rope_tables[key] = rope.rope_table(size, head_dim, theta, self.device)
        return table

    # -- around the engines (executor, policies) ----------------------------
    def residual_update(self, h, attn_cache, mlp_cache, start, rows=None, attn_rows=None, mlp_rows=None,
                        slot=None, prev=None, gen_start=None, d=None):
        """h[:, start:] += cached deltas (the rows' fresh ones scattered first); with ``prev``, also the next
        layer's input-proxy scores into ``d`` and prev <- the gen rows (kernels/residual.py)."""
        return self._call("residual_update", h, attn_cache, mlp_cache, start, rows, attn_rows, mlp_rows, slot,
                          prev, gen_start, d)

    def cosine_distance_copy(self, a, prev):
        return self._call("cosine_distance_copy", a, prev)

    def select_rows(self, d, window, k, prompt_len):
        return self._call("select_rows", d, window, k, prompt_len)

    def select_rows_batched(self, d, win_start, win, k, gen_start, k_slot=None):
        """``select_rows`` for every sequence of a batch in one launch -> rows [B, win + k] (with ``k_slot`` [B],
        each sequence its own k, padded with its last row)."""
        return self._call("select_rows_batched", d, win_start, win, k, gen_start, k_slot)

    def gather_rows(self, h, rows, slot=None):
        return self._call("gather_rows", h, rows, slot)

    # -- commit policies ----------------------------------------------------
    def vocab_stats(self, logits, prev=None, want_c=False, prev_rows=None):
        return self._call("vocab_stats", logits, prev, want_c, prev_rows)
