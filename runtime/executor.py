"""Executor: runs the engines of one model for one step, following a cache policy.

It owns the EngineSet and the device-resident state, allocated once per canvas shape:

| tensor (per layer l)     | shape            | what                                                    |
|--------------------------|------------------|---------------------------------------------------------|
| k_cache[l], v_cache[l]   | [B, N, Hkv, hd]  | keys (after RoPE) and values of every canvas row          |
| attn_cache[l], mlp_cache[l] | [B, N, D]     | attention and MLP residual deltas (A.1)                   |
| prev_in[l] (input proxy) | [B, G, D]        | the layer's gen input rows at the previous step           |

(The value proxy compares against the gen rows of v_cache itself.)

One step: ``h = embed(canvas)``; for each layer: change scores if the policy wants them, ask the
policy for rows, run the layer on ``h[rows]`` at ``pos = rows``, scatter its outputs into the caches,
then ``h = (h + attn_cache) + mlp_cache`` for every row, which is bit for bit the full layer's
``y = h + attn; y + mlp(y)``. Finally the head runs only on the rows whose logits the commit
policy needs (Dream: position i reads hidden row i-1). No host syncs inside the layer loop.

CUDA graphs (``EngineSet.cuda_graphs``, torch backend on CUDA): each layer's work for one step
(change scores, row selection, engine, scatters, residual update) is captured as a graph the second
time its ``policy.layer_key`` repeats, and replayed from then on, so a step costs one replay per
layer instead of dozens of kernel launches. Row counts are part of the key, so the few shapes a
run uses are captured once each (uniform DCU budgets: two graphs per layer). Everything a graph
touches lives in persistent buffers; full layers write straight into the caches.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from dllm.engines.engine_set import EngineSet
from dllm.errors import BackendError
from dllm.runtime.cache_policy import CachePolicy, make_cache_policy
from dllm.runtime.config import Proxy
from dllm.runtime.view import StepView


@dataclasses.dataclass
class StepStats:
    rows: list[int]          # rows recomputed per layer
    engine_s: float          # host time spent inside engine calls (launch time only on async devices)


class Executor:
    """Engines plus per-layer caches; ``step(canvas, policy, view, lo, hi) -> logits [B, hi-lo, V]``."""

    # capture a layer's graph the second time its key is seen (a key seen once costs no capture)
    CAPTURE_AFTER = 2

    def __init__(self, engines: EngineSet):
        self.engines = engines
        self.cuda_graphs = bool(getattr(engines, "cuda_graphs", False))
        if self.cuda_graphs and (engines.backend.value != "torch" or torch.device(engines.device).type != "cuda"):
            raise BackendError("cuda_graphs needs the torch backend on a CUDA device; "
                               f"got {engines.backend.value} on {engines.device}")
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, int]] = {}
        self._seen: dict[tuple, int] = {}
        self._pool = None
        self._policies: dict = {}
        self.spec = engines.spec
        self.device = torch.device(engines.device)
        self.dtype = engines.dtype.torch
        self._shape: tuple | None = None
        self._graph_shape: tuple | None = None
        self.vbuf: torch.Tensor | None = None
        self._layers = [engines.layer(i) for i in range(self.spec.n_layers)]

    # -- state --------------------------------------------------------------
    def reset(self, batch: int, prompt_len: int, canvas_len: int, policy: CachePolicy) -> None:
        """Prepare for a new generation; buffers are reused when the canvas shape repeats."""
        s, dev, dt = self.spec, self.device, self.dtype
        B, N, P, L = batch, canvas_len, prompt_len, s.n_layers
        G = N - P
        if policy.proxy == Proxy.VALUE and not self.engines.has_vproj:
            raise BackendError("the value proxy (dcu --proxy value, dcu-reference, dllm-cache) needs the vproj "
                               "engines, and this engine set has none; re-export with vproj subgraphs or use "
                               "--proxy input")
        kv = (B, N, s.n_kv_heads, s.head_dim)
        if self._shape != (B, N):
            e = lambda shape: torch.empty(shape, dtype=dt, device=dev)   # noqa: E731
            self.k_cache = [e(kv) for _ in range(L)]
            self.v_cache = [e(kv) for _ in range(L)]
            self.attn_cache = [e((B, N, s.d_model)) for _ in range(L)]
            self.mlp_cache = [e((B, N, s.d_model)) for _ in range(L)]
            # row outputs; k/v also serve as the swap buffers of full layers (no in/out aliasing)
            self.row_k, self.row_v = e(kv), e(kv)
            self.row_attn, self.row_mlp = e((B, N, s.d_model)), e((B, N, s.d_model))
            self.h = e((B, N, s.d_model))
            self.pos_all = torch.arange(N, device=dev, dtype=torch.int32).expand(B, N).contiguous()
            self.canvas_i32 = torch.empty((B, N), dtype=torch.int32, device=dev)
            self._shape = (B, N)
            self._prev_in_shape = None
        if (B, N, P) != self._graph_shape:
            self._graphs.clear()      # graphs bake P (the gen slice) and buffer addresses
            self._seen.clear()
            self._graph_shape = (B, N, P)
        self.B, self.N, self.P, self.G = B, N, P, G
        self.proxy = policy.proxy
        if self.proxy == Proxy.INPUT and self._prev_in_shape != (B, G):
            self.prev_in = [torch.empty((B, G, s.d_model), dtype=dt, device=dev) for _ in range(L)]
            self._prev_in_shape = (B, G)
        if self.proxy == Proxy.VALUE and (self.vbuf is None or self.vbuf.shape[:2] != (B, G)):
            self.vbuf = torch.empty((B, G, s.n_kv_heads, s.head_dim), dtype=dt, device=dev)
        self.logit_buf: torch.Tensor | None = None

    # -- one step -----------------------------------------------------------
    @torch.inference_mode()
    def step(self, canvas: torch.Tensor, policy: CachePolicy, view: StepView, lo: int, hi: int
             ) -> tuple[torch.Tensor, StepStats]:
        """Run every layer under ``policy`` and return logits of canvas positions [lo, hi) and stats."""
        B = self.B
        h = self.h                                                             # [B, N, D]
        clock, eng = time.perf_counter, 0.0
        t0 = clock()
        self.canvas_i32.copy_(canvas)
        self.engines.embed.run({"ids": self.canvas_i32}, {"h": h})
        eng += clock() - t0
        proxy_ready = view.step > 1                                            # step 1 wrote every cache
        rows_per_layer = []
        for l in range(len(self._layers)):
            scored = self.proxy is not None and l > 0 and proxy_ready and policy.wants_scores(l)
            t0 = clock()
            key = policy.layer_key(l, scored) if self.cuda_graphs else None
            if key is not None:
                key = (id(policy), l) + key       # a graph reads its own policy's buffers
            graph = self._graphs.get(key) if key is not None else None
            if graph is not None:
                graph[0].replay()
                rows_per_layer.append(graph[1])
            else:
                rows_per_layer.append(self._layer(l, policy, scored))
                if key is not None:
                    self._maybe_capture(l, key, policy, scored)
            eng += clock() - t0
        policy.end_step()
        # Dream: logits of position i come from hidden row i-1 (lo >= P >= 1, so the slice stays inside)
        shift = 1 if self.spec.logit_shift else 0
        h_rows = h[:, lo - shift:hi - shift]
        if B > 1:
            h_rows = h_rows.contiguous()
        t0 = clock()
        logits = self._head(h_rows)
        eng += clock() - t0
        return logits, StepStats(rows_per_layer, eng)

    def _layer(self, l: int, policy: CachePolicy, scored: bool) -> int:
        """One layer's work this step; returns the number of rows recomputed."""
        h, P, N = self.h, self.P, self.N
        scores = self._scores(l, h) if scored else None                        # [B, G]
        if self.proxy == Proxy.INPUT and l > 0:
            self.prev_in[l].copy_(h[:, P:])
        rows = policy.rows(l, scores)
        engine = self._layers[l]
        if rows is None or rows.numel() == N:
            if self.cuda_graphs:
                self._run_full_in_place(l, engine, h)
            else:
                self._run_full(l, engine, h)
            n = N
        else:
            self._run_rows(l, engine, h, rows)
            n = rows.numel()
        h.add_(self.attn_cache[l]).add_(self.mlp_cache[l])                     # (h + attn) + mlp, every row
        return n

    def _maybe_capture(self, l: int, key: tuple, policy: CachePolicy, scored: bool) -> None:
        """Record layer l's work as a CUDA graph once its key has been seen CAPTURE_AFTER times.

        The eager run just did this step's work; capturing only records kernels (nothing runs),
        so the caches are not touched twice.
        """
        seen = self._seen.get(key, 0) + 1
        self._seen[key] = seen
        if seen < self.CAPTURE_AFTER:
            return
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # every tensor a graph outputs is copied into persistent buffers inside it, so graphs can
        # share one memory pool: they replay one at a time on one stream
        with torch.cuda.graph(graph, pool=self._pool):
            n = self._layer(l, policy, scored)
        self._graphs[key] = (graph, n)

    @property
    def graphs_captured(self) -> int:
        return len(self._graphs)

    def cache_policy(self, cfg, spec) -> CachePolicy:
        """The cache policy for ``cfg``, kept per config so its buffers (and the graphs that read
        them) are reused by later generations with the same config."""
        policy = self._policies.get(cfg)
        if policy is None:
            policy = self._policies[cfg] = make_cache_policy(cfg, spec)
        return policy

    def _run_full_in_place(self, l: int, engine, h: torch.Tensor) -> None:
        # graph mode: buffers must not trade places (a graph bakes addresses); the torch engine
        # computes every output before copying it into the cache, so writing in place is safe
        engine.run({"h_rows": h, "pos": self.pos_all, "k_cache": self.k_cache[l], "v_cache": self.v_cache[l]},
                   {"k_rows": self.k_cache[l], "v_rows": self.v_cache[l],
                    "attn_rows": self.attn_cache[l], "mlp_rows": self.mlp_cache[l]})

    def _run_full(self, l: int, engine, h: torch.Tensor) -> None:
        # every row is rewritten, so the stale cache fed in does not matter; outputs go to the swap
        # buffers and the tensors trade places (no copy, no input/output aliasing)
        engine.run({"h_rows": h, "pos": self.pos_all, "k_cache": self.k_cache[l], "v_cache": self.v_cache[l]},
                   {"k_rows": self.row_k, "v_rows": self.row_v,
                    "attn_rows": self.attn_cache[l], "mlp_rows": self.mlp_cache[l]})
        self.k_cache[l], self.row_k = self.row_k, self.k_cache[l]
        self.v_cache[l], self.row_v = self.row_v, self.v_cache[l]

    def _run_rows(self, l: int, engine, h: torch.Tensor, rows: torch.Tensor) -> None:
        B, k = self.B, rows.numel()
        h_rows = h.index_select(1, rows)                                       # [B, k, D]
        pos = rows.to(torch.int32).expand(B, k).contiguous()                   # [B, k]
        out = None
        if B == 1:   # leading slices of the preallocated buffers are contiguous only for B == 1
            out = {"k_rows": self.row_k[:, :k], "v_rows": self.row_v[:, :k],
                   "attn_rows": self.row_attn[:, :k], "mlp_rows": self.row_mlp[:, :k]}
        res = engine.run({"h_rows": h_rows, "pos": pos, "k_cache": self.k_cache[l], "v_cache": self.v_cache[l]},
                         out)
        self.k_cache[l].index_copy_(1, rows, res["k_rows"])
        self.v_cache[l].index_copy_(1, rows, res["v_rows"])
        self.attn_cache[l].index_copy_(1, rows, res["attn_rows"])
        self.mlp_cache[l].index_copy_(1, rows, res["mlp_rows"])

    def _scores(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """Per-gen-row change scores d [B, G] (1 - cosine similarity) of layer l at this step."""
        P = self.P
        h_gen = h[:, P:]                                                       # [B, G, D]
        if self.proxy == Proxy.INPUT:
            # Cosine of the raw layer inputs. RMSNorm divides each row by its RMS, which cosine ignores,
            # so this equals the cosine of the normalised inputs without the learned gain: the change
            # of the residual stream itself, with no extra matmul.
            return 1 - F.cosine_similarity(h_gen.float(), self.prev_in[l].float(), dim=-1, eps=1e-12)
        # value proxy: V = W_V attn_norm(h) of every gen row vs the gen V cache, then the cache takes
        # the fresh V (A.3, A.7), so attention sees fresh values for every gen row
        if self.B > 1:
            h_gen = h_gen.contiguous()
        v = self.engines.vproj(l).run({"h_rows": h_gen}, {"v_rows": self.vbuf})["v_rows"]   # [B, G, Hkv, hd]
        cached = self.v_cache[l][:, P:]
        d = 1 - F.cosine_similarity(v.flatten(2).float(), cached.flatten(2).float(), dim=-1, eps=1e-12)
        cached.copy_(v)
        return d

    def _head(self, h_rows: torch.Tensor) -> torch.Tensor:
        B, R = h_rows.shape[:2]
        V = self.spec.vocab_size
        if B == 1:
            if self.logit_buf is None:
                self.logit_buf = torch.empty((1, self.G + 1, V), dtype=self.dtype, device=self.device)
            if R <= self.logit_buf.shape[1]:
                return self.engines.head.run({"h_rows": h_rows}, {"logits": self.logit_buf[:, :R]})["logits"]
        return self.engines.head.run({"h_rows": h_rows})["logits"]
