"""Executor: runs the engines of one model for one decoding step, following a cache policy.

It owns the EngineSet and the device-resident state, allocated once per canvas shape:

| tensor (per layer l)        | shape           | what                                                    |
|-----------------------------|-----------------|---------------------------------------------------------|
| canvas                      | [B, N] int64    | the token ids being denoised (the decode loop fills it)  |
| k_cache[l], v_cache[l]      | [B, N, Hkv, hd] | keys (after RoPE) and values of every canvas row          |
| attn_cache[l], mlp_cache[l] | [B, N, D]       | attention and MLP residual deltas                         |
| prev_in[l] (input proxy)    | [B, G, D]       | the layer's gen input rows at the previous step           |

(The value proxy compares against the gen rows of v_cache itself.)

One step (``run_batch``, one ``SlotStep`` per sequence of the batch): ``h = embed(canvas)``; for each
layer: change scores if a policy wants them, ask each sequence's policy for its rows (or, where every
sequence's rows are a window plus its k most-changed rows, ``CachePolicy.topk_rows``, pick the whole
batch's in one launch, each sequence with its own k when their budgets differ, and take every sequence's
mean change score in one more launch), run the layer on ``h[b, rows[b]]`` (every sequence the same number
of rows: a shorter list repeats its last row, which recomputes and writes the same values), scatter its outputs
into the caches, then ``h = (h + attn_cache) + mlp_cache``, which is bit for bit the full layer's
``y = h + attn; y + mlp(y)``.
The head runs only on the rows whose logits each commit policy needs (Dream: position i reads hidden
row i-1), each sequence's commit policy picks its tokens, and the canvas is updated. The host reads back
only the committed positions: one sync per step, whatever the batch size. Sequences of different lengths
share the canvas padded at the end (``set_lengths``): each sits in the rows it has alone, and the layers
never attend to the padding rows. A slot without a sequence (``None``) computes whatever its rows hold
and is ignored.

Two implementations of the work around the engines (``EngineSet.ops``, see dllm.kernels):

- fused (``KernelOps``, Triton kernels or their torch twins): row selection and gather in two passes,
  the delta scatter fused into the residual update, which covers only the rows anything still reads
  this step (``CachePolicy.row_floor``) and, with the input proxy, also takes the next layer's change
  scores (and its copy of the gen rows) from the rows it has just written; torch layers write their key
  and value rows into the caches themselves;
- plain (``ops is None``): the original torch ops, kept as the reference the fused path is tested against.

CUDA graphs (``EngineSet.cuda_graphs``, torch backend on CUDA): a whole step (embedding, layers, head
and, when the commit policy is capturable, its decision and the canvas update) is captured the second
time its key repeats and replayed from then on, so the host launches one graph per step and waits only
for the committed positions. Steps whose key does not repeat capture single layers instead. With graphs,
a layer whose rows are a window plus each sequence's top-k (DCU) runs a bucketed row count (``row_bucket``
of its largest k; the padding repeats a sequence's last row, as in a batch), each sequence's own k read
from a device table, and where it costs few rows every such layer of the step takes the step's largest
bucket. So DCU's proportional budgets, which move from layer to layer and step to step, change neither
the layers' keys nor, mostly, the step's (``_bucketed``). See runtime/graphs.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from dllm.engines.engine_set import EngineSet
from dllm.errors import BackendError
from dllm.kernels.residual import scatter_rows
from dllm.kernels.select import batched_k, gather_rows_torch
from dllm.runtime.cache_policy import CachePolicy, allocate_budgets, make_cache_policy
from dllm.runtime.commit import BatchRows, CommitPolicy, make_commit_policy
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


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """What one sequence's cache policy fixes for a whole step before any layer runs (host values only)."""
    scored: tuple[bool, ...]          # per layer: the executor computes change scores for it
    layer_keys: tuple                 # per layer CachePolicy.layer_key (None: that layer is never captured)
    starts: tuple[int, ...]           # per layer: the first row its residual update covers (fused path)
    topk: tuple[tuple[int, int] | None, ...]   # per layer: CachePolicy.topk_rows where scored, else None


@dataclasses.dataclass
class SlotStep:
    """One sequence's part of a batched step: its policies, its view and the rows [lo, hi) it needs logits of."""
    cache: CachePolicy
    commit: CommitPolicy | None
    view: StepView
    lo: int
    hi: int
    # the executor's SlotPlan for this step, found once (a SlotStep lives for one step)
    plan: SlotPlan | None = dataclasses.field(default=None, repr=False, compare=False)


