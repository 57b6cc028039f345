"""Executor: runs the engines of one model for one decoding step, following a cache policy.

It owns the EngineSet and the device-resident state, allocated once per canvas shape:

| tensor (per layer l)        | shape           | what                                                    |
|-----------------------------|-----------------|---------------------------------------------------------|
| canvas                      | [B, N] int64    | the token ids being denoised (the decode loop fills it)  |
| k_cache[l], v_cache[l]      | [B, N, Hkv, hd] | keys (after RoPE) and values of every canvas row          |
| attn_cache[l], mlp_cache[l] | [B, N, D]       | attention and MLP residual deltas                         |
| prev_in[l] (input proxy)    | [B, G, D]       | the layer's gen input rows at the previous step           |

(The value proxy compares against the gen rows of v_cache itself.)

One step (``run_step``): ``h = embed(canvas)``; for each layer: change scores if the policy wants them,
ask the policy for rows, run the layer on ``h[rows]`` at ``pos = rows``, scatter its outputs into the
caches, then ``h = (h + attn_cache) + mlp_cache``, which is bit for bit the full layer's
``y = h + attn; y + mlp(y)``. The head runs only on the rows whose logits the commit policy needs
(Dream: position i reads hidden row i-1), the commit policy picks the tokens, and the canvas is
updated. The host reads back only the committed positions: one sync per step.

Two implementations of the work around the engines (``EngineSet.ops``, see dllm.kernels):

- fused (``KernelOps``, Triton kernels or their torch twins): change score + copy in one pass, row
  selection and gather in two, the delta scatter fused into the residual update, which covers only
  the rows anything still reads this step (``CachePolicy.row_floor``); torch layers write their key and
  value rows into the caches themselves;
- plain (``ops is None``): the original torch ops, kept as the reference the fused path is tested against.

CUDA graphs (``EngineSet.cuda_graphs``, torch backend on CUDA): a whole step (embedding, layers, head
and, when the commit policy is capturable, its decision and the canvas update) is captured the second
time its key repeats and replayed from then on, so the host launches one graph per step and waits only
for the committed positions. Steps whose key does not repeat (DCU's proportional budgets) capture
single layers instead. See runtime/graphs.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch.nn.functional as F

from dllm.engines.engine_set import EngineSet
from dllm.errors import BackendError
from dllm.runtime.cache_policy import CachePolicy, make_cache_policy
from dllm.runtime.commit import CommitPolicy, make_commit_policy
from dllm.runtime.config import Proxy
from dllm.runtime.graphs import GraphCache
from dllm.runtime.view import StepView


@dataclasses.dataclass
class StepStats:
    rows: list[int]          # rows recomputed per layer
    engine_s: float          # host time spent launching or running engines (launch time only on async devices)


@dataclasses.dataclass
class StepOutcome:
    committed: list[int]     # absolute canvas positions committed this step, ascending
    stats: StepStats


class Executor:
    """Engines plus per-layer caches; ``run_step(cache, commit, view, lo, hi)`` decodes one step."""

    def __init__(self, engines: EngineSet):
        self.engines = engines
        self.ops = engines.ops
        self.cuda_graphs = bool(getattr(engines, "cuda_graphs", False))
        if self.cuda_graphs and (engines.backend.value != "torch" or torch.device(engines.device).type != "cuda"):
            raise BackendError("cuda_graphs needs the torch backend on a CUDA device; "
                               f"got {engines.backend.value} on {engines.device}")
        self.step_graphs, self.layer_graphs = GraphCache(), GraphCache()
        self._policies: dict = {}
        self._commits: dict = {}
        self.spec = engines.spec
        self.device = torch.device(engines.device)
        self.dtype = engines.dtype.torch
        self._shape: tuple | None = None
        self._graph_shape: tuple | None = None
        self.vbuf: torch.Tensor | None = None
        self._layers = [engines.layer(i) for i in range(self.spec.n_layers)]
        self._takes_pad = [any(t.name == "pad" for t in e.inputs) for e in self._layers]
        self.profiling = False        # mark embed/layer/head/commit as profiler ranges (tools/step_profile.py)

    def _region(self, name: str):
        return torch.profiler.record_function(f"dllm::{name}") if self.profiling else contextlib.nullcontext()

    # -- policies (kept per config: captured graphs read their buffers) ------
    def cache_policy(self, cfg, spec) -> CachePolicy:
        """The cache policy for ``cfg``, reused by later generations with the same config."""
        policy = self._policies.get(cfg)
        if policy is None:
            policy = self._policies[cfg] = make_cache_policy(cfg, spec)
            policy.ops = self.ops
        return policy

    def commit_policy(self, cfg, spec) -> CommitPolicy:
        """The commit policy for ``cfg``, reused by later generations with the same config."""
        policy = self._commits.get(cfg)
        if policy is None:
            policy = self._commits[cfg] = make_commit_policy(cfg, spec.arch, spec.mask_id)
            policy.ops = self.ops
        return policy

    @property
    def graphs_captured(self) -> int:
        return len(self.step_graphs) + len(self.layer_graphs)

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
            self.pad = torch.zeros(B, dtype=torch.int32, device=dev)             # left padding per sequence
            self.canvas = torch.empty((B, N), dtype=torch.long, device=dev)
            self.canvas_i32 = torch.empty((B, N), dtype=torch.int32, device=dev)
            self.transfer = torch.zeros((B, N), dtype=torch.bool, device=dev)      # last commit, rows [0, R)
            self.pinned = torch.empty((B, N), dtype=torch.bool, pin_memory=True) if dev.type == "cuda" else None
            self.slot = torch.full((B, N), -1, dtype=torch.int32, device=dev)    # see kernels/residual.py
            self.logit_flat = torch.empty(B * (G + 1) * s.vocab_size, dtype=dt, device=dev)
            self._shape = (B, N)
            self._prev_in_shape = None
        self.slot.fill_(-1)
        if (B, N, P) != self._graph_shape:
            self.step_graphs.clear()      # graphs bake P (the gen slice) and buffer addresses
            self.layer_graphs.clear()
            self._graph_shape = (B, N, P)
        if self.logit_flat.numel() < B * (G + 1) * s.vocab_size:
            self.logit_flat = torch.empty(B * (G + 1) * s.vocab_size, dtype=dt, device=dev)
        self.B, self.N, self.P, self.G = B, N, P, G
        self.proxy = policy.proxy
        if self.proxy == Proxy.INPUT and self._prev_in_shape != (B, G):
            self.prev_in = [torch.empty((B, G, s.d_model), dtype=dt, device=dev) for _ in range(L)]
            self._prev_in_shape = (B, G)
        if self.proxy == Proxy.VALUE and (self.vbuf is None or self.vbuf.shape[:2] != (B, G)):
            self.vbuf = torch.empty((B, G, s.n_kv_heads, s.head_dim), dtype=dt, device=dev)

    # -- one step, as the decode loop runs it --------------------------------
    @torch.inference_mode()
    def run_step(self, cache: CachePolicy, commit: CommitPolicy, view: StepView, lo: int, hi: int) -> StepOutcome:
        """Layers, head and commit for canvas positions [lo, hi); updates ``self.canvas`` and returns the
        committed positions (the step's one host sync)."""
        t0 = time.perf_counter()
        commit_key = commit.step_key(view) if self.cuda_graphs else None
        key = self._step_key(cache, commit, commit_key, view, lo, hi) if self.cuda_graphs else None
        replayed, payload = self.step_graphs.replay(key) if key is not None else (False, None)
        if replayed:
            rows, logits = payload
        else:
            graphed_commit = commit if commit_key is not None else None
            rows, logits = self._step_body(cache, graphed_commit, view, lo, hi, self.cuda_graphs)
            if key is not None and self.step_graphs.seen(key):
                self.step_graphs.capture(key, lambda: self._step_body(cache, graphed_commit, view, lo, hi, False))
        if commit_key is None:                  # the commit runs eagerly on the head's logits
            self.apply_commit(commit, logits, view, lo, hi)
        cache.after_step()
        commit.after_step(view)
        engine_s = time.perf_counter() - t0
        return StepOutcome(self.read_committed(lo, hi), StepStats(rows, engine_s))

    def _step_body(self, cache, commit, view, lo, hi, layer_graphs: bool):
        logits, rows = self._forward(cache, view, lo, hi, layer_graphs)
        if commit is not None:
            self.apply_commit(commit, logits, view, lo, hi)
        return rows, logits

    def apply_commit(self, commit: CommitPolicy, logits: torch.Tensor, view: StepView, lo: int, hi: int) -> None:
        """Let ``commit`` pick tokens from the logits of positions [lo, hi) and write them into the canvas."""
        with self._region("commit"):
            ids = self.canvas[:, lo:hi]
            transfer, x0 = commit.select(logits, ids, view)                   # [B, R] each
            self.canvas[:, lo:hi] = torch.where(transfer, x0, ids)
            self.transfer[:, :hi - lo].copy_(transfer)

    def read_committed(self, lo: int, hi: int) -> list[int]:
        """The positions the last ``apply_commit`` committed (waits for the device: the step's one sync)."""
        R = hi - lo
        if self.pinned is not None:
            self.pinned[:, :R].copy_(self.transfer[:, :R], non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()          # the one sync per step
            mask = self.pinned[0, :R]
        else:
            mask = self.transfer[0, :R]
        return [lo + j for j in mask.nonzero().flatten().tolist()]

    def _step_key(self, cache, commit, commit_key, view, lo, hi) -> tuple | None:
        """What fixes a whole step's kernels; None when a layer cannot be captured."""
        scored = self._scored(cache, view)
        layer_keys = tuple(cache.layer_key(l, scored[l]) for l in range(len(self._layers)))
        if any(k is None for k in layer_keys):
            return None
        starts = tuple(self._residual_starts(cache, lo)) if self.ops is not None else None
        return (id(cache), id(commit), layer_keys, starts, commit_key, lo, hi)

    # -- layers and head ------------------------------------------------------
    @torch.inference_mode()
    def step(self, canvas: torch.Tensor, policy: CachePolicy, view: StepView, lo: int, hi: int
             ) -> tuple[torch.Tensor, StepStats]:
        """Every layer under ``policy`` on ``canvas`` (copied into the executor's), and the logits of canvas
        positions [lo, hi), without committing (for tests and tools)."""
        t0 = time.perf_counter()
        if canvas is not self.canvas:
            self.canvas.copy_(canvas)
        logits, rows = self._forward(policy, view, lo, hi, self.cuda_graphs)
        policy.after_step()
        return logits, StepStats(rows, time.perf_counter() - t0)

    def _scored(self, policy: CachePolicy, view: StepView) -> list[bool]:
        proxy_ready = view.step > 1                                            # step 1 wrote every cache
        return [self.proxy is not None and l > 0 and proxy_ready and policy.wants_scores(l)
                for l in range(len(self._layers))]

    def _forward(self, policy: CachePolicy, view: StepView, lo: int, hi: int, layer_graphs: bool):
        h = self.h                                                             # [B, N, D]
        with self._region("embed"):
            self.canvas_i32.copy_(self.canvas)
            self.engines.embed.run({"ids": self.canvas_i32}, {"h": h})
        scored = self._scored(policy, view)
        starts = self._residual_starts(policy, lo) if self.ops is not None else [0] * len(self._layers)
        rows_per_layer = []
        for l in range(len(self._layers)):
            key = policy.layer_key(l, scored[l]) if layer_graphs else None
            if key is not None:
                key = (id(policy), l, starts[l]) + key     # a graph reads its own policy's buffers
            replayed, n = self.layer_graphs.replay(key) if key is not None else (False, None)
            if not replayed:
                with self._region("layer"):
                    n = self._layer(l, policy, scored[l], starts[l])
                if key is not None and self.layer_graphs.seen(key):
                    self.layer_graphs.capture(key, lambda l=l: self._layer(l, policy, scored[l], starts[l]))
            rows_per_layer.append(n)
        policy.end_step()
        # Dream: logits of position i come from hidden row i-1 (lo >= P >= 1, so the slice stays inside)
        shift = 1 if self.spec.logit_shift else 0
        with self._region("head"):
            return self._head(h[:, lo - shift:hi - shift]), rows_per_layer

    def _residual_starts(self, policy: CachePolicy, lo: int) -> list[int]:
        """Per layer, the first row its residual update must cover: its own recomputed rows, and every row
        a later layer (its rows, the change scores' gen rows) or the head still reads this step."""
        shift = 1 if self.spec.logit_shift else 0
        later = lo - shift
        starts = [0] * len(self._layers)
        for l in range(len(self._layers) - 1, -1, -1):
            floor = policy.row_floor(l)
            starts[l] = later if floor is None else min(floor, later)
            reads = 0 if floor is None else floor
            if self.proxy is not None and l > 0:
                reads = min(reads, self.P)
            later = min(later, reads)
        return starts

    def _layer(self, l: int, policy: CachePolicy, scored: bool, start: int) -> int:
        """One layer's work this step; returns the number of rows recomputed."""
        if self.ops is None:
            return self._layer_plain(l, policy, scored)
        return self._layer_fused(l, policy, scored, start)

    def _layer_fused(self, l: int, policy: CachePolicy, scored: bool, start: int) -> int:
        h, P, N, ops = self.h, self.P, self.N, self.ops
        scores = None
        if self.proxy == Proxy.INPUT and l > 0:
            if scored:
                scores = ops.cosine_distance_copy(h[:, P:], self.prev_in[l])      # [B, G], prev_in <- h
            else:
                self.prev_in[l].copy_(h[:, P:])
        elif scored:
            scores = self._value_scores(l, h)
        rows = policy.rows(l, scores)
        engine = self._layers[l]
        attn, mlp = self.attn_cache[l], self.mlp_cache[l]
        if rows is None or rows.numel() == N:
            self._run_full(l, engine, h)
            ops.residual_update(h, attn, mlp, start)
            return N
        k = rows.numel()
        h_rows, pos = ops.gather_rows(h, rows, self.slot)                     # [B, k, D], [B, k]
        out = self._row_outputs(k, engine.writes_cache)
        res = engine.run(self._layer_feeds(l, h_rows, pos), out)
        if not engine.writes_cache:
            self.k_cache[l].index_copy_(1, rows, res["k_rows"])
            self.v_cache[l].index_copy_(1, rows, res["v_rows"])
        ops.residual_update(h, attn, mlp, start, rows, res["attn_rows"], res["mlp_rows"], self.slot)
        return k

    def _layer_feeds(self, l: int, h_rows: torch.Tensor, pos: torch.Tensor) -> dict:
        """Inputs of layer l: rows, their canvas positions, the left padding (engine directories written
        before batching have no ``pad`` input and decode one unpadded sequence), the caches."""
        feeds = {"h_rows": h_rows, "pos": pos, "k_cache": self.k_cache[l], "v_cache": self.v_cache[l]}
        if self._takes_pad[l]:
            feeds["pad"] = self.pad
        return feeds

    def _row_outputs(self, k: int, deltas_only: bool) -> dict | None:
        if self.B != 1:   # leading slices of the preallocated buffers are contiguous only for B == 1
            return None
        out = {"attn_rows": self.row_attn[:, :k], "mlp_rows": self.row_mlp[:, :k]}
        if not deltas_only:
            out.update(k_rows=self.row_k[:, :k], v_rows=self.row_v[:, :k])
        return out

    def _layer_plain(self, l: int, policy: CachePolicy, scored: bool) -> int:
        h, P, N = self.h, self.P, self.N
        scores = self._scores_plain(l, h) if scored else None                  # [B, G]
        if self.proxy == Proxy.INPUT and l > 0:
            self.prev_in[l].copy_(h[:, P:])
        rows = policy.rows(l, scores)
        engine = self._layers[l]
        if rows is None or rows.numel() == N:
            self._run_full(l, engine, h)
            n = N
        else:
            self._run_rows_plain(l, engine, h, rows)
            n = rows.numel()
        h.add_(self.attn_cache[l]).add_(self.mlp_cache[l])                     # (h + attn) + mlp, every row
        return n

    def _run_full(self, l: int, engine, h: torch.Tensor) -> None:
        feeds = self._layer_feeds(l, h, self.pos_all)
        if engine.writes_cache:
            # fused torch layer: keys and values go into the caches inside the layer
            engine.run(feeds, {"attn_rows": self.attn_cache[l], "mlp_rows": self.mlp_cache[l]})
        elif self.cuda_graphs:
            # graphs bake addresses, so buffers must not trade places; the torch engine computes every
            # output before copying it into the cache, so writing in place is safe
            engine.run(feeds, {"k_rows": self.k_cache[l], "v_rows": self.v_cache[l],
                               "attn_rows": self.attn_cache[l], "mlp_rows": self.mlp_cache[l]})
        else:
            # every row is rewritten, so the stale cache fed in does not matter; outputs go to the swap
            # buffers and the tensors trade places (no copy, no input/output aliasing)
            engine.run(feeds, {"k_rows": self.row_k, "v_rows": self.row_v,
                               "attn_rows": self.attn_cache[l], "mlp_rows": self.mlp_cache[l]})
            self.k_cache[l], self.row_k = self.row_k, self.k_cache[l]
            self.v_cache[l], self.row_v = self.row_v, self.v_cache[l]

    def _run_rows_plain(self, l: int, engine, h: torch.Tensor, rows: torch.Tensor) -> None:
        B, k = self.B, rows.numel()
        h_rows = h.index_select(1, rows)                                       # [B, k, D]
        pos = rows.to(torch.int32).expand(B, k).contiguous()                   # [B, k]
        res = engine.run(self._layer_feeds(l, h_rows, pos), self._row_outputs(k, False))
        self.k_cache[l].index_copy_(1, rows, res["k_rows"])
        self.v_cache[l].index_copy_(1, rows, res["v_rows"])
        self.attn_cache[l].index_copy_(1, rows, res["attn_rows"])
        self.mlp_cache[l].index_copy_(1, rows, res["mlp_rows"])

    def _value_scores(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """Value proxy: V = W_V attn_norm(h) of every gen row vs the gen V cache, which then takes the fresh
        V (so attention sees fresh values for every gen row). [B, G]"""
        h_gen = h[:, self.P:]
        if self.B > 1:
            h_gen = h_gen.contiguous()
        v = self.engines.vproj(l).run({"h_rows": h_gen}, {"v_rows": self.vbuf})["v_rows"]   # [B, G, Hkv, hd]
        return self.ops.cosine_distance_copy(v, self.v_cache[l][:, self.P:])

    def _scores_plain(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """Per-gen-row change scores d [B, G] (1 - cosine similarity) of layer l at this step."""
        P = self.P
        h_gen = h[:, P:]                                                       # [B, G, D]
        if self.proxy == Proxy.INPUT:
            # Cosine of the raw layer inputs. RMSNorm divides each row by its RMS, which cosine ignores,
            # so this equals the cosine of the normalised inputs without the learned gain: the change
            # of the residual stream itself, with no extra matmul.
            return 1 - F.cosine_similarity(h_gen.float(), self.prev_in[l].float(), dim=-1, eps=1e-12)
        if self.B > 1:
            h_gen = h_gen.contiguous()
        v = self.engines.vproj(l).run({"h_rows": h_gen}, {"v_rows": self.vbuf})["v_rows"]   # [B, G, Hkv, hd]
        cached = self.v_cache[l][:, P:]
        d = 1 - F.cosine_similarity(v.flatten(2).float(), cached.flatten(2).float(), dim=-1, eps=1e-12)
        cached.copy_(v)
        return d

    def _head(self, h_rows: torch.Tensor) -> torch.Tensor:
        B, R = h_rows.shape[:2]
        if not h_rows.is_contiguous():
            h_rows = h_rows.contiguous()
        V = self.spec.vocab_size
        if B * R * V <= self.logit_flat.numel():
            out = self.logit_flat[:B * R * V].view(B, R, V)
            return self.engines.head.run({"h_rows": h_rows}, {"logits": out})["logits"]
        return self.engines.head.run({"h_rows": h_rows})["logits"]