class Executor:
    """Engines plus per-layer caches; ``run_step(cache, commit, view, lo, hi)`` decodes one step."""

    def __init__(self, engines: EngineSet):
        self.engines = engines
        self.ops = engines.ops
        self.cuda_graphs = bool(getattr(engines, "cuda_graphs", False))
        if self.cuda_graphs and (engines.backend.value != "torch" or torch.device(engines.device).type != "cuda"):
            raise BackendError("cuda_graphs needs the torch backend on a CUDA device; "
                               f"got {engines.backend.value} on {engines.device}")
        dev = torch.device(engines.device)
        self.step_graphs, self.layer_graphs = GraphCache(device=dev), GraphCache(device=dev)
        # bucketed top-k row counts (see the module docstring): with graphs only, since on the CPU or
        # without graphs the padding rows would cost compute and buy nothing
        self.row_buckets = self.cuda_graphs and getattr(engines, "row_buckets", True)
        self.step_bucket_slack = float(engines.step_bucket_slack)
        self._policies: dict = {}
        self._commits: dict = {}
        self.spec = engines.spec
        self.device = torch.device(engines.device)
        self.dtype = engines.dtype.torch
        self._shape: tuple | None = None
        self._graph_shape: tuple | None = None
        self.vbuf: torch.Tensor | None = None
        self._layers = [engines.layer(i) for i in range(self.spec.n_layers)]
        self._takes_kv_len = [e.decl.takes_kv_len for e in self._layers]
        self.profiling = False        # mark embed/layer/head/commit as profiler ranges (tools/step_profile.py)
        self.steps_run = 0            # batched steps since creation (dllm-bench --batch: time per step)
        # SlotPlans by (policy, CachePolicy.plan_key(), ...): with CUDA graphs a step's host work is mostly
        # these per-layer questions, and their answers repeat from step to step (scripts/host-overhead.py)
        self._plans: dict[tuple, SlotPlan] = {}
        # per batch of plans: which layers pick every sequence's rows in one launch (see _batched_topk)
        self._batch_plans: dict[tuple, tuple] = {}

    def _region(self, name: str):
        return torch.profiler.record_function(f"dllm::{name}") if self.profiling else contextlib.nullcontext()

    # -- policies (kept per config: captured graphs read their buffers) ------
    def cache_policy(self, cfg, spec, slot: int = 0) -> CachePolicy:
        """The cache policy of batch slot ``slot`` for ``cfg``, reused by later generations with the same config."""
        policy = self._policies.get((cfg, slot))
        if policy is None:
            policy = self._policies[(cfg, slot)] = make_cache_policy(cfg, spec)
            policy.ops = self.ops
        return policy

    def commit_policy(self, cfg, spec, slot: int = 0) -> CommitPolicy:
        """The commit policy of batch slot ``slot`` for ``cfg``, reused by later generations with the same config."""
        policy = self._commits.get((cfg, slot))
        if policy is None:
            policy = self._commits[(cfg, slot)] = make_commit_policy(cfg, spec.arch, spec.mask_id)
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
            self.rows_all = torch.arange(N, device=dev)                          # every row, as row indices
            self.kv_len = torch.full((B,), N, dtype=torch.int32, device=dev)     # each sequence's canvas length
            self.gen_start_t = torch.zeros((B,), dtype=torch.int32, device=dev)  # each one's first gen row
            self.win_start_t = torch.zeros((B,), dtype=torch.int32, device=dev)  # each one's window start
            # its host side: pinned, so the per-step upload is asynchronous (the previous one is done by
            # then: each step ends with the readback's sync)
            self.win_start_host = torch.zeros((B,), dtype=torch.int32, pin_memory=dev.type == "cuda")
            # each sequence's k per layer, where the batch picks its rows together with different k (DCU's
            # proportional budgets), and each one's mean change score per layer (CachePolicy.bind_layer_means)
            self.k_slot_t = torch.zeros((L, B), dtype=torch.int32, device=dev)
            self.k_slot_host = torch.zeros((L, B), dtype=torch.int32, pin_memory=dev.type == "cuda")
            self.layer_means = torch.zeros((L, B), dtype=torch.float32, device=dev)
            self._mean_columns = [self.layer_means[:, b] for b in range(B)]
            # where a batched commit finds each sequence's rows: lo, range length, block start and end
            # (relative to lo) and the gen row of lo, per slot (see _commit_rows)
            self.commit_meta_t = torch.zeros((5, B), dtype=torch.long, device=dev)
            self.commit_meta_host = torch.zeros((5, B), dtype=torch.long, pin_memory=dev.type == "cuda")
            # each slot's hidden rows for the head, [B, R] flattened from the front (see _prepare_head)
            self.head_idx_t = torch.zeros((B * N,), dtype=torch.long, device=dev)
            self.head_idx_host = torch.zeros((B * N,), dtype=torch.long, pin_memory=dev.type == "cuda")
            self._commit_tables: dict = {}          # per commit policy kind and config (CommitPolicy.make_batch_tables)
            self.canvas = torch.empty((B, N), dtype=torch.long, device=dev)
            self.canvas_i32 = torch.empty((B, N), dtype=torch.int32, device=dev)
            self.transfer = torch.zeros((B, N), dtype=torch.bool, device=dev)      # last commit, rows [0, R)
            self.pinned = torch.empty((B, N), dtype=torch.bool, pin_memory=True) if dev.type == "cuda" else None
            self.slot = torch.full((B, N), -1, dtype=torch.int32, device=dev)    # see kernels/residual.py
            self.logit_flat = torch.empty(B * (G + 1) * s.vocab_size, dtype=dt, device=dev)
            self._shape = (B, N)
            self._prev_in_shape = None
        self.slot.fill_(-1)
        self.lengths = None
        self._plans.clear()
        self._batch_plans.clear()
        self._win_starts = self._k_table = self._commit_meta = self._head_ranges = None
        self._commit_group = None
        self._means_bound = [False] * B
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
            # the next layer's scores, written by a layer's residual update (fused path; a persistent
            # buffer, so that a replayed layer graph and the next layer agree on where they are)
            self.next_scores = torch.empty((B, G), dtype=torch.float32, device=dev)
            self._prev_in_shape = (B, G)
        if self.proxy == Proxy.VALUE and (self.vbuf is None or self.vbuf.shape[:2] != (B, G)):
            self.vbuf = torch.empty((B, G, s.n_kv_heads, s.head_dim), dtype=dt, device=dev)
        self.set_lengths([N] * B)

    def set_lengths(self, lengths: list[int]) -> None:
        """Each slot's canvas length (its prompt + generation); rows from there on are padding."""
        lengths = tuple(int(n) for n in lengths)
        if lengths == self.lengths:
            return
        self.lengths = lengths
        self.kv_len.copy_(torch.tensor(lengths, dtype=torch.int32))
        gen_start = [n - self.G for n in lengths]
        self.gen_start_t.copy_(torch.tensor(gen_start, dtype=torch.int32))
        self.gen_start = gen_start[0] if len(set(gen_start)) == 1 else None   # one slice serves every slot
        if self.gen_start is None:
            idx = torch.tensor([list(range(s, s + self.G)) for s in gen_start], device=self.device)
            self.gen_idx = idx                                                  # [B, G] each slot's gen rows
        if self.ops is not None:
            self.ops.padded = any(n < self.N for n in lengths)   # none padded: no key mask (fastest attention)

    def clear_slot(self, b: int) -> None:
        """Forget what slot b's previous sequence left in the per-row bookkeeping (a new sequence takes it)."""
        self.slot[b].fill_(-1)

    # -- one step, as the decode loop runs it --------------------------------
    def run_step(self, cache: CachePolicy, commit: CommitPolicy, view: StepView, lo: int, hi: int) -> StepOutcome:
        """``run_batch`` for a batch of one sequence."""
        return self.run_batch([SlotStep(cache, commit, view, lo, hi)])[0]

    @torch.inference_mode()
    def run_batch(self, steps: list[SlotStep | None]) -> list[StepOutcome | None]:
        """Layers, head and commit of every sequence (``steps[b]`` for slot b, None for an empty slot);
        updates ``self.canvas`` and returns each sequence's committed positions (one host sync in all)."""
        if len(steps) != self.B:
            raise ValueError(f"run_batch got {len(steps)} slots for a batch of {self.B}")
        t0 = time.perf_counter()
        self._prepare_rows(steps)
        self._prepare_commits(steps)
        self._prepare_head(steps)
        commit_keys = [None if st is None else st.commit.step_key(st.view) for st in steps] \
            if self.cuda_graphs else [None] * self.B
        capturable = self.cuda_graphs and all(st is None or k is not None for st, k in zip(steps, commit_keys))
        key = self._step_key(steps, commit_keys) if self.cuda_graphs else None
        replayed, payload = self.step_graphs.replay(key) if key is not None else (False, None)
        if replayed:
            rows, logits = payload
            rows = self._fresh_counts(steps, rows)
        else:
            rows, logits = self._step_body(steps, capturable, self.cuda_graphs)
            if key is not None and self.step_graphs.seen(key):
                self.step_graphs.capture(key, lambda: self._step_body(steps, capturable, False))
        if not capturable:                      # the commits run eagerly on the head's logits
            self._commit_all(steps, logits)
        for st in steps:
            if st is not None:
                st.cache.after_step()
                st.commit.after_step(st.view)
        engine_s = time.perf_counter() - t0
        committed = self._read_committed_all(steps)
        if len(steps) > 1:
            self._allocate_next(steps)
        self.steps_run += 1
        return [None if st is None else StepOutcome(c, StepStats(r, engine_s))
                for st, c, r in zip(steps, committed, rows)]

    def _step_body(self, steps, commit: bool, layer_graphs: bool):
        logits, rows = self._forward(steps, layer_graphs)
        if commit:
            self._commit_all(steps, logits)
        return rows, logits

    def _commit_all(self, steps, logits: torch.Tensor) -> None:
        if self._commit_group is not None:
            self._commit_together(steps, logits, self._commit_group)
            return
        for b, st in enumerate(steps):
            if st is not None:
                self.apply_commit(st.commit, logits[b:b + 1, :st.hi - st.lo], st.view, st.lo, st.hi, b)

    def _prepare_commits(self, steps) -> None:
        """Before the step, outside any graph: whether every sequence's commit policy decides this step with the
        others (the same ``CommitPolicy.batch_key``); if so, bind their state to the batch's tables and upload
        where each sequence's rows are (one small copy, only when they move)."""
        self._commit_group = None
        live = [st for st in steps if st is not None]
        if not self._by_tables(steps) or self.ops is None or not live:
            return
        keys = {st.commit.batch_key(st.view) for st in live}
        if len(keys) != 1 or None in keys:
            return
        first = live[0].commit
        tkey = (type(first), first.cfg)
        if tkey not in self._commit_tables:
            with torch.inference_mode(False):       # policies write their rows outside inference mode (reset)
                self._commit_tables[tkey] = first.make_batch_tables(self.B, self.G, self.spec.vocab_size,
                                                                    self.dtype, self.device)
        tables = self._commit_tables[tkey]
        for b, st in enumerate(steps):
            if st is not None:
                st.commit.bind_batch(tables, b)
        # an idle slot: one row at canvas position 0 outside any block, read and written back unchanged
        meta = tuple(zip(*[(0, 1, 0, 0, 0) if st is None else
                           (st.lo, st.hi - st.lo, st.view.start - st.lo, st.view.end - st.lo,
                            st.lo - st.view.prompt_len) for st in steps]))
        self._commit_meta = _upload(self.commit_meta_t, self.commit_meta_host, meta, self._commit_meta)
        self._commit_group = (first, live[0].view, tables, keys.pop())

    def _by_tables(self, steps) -> bool:
        """Whether the head and a commit that decides with the others find each sequence's rows in device
        tables (``head_idx_t``, ``commit_meta_t``): always in a batch, and for one sequence where its steps
        are captured, so that one graph serves its steps in every block (see _step_key)."""
        return len(steps) > 1 or self.cuda_graphs

    def _commit_rows(self, R: int):
        """Each sequence's rows of a batched commit over R rows, from ``commit_meta_t`` (device work only)."""
        lo, n, b_lo, b_hi, g0 = self.commit_meta_t[:, :, None]                 # [B, 1] each
        r = self.rows_all[:R]
        last = torch.minimum(r, n - 1)                                         # [B, R]
        return BatchRows(last=last, idx=lo + last, gen=g0 + last, in_block=(r >= b_lo) & (r < b_hi), valid=r < n)

    def _commit_together(self, steps, logits: torch.Tensor, group) -> None:
        """One ``select_batch`` for every sequence; rows past a sequence's range repeat its last row and write
        the same value to the same canvas position."""
        first, view, tables, _ = group
        R = logits.shape[1]
        with self._region("commit"):
            rows = self._commit_rows(R)
            ids = self.canvas.gather(1, rows.idx)
            transfer, x0 = first.select_batch(view, logits, ids, rows, tables)
            self.canvas.scatter_(1, rows.idx, torch.where(transfer, x0, ids).gather(1, rows.last))
            self.transfer[:, :R].copy_(transfer & rows.valid)

    def apply_commit(self, commit: CommitPolicy, logits: torch.Tensor, view: StepView, lo: int, hi: int,
                     b: int = 0) -> None:
        """Let ``commit`` pick slot b's tokens from the logits [1, hi-lo, V] of positions [lo, hi) and write
        them into the canvas."""
        with self._region("commit"):
            ids = self.canvas[b:b + 1, lo:hi]
            transfer, x0 = commit.select(logits, ids, view)                   # [1, R] each
            self.canvas[b:b + 1, lo:hi] = torch.where(transfer, x0, ids)
            self.transfer[b:b + 1, :hi - lo].copy_(transfer)

    def read_committed(self, lo: int, hi: int) -> list[int]:
        """The positions slot 0's last ``apply_commit`` committed (the step's one sync)."""
        return self._read_committed_all([SlotStep(None, None, None, lo, hi)])[0]

    def _read_committed_all(self, steps) -> list[list[int]]:
        R = max((st.hi - st.lo for st in steps if st is not None), default=0)
        if self.pinned is not None:
            B = len(steps)
            self.pinned[:B, :R].copy_(self.transfer[:B, :R], non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()          # the one sync per step
            mask = self.pinned
        else:
            mask = self.transfer
        mask = mask.numpy()                   # host memory: numpy's nonzero costs a few µs, torch's tens
        return [[] if st is None else (np.flatnonzero(mask[b, :st.hi - st.lo]) + st.lo).tolist()
                for b, st in enumerate(steps)]

    def _allocate_next(self, steps) -> None:
        """The next step's budgets of every sequence whose policy asks (DCU's proportional and softmax
        allocation) in one pass and one readback, after the step's sync, instead of one sync per sequence in
        its ``begin_step``."""
        groups: dict[tuple, list] = {}
        for st in steps:
            request = None if st is None else st.cache.next_budgets_request()
            if request is not None:
                groups.setdefault(request[0], []).append((st, request[1]))
        for args, members in groups.items():
            budgets = allocate_budgets(torch.stack([scores for _, scores in members]), *args)
            for (st, _), ks in zip(members, budgets):
                st.cache.set_next_budgets(st.view.step + 1, ks)

    def _step_key(self, steps, commit_keys) -> tuple | None:
        """What fixes a whole step's kernels; None when a layer cannot be captured."""
        topk, layer_keys = self._batched_topk(steps), self._layer_keys(steps)
        # With graphs the head reads its rows from head_idx_t, and a commit that decides with the others
        # (commit_meta_t) or eagerly after the step finds each sequence's rows outside the graph: there the
        # step depends on where the sequences are only through the row count R, so steps at different block
        # positions share a graph. A commit inside the graph on its own rows bakes them.
        eager_commits = any(st is not None and k is None for st, k in zip(steps, commit_keys))
        tables_only = self._commit_group is not None or eager_commits
        parts = []
        for st, ck, keys in zip(steps, commit_keys, layer_keys):
            if st is None:
                parts.append(None)
                continue
            if None in keys:
                return None
            where = () if tables_only else (ck, st.lo, st.hi)
            parts.append((id(st.cache), id(st.commit), keys) + where)
        starts = tuple(self._residual_starts(steps)) if self.ops is not None else None
        group = None if self._commit_group is None else self._commit_group[3]     # the batch_key they share
        R = max(st.hi - st.lo for st in steps if st is not None) if tables_only else None
        return (tuple(parts), topk, starts, self.lengths, group, R)

    def _plan(self, st: SlotStep) -> SlotPlan:
        """``st``'s SlotPlan, remembered under the policy's ``plan_key`` (asked afresh when it is None)."""
        if st.plan is not None:
            return st.plan
        pk = st.cache.plan_key()
        if pk is None:
            st.plan = self._make_plan(st)
            return st.plan
        # the policy object itself (not its id) in the key: it cannot be collected and its id reused
        key = (st.cache, pk, st.cache.P, st.view.step > 1, st.lo, self.proxy)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 4096:          # bounded: proportional budgets can make every step new
                self._plans.clear()
            plan = self._plans[key] = self._make_plan(st)
        st.plan = plan
        return plan

    def _make_plan(self, st: SlotStep) -> SlotPlan:
        scored = self._scored(st.cache, st.view)
        layer_keys = tuple(st.cache.layer_key(l, scored[l]) for l in range(len(self._layers)))
        topk = tuple(st.cache.topk_rows(l) if scored[l] else None for l in range(len(self._layers)))
        return SlotPlan(tuple(scored), layer_keys,
                        tuple(self._residual_starts_one(st.cache, st.lo)), topk)

    def _batched_topk(self, steps) -> tuple:
        """Per layer, (w, k, per_slot) where every sequence of the batch picks its rows as ``CachePolicy.topk_rows``
        says with the same window length w, else None. There the fused executor picks the whole batch's rows in
        one launch (``select_rows_batched``) instead of asking each sequence's policy: k is the sequences'
        shared k, or (per_slot) their largest, or with ``row_buckets`` the step's largest rounded up to a
        bucket, each one's own k coming from ``k_slot_t``."""
        return self._batch_plan(steps)[1]

    def _batch_plan(self, steps) -> tuple:
        """(plans, per-layer batched choice, per-sequence k table or None, per-sequence layer keys for the step
        key or None), remembered per combination of plans. The layer keys leave out what the k table holds:
        a per-sequence choice's layer key is ("topk",), whatever the sequence's budget."""
        n_layers = len(self._layers)
        if self.ops is None or (len(steps) == 1 and not self.row_buckets):
            return None, (None,) * n_layers, None, None
        plans = [None if st is None else self._plan(st) for st in steps]
        key = tuple(map(id, plans))
        hit = self._batch_plans.get(key)
        if hit is None:
            live = [p for p in plans if p is not None]
            shared = tuple(_shared_topk([p.topk[l] for p in live]) if live else None for l in range(n_layers))
            if self.row_buckets:
                shared = _bucketed(shared, [p.topk for p in live], self.step_bucket_slack)
                if len(steps) == 1 and not any(t is not None and t[2] for t in shared):
                    shared = (None,) * n_layers            # one sequence, nothing bucketed: its policy picks
            table = layer_keys = None
            if any(t is not None and t[2] for t in shared):
                table = tuple(tuple(p.topk[l][1] if p is not None and t is not None else 0 for p in plans)
                              for l, t in enumerate(shared))
                layer_keys = tuple(None if p is None else
                                   tuple(("topk",) if t is not None and t[2] and k is not None else k
                                         for k, t in zip(p.layer_keys, shared)) for p in plans)
            if len(self._batch_plans) >= 4096:
                self._batch_plans.clear()
            # the plans themselves stay in the entry, so their ids cannot be reused while it lives
            hit = self._batch_plans[key] = (plans, shared, table, layer_keys)
        return hit

    def _layer_keys(self, steps) -> list[tuple | None]:
        """Each slot's per-layer keys (None for an empty slot): its plan's, where a layer picks each sequence's
        own k from the device k table ("topk",) instead (the batch plan's)."""
        masked = self._batch_plan(steps)[3]
        if masked is not None:
            return list(masked)
        return [None if st is None else self._plan(st).layer_keys for st in steps]

    def _topk_counts(self, steps, l: int, choice: tuple) -> list[int]:
        """The rows each sequence recomputes of its own canvas in layer l under the batched choice (w, k,
        per_slot): host values only, so a replayed graph's counts are found afresh (its k table may differ
        from the capture's)."""
        w, k, per_slot = choice
        width = w + batched_k(self.G, w, k, None)              # select_rows_batched's row count
        return [0 if st is None else w + min(self._plan(st).topk[l][1], width - w) if per_slot else width
                for st in steps]

    def _fresh_counts(self, steps, rows: list[list[int]]) -> list[list[int]]:
        """A replayed step's rows per slot and layer, with the per-sequence top-k layers counted afresh."""
        topk = self._batched_topk(steps)
        fresh = {l: self._topk_counts(steps, l, t) for l, t in enumerate(topk) if t is not None and t[2]}
        if not fresh:
            return rows
        return [[fresh[l][b] if l in fresh else n for l, n in enumerate(r)] for b, r in enumerate(rows)]

    def _prepare_rows(self, steps) -> None:
        """Before the step, outside any graph: each policy's ``prepare_step`` (its own device buffers, which its
        ``rows`` reads in the layers it still picks itself), and each sequence's window start for the
        batched row choice."""
        batched = len(steps) > 1 and self.ops is not None
        for b, st in enumerate(steps):
            if st is not None:
                if batched:
                    self._means_bound[b] = st.cache.bind_layer_means(self._mean_columns[b])
                st.cache.prepare_step()
        _, topk, table, _ = self._batch_plan(steps)
        if any(t is not None for t in topk):
            starts = tuple(0 if st is None else st.cache.window_at for st in steps)
            self._win_starts = _upload(self.win_start_t, self.win_start_host, starts, self._win_starts)
        if table is not None:
            self._k_table = _upload(self.k_slot_t, self.k_slot_host, table, self._k_table)

    # -- layers and head ------------------------------------------------------
    @torch.inference_mode()
    def step(self, canvas: torch.Tensor, policy: CachePolicy, view: StepView, lo: int, hi: int
             ) -> tuple[torch.Tensor, StepStats]:
        """Every layer under ``policy`` on ``canvas`` (copied into the executor's), and the logits of canvas
        positions [lo, hi), without committing (for tests and tools)."""
        t0 = time.perf_counter()
        if canvas is not self.canvas:
            self.canvas.copy_(canvas)
        steps = [SlotStep(policy, None, view, lo, hi)]
        self._prepare_rows(steps)
        self._prepare_head(steps)
        logits, rows = self._forward(steps, self.cuda_graphs)
        policy.after_step()
        return logits, StepStats(rows[0], time.perf_counter() - t0)

    def _scored(self, policy: CachePolicy, view: StepView) -> list[bool]:
        proxy_ready = view.step > 1                                            # step 1 wrote every cache
        return [self.proxy is not None and l > 0 and proxy_ready and policy.wants_scores(l)
                for l in range(len(self._layers))]

    def _forward(self, steps: list[SlotStep | None], layer_graphs: bool):
        """Every layer for every slot, then the head; returns (logits [B, R, V], rows per layer per slot)."""
        h = self.h                                                             # [B, N, D]
        with self._region("embed"):
            self.canvas_i32.copy_(self.canvas)
            self.engines.embed.run({"ids": self.canvas_i32}, {"h": h})
        idle = [False] * len(self._layers)
        scored = [idle if st is None else self._plan(st).scored for st in steps]
        starts = self._residual_starts(steps) if self.ops is not None else [0] * len(self._layers)
        topk = self._batched_topk(steps)
        keys = self._layer_keys(steps) if layer_graphs else None
        rows_per_layer = []                                                    # [L][B]
        for l in range(len(self._layers)):
            scored_l = [s[l] for s in scored]
            # whether the next layer is scored (the fused path takes its scores in this layer's last pass)
            next_scored = l + 1 < len(self._layers) and any(s[l + 1] for s in scored)
            key = self._layer_key(steps, keys, l, next_scored, starts[l], topk[l]) if layer_graphs else None
            replayed, n = self.layer_graphs.replay(key) if key is not None else (False, None)
            if replayed and topk[l] is not None and topk[l][2]:
                n = self._topk_counts(steps, l, topk[l])         # the k table may differ from the capture's
            if not replayed:
                with self._region("layer"):
                    n = self._layer(l, steps, scored_l, next_scored, starts[l], topk[l])
                if key is not None and self.layer_graphs.seen(key):
                    self.layer_graphs.capture(key, lambda l=l, s=scored_l, x=next_scored:
                                              self._layer(l, steps, s, x, starts[l], topk[l]))
            rows_per_layer.append(n)
        for st in steps:
            if st is not None:
                st.cache.end_step()
        with self._region("head"):
            logits = self._head(self._head_rows(steps))
        per_slot = [[rows_per_layer[l][b] for l in range(len(self._layers))] for b in range(len(steps))]
        return logits, per_slot

    def _layer_key(self, steps, keys: list, l: int, next_scored: bool, start: int, topk: tuple | None
                   ) -> tuple | None:
        """Layer l's graph key from each slot's per-layer keys (``_layer_keys``); None: not captured."""
        parts = []
        for st, k in zip(steps, keys):
            if st is None:
                parts.append(None)
                continue
            if k[l] is None:
                return None
            parts.append((id(st.cache),) + k[l])      # a graph reads its own policies' buffers
        return (l, start, next_scored, topk, self.lengths, tuple(parts))

    def _head_rows(self, steps) -> torch.Tensor:
        """Hidden rows whose logits the commits need: [B, R] (Dream: position i reads hidden row i-1)."""
        shift = 1 if self.spec.logit_shift else 0
        if not self._by_tables(steps):          # one sequence: a slice (lo >= P >= 1 keeps it inside)
            st = steps[0]
            return self.h[:, st.lo - shift:st.hi - shift]
        B, R = len(steps), max(st.hi - st.lo for st in steps if st is not None)
        idx = self.head_idx_t[:B * R].view(B, R)             # what _prepare_head uploaded for these ranges
        return torch.gather(self.h, 1, idx[..., None].expand(-1, -1, self.h.shape[-1]))

    def _prepare_head(self, steps) -> None:
        """Before the step, outside any graph (a graph cannot hold a host-to-device copy): each slot's hidden
        rows for the head into ``head_idx_t``, one small copy when the slots' ranges change. A shorter range
        repeats its last row; an empty slot reads one row of the first live sequence's."""
        live = [st for st in steps if st is not None]
        if not self._by_tables(steps) or not live:
            return
        ranges = tuple((st.lo, st.hi) if st is not None else (live[0].lo, live[0].lo + 1) for st in steps)
        if ranges == self._head_ranges:
            return
        shift = 1 if self.spec.logit_shift else 0
        R = max(hi - lo for lo, hi in ranges)
        idx = self.head_idx_host.numpy()[:len(steps) * R].reshape(len(steps), R)
        for b, (lo, hi) in enumerate(ranges):
            idx[b] = np.minimum(np.arange(lo, lo + R), hi - 1) - shift
        self.head_idx_t[:idx.size].copy_(self.head_idx_host[:idx.size], non_blocking=True)
        self._head_ranges = ranges

    def _residual_starts(self, steps) -> list[int]:
        """Per layer, the first row its residual update must cover, over every slot: each layer's own
        recomputed rows, and every row a later layer (its rows, the change scores' gen rows) or the head
        still reads this step."""
        plans = [self._plan(st).starts for st in steps if st is not None]
        if len(plans) == 1:
            return list(plans[0])
        starts = [min(x) for x in zip(*plans)]
        return starts if starts else [0] * len(self._layers)

    def _residual_starts_one(self, policy: CachePolicy, lo: int) -> list[int]:
        shift = 1 if self.spec.logit_shift else 0
        later = lo - shift
        starts = [0] * len(self._layers)
        for l in range(len(self._layers) - 1, -1, -1):
            floor = policy.row_floor(l)
            starts[l] = later if floor is None else min(floor, later)
            reads = 0 if floor is None else floor
            if self.proxy is not None and l > 0:
                reads = min(reads, policy.P)                   # the change scores read the gen rows
            later = min(later, reads)
        return starts

    def _layer(self, l: int, steps, scored: list[bool], next_scored: bool, start: int, topk: tuple | None
               ) -> list[int]:
        """One layer's work for every slot; returns the rows each slot's sequence recomputed."""
        if self.ops is None:
            return self._layer_plain(l, steps, scored)
        return self._layer_fused(l, steps, scored, next_scored, start, topk)

    def _slot_rows(self, l: int, steps, scores, scored: list[bool], topk: tuple | None = None
                   ) -> tuple[torch.Tensor | None, list[int]]:
        """Each slot's policy picks its rows, or, where every sequence's rows are a window plus the k rows
        that changed most (``topk`` = (w, k)), one launch picks them all. Returns (rows [B, k], or None when
        every sequence recomputes every row; the rows each sequence recomputed of its own canvas, padding
        left out)."""
        if topk is not None:
            w, k, per_slot = topk
            live = [(b, st) for b, st in enumerate(steps) if st is not None]
            if any(self._means_bound[b] for b, _ in live):   # every bound sequence's observe in one launch
                torch.mean(scores, dim=1, out=self.layer_means[l])
            for b, st in live:
                if not self._means_bound[b]:
                    st.cache.observe(l, scores[b:b + 1])
            rows = self.ops.select_rows_batched(scores, self.win_start_t, w, k, self.gen_start_t,
                                                self.k_slot_t[l] if per_slot else None)
            return rows, self._topk_counts(steps, l, topk)
        picked, counts = [], []
        for b, st in enumerate(steps):
            if st is None:
                picked.append(None)
                counts.append(0)
                continue
            n_b = self.lengths[b]                                          # this sequence's own canvas
            r = st.cache.rows(l, scores[b:b + 1] if scores is not None and scored[b] else None)
            if r is not None and r.numel() == n_b:
                r = None
            picked.append(r)
            counts.append(n_b if r is None else r.numel())
        live = [r for r, st in zip(picked, steps) if st is not None]
        if all(r is None for r in live):                   # every sequence recomputes every row
            return None, counts
        if len(steps) == 1:
            return picked[0].unsqueeze(0), counts
        k = max(self.lengths[b] if r is None else r.numel() for b, (r, st) in enumerate(zip(picked, steps))
                if st is not None)
        rows = []
        for b, (st, r) in enumerate(zip(steps, picked)):
            if r is None:
                r = self.rows_all[:k] if st is None else self.rows_all[:self.lengths[b]]
            if r.numel() < k:              # as many rows as the others: repeat the last one (same values)
                r = torch.cat([r, r[-1:].expand(k - r.numel())])
            rows.append(r)
        return torch.stack(rows), counts

    def _layer_fused(self, l: int, steps, scored: list[bool], next_scored: bool, start: int, topk: tuple | None
                     ) -> list[int]:
        h, ops = self.h, self.ops
        scores = None
        if self.proxy == Proxy.INPUT:
            # input-proxy scores of this layer (and prev_in[l] <- its gen input rows) came out of the
            # previous layer's residual update, which wrote those rows: no pass of their own
            if l > 0 and any(scored):
                scores = self.next_scores
        elif any(scored):
            scores = self._value_scores(l, h)
        rows, counts = self._slot_rows(l, steps, scores, scored, topk)
        engine = self._layers[l]
        attn, mlp = self.attn_cache[l], self.mlp_cache[l]
        nxt = {}
        if self.proxy == Proxy.INPUT and l + 1 < len(self._layers):
            nxt = dict(prev=self.prev_in[l + 1], gen_start=self.gen_start_t,
                       d=self.next_scores if next_scored else None)
        if rows is None:
            self._run_full(l, engine, h)
            ops.residual_update(h, attn, mlp, start, **nxt)
            return counts
        h_rows, pos = ops.gather_rows(h, rows, self.slot)                     # [B, k, D], [B, k]
        out = self._row_outputs(rows.shape[1], engine.writes_cache)
        res = engine.run(self._layer_feeds(l, h_rows, pos), out)
        if not engine.writes_cache:
            scatter_rows(self.k_cache[l], rows, res["k_rows"])
            scatter_rows(self.v_cache[l], rows, res["v_rows"])
        ops.residual_update(h, attn, mlp, start, rows, res["attn_rows"], res["mlp_rows"], self.slot, **nxt)
        return counts

    def _layer_feeds(self, l: int, h_rows: torch.Tensor, pos: torch.Tensor) -> dict:
        """Inputs of layer l: rows, their positions, each sequence's length (engine directories written before
        batching have no ``kv_len`` input and decode one sequence at a time), the caches."""
        feeds = {"h_rows": h_rows, "pos": pos, "k_cache": self.k_cache[l], "v_cache": self.v_cache[l]}
        if self._takes_kv_len[l]:
            feeds["kv_len"] = self.kv_len
        return feeds

    def _gen_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Each slot's generation rows of a canvas tensor x [B, N, ...] -> [B, G, ...] (a view when every slot's
        generation starts at the same row, else a copy)."""
        if self.gen_start is not None:
            return x[:, self.gen_start:self.gen_start + self.G]
        idx = self.gen_idx.reshape(self.gen_idx.shape + (1,) * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
        return torch.gather(x, 1, idx)

    def _set_gen_rows(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        """Write [B, G, ...] back into each slot's generation rows of x (after ``_gen_rows`` made a copy)."""
        if self.gen_start is None:
            scatter_rows(x, self.gen_idx, rows)

    def _row_outputs(self, k: int, deltas_only: bool) -> dict | None:
        if self.B != 1:   # leading slices of the preallocated buffers are contiguous only for B == 1
            return None
        out = {"attn_rows": self.row_attn[:, :k], "mlp_rows": self.row_mlp[:, :k]}
        if not deltas_only:
            out.update(k_rows=self.row_k[:, :k], v_rows=self.row_v[:, :k])
        return out

    def _layer_plain(self, l: int, steps, scored: list[bool]) -> list[int]:
        h = self.h
        scores = self._scores_plain(l, h) if any(scored) else None             # [B, G]
        if self.proxy == Proxy.INPUT and l > 0:
            self.prev_in[l].copy_(self._gen_rows(h))
        rows, counts = self._slot_rows(l, steps, scores, scored)
        engine = self._layers[l]
        if rows is None:
            self._run_full(l, engine, h)
        else:
            self._run_rows_plain(l, engine, h, rows)
        h.add_(self.attn_cache[l]).add_(self.mlp_cache[l])                     # (h + attn) + mlp, every row
        return counts

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
        h_rows, pos = gather_rows_torch(h, rows)                               # [B, k, D], [B, k]
        res = engine.run(self._layer_feeds(l, h_rows, pos), self._row_outputs(rows.shape[1], False))
        for cache, name in ((self.k_cache[l], "k_rows"), (self.v_cache[l], "v_rows"),
                            (self.attn_cache[l], "attn_rows"), (self.mlp_cache[l], "mlp_rows")):
            scatter_rows(cache, rows, res[name])

    def _value_scores(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """Value proxy: V = W_V attn_norm(h) of every gen row vs the gen V cache, which then takes the fresh
        V (so attention sees fresh values for every gen row). [B, G]"""
        h_gen = self._gen_rows(h)
        if self.B > 1:
            h_gen = h_gen.contiguous()
        v = self.engines.vproj(l).run({"h_rows": h_gen}, {"v_rows": self.vbuf})["v_rows"]   # [B, G, Hkv, hd]
        cached = self._gen_rows(self.v_cache[l])
        d = self.ops.cosine_distance_copy(v, cached)                          # cached <- v
        self._set_gen_rows(self.v_cache[l], cached)
        return d

    def _scores_plain(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """Per-gen-row change scores d [B, G] (1 - cosine similarity) of layer l at this step."""
        h_gen = self._gen_rows(h)                                              # [B, G, D]
        if self.proxy == Proxy.INPUT:
            # Cosine of the raw layer inputs. RMSNorm divides each row by its RMS, which cosine ignores,
            # so this equals the cosine of the normalised inputs without the learned gain: the change
            # of the residual stream itself, with no extra matmul.
            return 1 - F.cosine_similarity(h_gen.float(), self.prev_in[l].float(), dim=-1, eps=1e-12)
        if self.B > 1:
            h_gen = h_gen.contiguous()
        v = self.engines.vproj(l).run({"h_rows": h_gen}, {"v_rows": self.vbuf})["v_rows"]   # [B, G, Hkv, hd]
        cached = self._gen_rows(self.v_cache[l])
        d = 1 - F.cosine_similarity(v.flatten(2).float(), cached.flatten(2).float(), dim=-1, eps=1e-12)
        cached.copy_(v)
        self._set_gen_rows(self.v_cache[l], cached)
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


def _upload(dev: torch.Tensor, host: torch.Tensor, values: tuple, last: tuple | None) -> tuple:
    """Write a small per-step table (nested tuples of ints) to its device buffer through its pinned host
    buffer, before the step and outside any graph: one asynchronous copy, only when it differs from ``last``
    (the previous copy is done by then: every step ends with the readback's sync). Returns the values."""
    if values != last:
        host.numpy()[:] = values
        dev.copy_(host, non_blocking=True)
    return values


def row_bucket(k: int) -> int:
    """The smallest of 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^j and 3 * 2^(j-1)) that is at least k: at most
    a third of a bucket is padding, and a few buckets cover every budget."""
    if k <= 2:
        return max(k, 0)
    up = 1 << (k - 1).bit_length()                          # the power of two at or above k
    return up * 3 // 4 if up * 3 // 4 >= k else up


def _bucketed(shared: tuple, answers: list[tuple], slack: float = EngineSet.step_bucket_slack) -> tuple:
    """``row_buckets``: the per-sequence choice (w, k, True) at every layer where the sequences pick a window
    plus their own top-k, k their largest budget there rounded up to a bucket, so shapes follow buckets
    rather than budgets. When one bucket for every such layer (the step's largest) costs at most ``slack``
    times the rows of each layer's own (``EngineSet.step_bucket_slack``), every layer takes it: the whole
    step's shapes then repeat from step to step and it replays as one graph. Budgets that are one value
    everywhere (uniform) are left alone."""
    layers = [l for l, t in enumerate(shared) if t is not None and t[0] > 0]
    if len({a[l][1] for a in answers for l in layers}) <= 1:
        return shared
    own = {l: row_bucket(max(a[l][1] for a in answers)) for l in layers}
    top = max(own.values())
    if sum(shared[l][0] + top for l in layers) <= slack * sum(shared[l][0] + own[l] for l in layers):
        own = dict.fromkeys(layers, top)
    return tuple((t[0], own[l], True) if l in own else t for l, t in enumerate(shared))


def _shared_topk(answers: list) -> tuple[int, int, bool] | None:
    """The batch's row choice at one layer from each live sequence's ``topk_rows`` answer: (w, k, False) when
    they all say (w, k); (w, largest k, True) when they share only w (each sequence its own k, which needs a
    window: a sequence pads its rows with its last one); None otherwise."""
    if any(a is None for a in answers) or len({a[0] for a in answers}) != 1:
        return None
    w, ks = answers[0][0], {a[1] for a in answers}
    if len(ks) == 1:
        return w, answers[0][1], False
    return (w, max(ks), True) if w > 0 else None
