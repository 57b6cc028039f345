"""Cache policies: which canvas rows each layer recomputes this step.

Pure logic (no engines). Per step the loop calls ``begin_step(view)``; then for every layer the
executor asks ``rows(layer, scores)``, having first computed the change scores ``d [B, G]`` of
that layer's gen rows when ``wants_scores(layer)`` and the policy has a ``proxy``. ``rows``
returns None (every row) or a sorted int64 tensor of absolute positions on the device.
Rows not recomputed still get ``h + attn_cache + mlp_cache`` (cached residual deltas).
Every policy fully recomputes step 1, so the executor's caches never need zeroing.

``row_floor(layer)`` tells the executor, before the step runs, the lowest row a layer recomputes
(None: every row), so it can skip the residual update of rows nothing reads again this step.
``layer_key`` names what fixes a layer's work apart from device buffers, so steps can be captured
as CUDA graphs and replayed; ``plan_key`` names the host values that fix ``wants_scores``,
``layer_key`` and ``row_floor`` of every layer at once, so the executor asks those once per distinct
plan instead of once per layer and step. Row selection goes through ``self.ops`` (dllm.kernels) when the
executor has fused kernels; ties in the change scores go to the lower row on every path.

A layer whose rows are exactly "a forced window of gen rows plus the k other gen rows that changed most"
says so through ``topk_rows(layer)``. In a batch whose sequences all say the same window length (k may
differ: DCU's proportional budgets), the fused executor then picks every sequence's rows in one launch
(``select_rows_batched``) and calls ``observe`` instead of ``rows``; a policy that keeps its per-layer mean
scores in the column of the executor's table it gets from ``bind_layer_means`` has them written for the
whole batch in one launch instead. Device buffers that ``rows`` reads (DCU's window) are written by
``prepare_step``, which the executor calls before every step, outside any graph.

| policy       | rows of layer l at step t                                                  | source |
|--------------|----------------------------------------------------------------------------|--------|
| `full`       | all                                                                        | C.1 |
| `prefix`     | block's first step: all; later: [block_start, N)                           | C.2 |
| `dual`       | block's first step: all; later: [block_start, block_end)                   | C.2 |
| `dllm_cache` | l=0 or both refreshes: all; else prompt if refresh_prompt, gen if refresh_gen, | C.3 |
|              | otherwise the int(G*rho) gen rows whose V moved most                        |     |
| `dcu`        | l=0 or refresh: all; else sort(window ∪ topk(d outside window, k_l))         | A, Part 1 |
"""

from __future__ import annotations

import abc

import torch

from dllm.spec import ModelSpec
from dllm.runtime.config import Allocation, CachePolicyKind, DecodeConfig, Proxy
from dllm.runtime.view import StepView


def batch_mean(scores: torch.Tensor) -> torch.Tensor:
    """Change scores [B, G] averaged over the batch -> [G] (a view, no kernel, for one sequence)."""
    return scores[0] if scores.shape[0] == 1 else scores.mean(0)


def region_refresh(step: int, interval: int) -> bool:
    """dLLM-Cache / DCU refresh condition on the global 1-based step counter: (t-1) mod K == 0."""
    return (step - 1) % interval == 0


class CachePolicy(abc.ABC):
    proxy: Proxy | None = None           # change score the executor computes when wants_scores()
    ops = None                           # dllm.kernels.KernelOps, set by the executor (None: plain torch)
    window_at = 0                        # this step's first forced gen row (a host value; see topk_rows)

    def reset(self, n_layers: int, prompt_len: int, gen_len: int, device: torch.device) -> None:
        """Start a new generation."""
        dims = (n_layers, prompt_len, gen_len, torch.device(device))
        self.L, self.P, self.G, self.N, self.device = n_layers, prompt_len, gen_len, prompt_len + gen_len, device
        # device tensors survive a reset to the same dims, so captured graphs stay valid across calls
        self.same_dims = dims == getattr(self, "_dims", None)
        if not self.same_dims:
            self._dims = dims
            self._ranges: dict[tuple[int, int], torch.Tensor] = {}

    def begin_step(self, view: StepView) -> None:
        self.view = view

    def prepare_step(self) -> None:
        """Write the device buffers that this step's ``rows`` reads (host values set by ``begin_step``). The
        executor calls it after ``begin_step`` and before the step, outside any CUDA graph."""

    def topk_rows(self, layer: int) -> tuple[int, int] | None:
        """(w, k) when ``rows(layer, scores)`` is exactly: the w gen rows from ``window_at`` on, plus the k
        other gen rows with the largest scores (``select_rows``; k at most G - w), with no other effect
        than ``observe(layer, scores)``. The executor may then pick the rows of a whole batch at once.
        None otherwise. Fixed by ``plan_key`` like ``layer_key``."""
        return None

    def observe(self, layer: int, scores: torch.Tensor) -> None:
        """What ``rows`` does with ``scores`` [1, G] besides picking rows, when the executor picks them."""

    def next_budgets_request(self) -> tuple[tuple, torch.Tensor] | None:
        """After a step: (the arguments of ``allocate_budgets`` besides the scores, this policy's layer scores
        [L]) when its next step's budgets are ``allocate_budgets`` of those scores as they stand now, else None.
        The executor then computes a whole batch's budgets in one pass and one readback, and hands each
        policy its own through ``set_next_budgets``."""
        return None

    def set_next_budgets(self, step: int, budgets: list[int]) -> None:
        """The budgets of step ``step`` (what ``next_budgets_request`` asked for), computed by the executor."""

    def bind_layer_means(self, means: torch.Tensor) -> bool:
        """From now on, keep the per-layer mean change scores that ``observe`` records in ``means`` [L] fp32
        (this slot's column of the executor's [L, B] table, a persistent buffer). True when ``observe`` records
        nothing else: the executor then takes a whole batch's means of a layer in one launch instead of
        calling each policy's ``observe``. False (the default): ``observe`` is called as usual."""
        return False

    def wants_scores(self, layer: int) -> bool:
        return False

    def end_step(self) -> None:
        """Device work after the last layer of every step (recorded in the step's CUDA graph)."""

    def after_step(self) -> None:
        """Host-side bookkeeping after every step, outside any CUDA graph: ``rows``/``end_step`` must not
        change host state they read, since a replayed graph runs none of their Python."""

    @abc.abstractmethod
    def rows(self, layer: int, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Rows layer ``layer`` recomputes: None = all, else sorted int64 positions [k] on the device."""

    def row_floor(self, layer: int) -> int | None:
        """The lowest canvas row ``layer`` recomputes this step, or None when it recomputes every row.
        0 is always safe (it only costs residual updates of rows nobody reads)."""
        return 0

    def layer_key(self, layer: int, scored: bool) -> tuple | None:
        """What fixes this step's work in ``layer`` apart from device tensors (row counts, flags).

        Layers whose key repeats can be captured once as a CUDA graph and replayed: ``rows`` must then
        read only persistent device buffers and host values that the key covers. ``scored``: the
        executor computes change scores for this layer. None: never capture.
        """
        return None

    def plan_key(self) -> tuple | None:
        """The host values that ``wants_scores``, ``layer_key`` and ``row_floor`` read this step (besides
        the prompt length and the step number, which the executor adds), or None to have them asked for
        every layer and step. Whatever a policy's per-layer answers depend on must be in it: the executor
        reuses the answers of an equal key."""
        return None

    def _range(self, lo: int, hi: int) -> torch.Tensor:
        # memoized: a captured graph keeps reading the same tensor on every replay
        r = self._ranges.get((lo, hi))
        if r is None:
            if torch.device(self.device).type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"rows [{lo}, {hi}) were first asked for during CUDA graph capture; a "
                                   "step must run eagerly with the same key before it is captured")
            r = self._ranges[(lo, hi)] = torch.arange(lo, hi, device=self.device)
        return r

    def _select(self, d: torch.Tensor, window: torch.Tensor | None, k: int) -> torch.Tensor:
        """``window`` plus the k gen rows with the largest scores d [G] (ties: lower row), as sorted
        absolute positions."""
        if self.ops is not None:
            return self.ops.select_rows(d, window, k, self.P)
        from dllm.kernels.select import select_rows_torch

        return select_rows_torch(d, window, k, self.P)


class FullPolicy(CachePolicy):
    """Every row, every layer: the reference."""

    def rows(self, layer, scores):
        return None

    def row_floor(self, layer):
        return None

    def layer_key(self, layer, scored):
        return ("all",)

    def plan_key(self):
        return ()


class _BlockCachePolicy(CachePolicy):
    """Fast-dLLM: the block's first step is full; later steps recompute the rows of ``span(view)``."""

    def span(self, view) -> tuple[int, int]:
        raise NotImplementedError

    def begin_step(self, view):
        super().begin_step(view)
        self._span = self.span(view)
        self._rows = None if view.step_in_block == 0 else self._range(*self._span)

    def rows(self, layer, scores):
        return self._rows

    def row_floor(self, layer):
        return None if self._rows is None else self._span[0]

    def layer_key(self, layer, scored):
        return ("all",) if self._rows is None else ("rows", self._span)

    def plan_key(self):
        return (self._rows is None, self._span)


class PrefixPolicy(_BlockCachePolicy):
    """Fast-dLLM prefix cache: after the block's first (full) step, recompute [block_start, N)."""

    def span(self, view):
        return view.start, view.canvas_len


class DualPolicy(_BlockCachePolicy):
    """Fast-dLLM dual cache: after the block's first (full) step, recompute only the block."""

    def span(self, view):
        return view.start, view.end


class DllmCachePolicy(CachePolicy):
    """dLLM-Cache (C.3): prompt/gen refresh every K_p/K_r steps, otherwise a value-similarity
    partial update of int(G*rho) gen rows (the V cache is refreshed by the executor). Layer 0 is full."""

    proxy = Proxy.VALUE

    def __init__(self, cfg: DecodeConfig):
        self.cfg = cfg

    def begin_step(self, view):
        super().begin_step(view)
        self.refresh_prompt = region_refresh(view.step, self.cfg.prompt_interval)
        self.refresh_gen = region_refresh(view.step, self.cfg.gen_interval)
        self.k = max(0, min(self.G, int(self.G * self.cfg.rho)))
        self._prompt = self._range(0, self.P) if self.refresh_prompt else None
        self._gen = self._range(self.P, self.N) if self.refresh_gen else None

    def wants_scores(self, layer):
        return layer > 0 and not self.refresh_gen

    def topk_rows(self, layer):
        return None if layer == 0 or self.refresh_prompt or self.refresh_gen else (0, self.k)

    def layer_key(self, layer, scored):
        return (layer == 0, self.refresh_prompt, self.refresh_gen, self.k, scored)

    def plan_key(self):
        return (self.refresh_prompt, self.refresh_gen, self.k)

    def row_floor(self, layer):
        if layer == 0 or (self.refresh_prompt and self.refresh_gen):
            return None
        return 0 if self.refresh_prompt else self.P

    def rows(self, layer, scores):
        if layer == 0 or (self.refresh_prompt and self.refresh_gen):
            return None
        if self.refresh_gen:
            gen = self._gen
        else:
            gen = self._select(batch_mean(scores), None, self.k)              # the k most-changed V rows
        return gen if self._prompt is None else torch.cat([self._prompt, gen])


class DcuPolicy(CachePolicy):
    """Dynamic Cache Update (docs/algorithms.md).

    Layer 0 is always full; so is every layer at step 1 and every ``refresh_interval`` steps.
    Prompt rows are recomputed when (t-1) % prompt_interval == 0, all gen rows when
    (t-1) % gen_interval == 0. Otherwise layer l recomputes
    ``sort(window ∪ topk(d outside window, k_l))``: the window has 2*floor(W/2)+1 gen rows centred on
    the rightmost token committed by the previous step (shifted to stay inside the gen region),
    d is the proxy's per-row change score and k_l the layer's budget:
    - ``uniform``: k_l = budget;
    - ``proportional``: k_l = floor(B_total * s_l / sum(s)), clamped to [0, G];
    - ``softmax``: k_l = floor(B_total * softmax(temp * s)_l), clamped to [0, G];
    with s_l = mean_i d_i of the previous step (one step of lag: every layer's budget is needed
    before any layer runs), B_total = budget * (L - 1) over the budgeted layers 1..L-1
    (layer 0 is full anyway), and the budget spread uniformly while no scores exist yet.
    k_l is capped at G - |window| so no row is selected twice.
    """

    def __init__(self, cfg: DecodeConfig, proxy: Proxy, allocation: Allocation, refresh_interval: int | None,
                 prompt_interval: int, gen_interval: int):
        self.cfg, self.proxy, self.allocation = cfg, proxy, allocation
        self.refresh_interval, self.prompt_interval, self.gen_interval = refresh_interval, prompt_interval, gen_interval

    def reset(self, n_layers, prompt_len, gen_len, device):
        super().reset(n_layers, prompt_len, gen_len, device)
        self.has_scores = False
        r = self.cfg.window // 2
        self.win_size = min(2 * r + 1, gen_len)
        if not self.same_dims:
            # persistent buffers: captured layer graphs read them on every replay
            # s_l of the last scored step: a scored step writes every layer from 1 on (layer 0's is never
            # read) while it runs, after begin_step has read the previous step's
            self.scores = torch.zeros(n_layers, dtype=torch.float32, device=device)
            self._win_base = torch.arange(self.win_size, device=device)
            self.window = torch.empty_like(self._win_base)
        self.scores.zero_()
        self._next_budgets: tuple[int, list[int]] | None = None   # (step, budgets) from the executor
        self._win_start = None                # the window buffer's start, once prepare_step has written it

    # -- per step -----------------------------------------------------------
    def begin_step(self, view):
        super().begin_step(view)
        t = view.step
        self.full_step = t == 1 or (self.refresh_interval is not None and region_refresh(t, self.refresh_interval))
        self.refresh_prompt = region_refresh(t, self.prompt_interval)
        self.refresh_gen = region_refresh(t, self.gen_interval)
        if self.refresh_prompt and self.refresh_gen:
            self.full_step = True
        self.budgets = self.allocate()
        self.window_at = self.window_start(view.key_pos)
        self._prompt = self._range(0, self.P) if self.refresh_prompt else None
        self._gen = self._range(self.P, self.N) if self.refresh_gen else None
        # Whether any layer gets scored is known now (the executor scores exactly the layers > 0 that want
        # scores, from step 2 on, and then all of them), so rows() has no host-side effects to replay.
        # Layer scores feed only the next step's budgets: uniform allocation never reads them.
        self._scored_this_step = (self.allocation != Allocation.UNIFORM and t > 1
                                  and any(self.wants_scores(l) for l in range(1, self.L)))

    def prepare_step(self) -> None:
        if self.window_at != self._win_start:   # in place: graphs read it; one launch only when it moves
            torch.add(self._win_base, self.window_at, out=self.window)
            self._win_start = self.window_at

    def after_step(self) -> None:
        if self._scored_this_step:
            self.has_scores = True

    def window_start(self, key_pos: int) -> int:
        """First gen row of the window [win_size] centred on key_pos - P, shifted to stay inside [0, G)."""
        start = key_pos - self.P - self.cfg.window // 2
        return max(0, min(start, self.G - self.win_size))

    def window_rows(self, key_pos: int) -> torch.Tensor:
        """The gen-relative window rows for ``key_pos`` (what ``begin_step`` puts in ``self.window``)."""
        return self._win_base + self.window_start(key_pos)

    def allocate(self) -> list[int]:
        """k_l per layer (index 0 unused: layer 0 is full). One host sync per step at most, none when the
        executor computed them for the whole batch (``set_next_budgets``)."""
        if not self._budgets_from_scores():
            return [min(self.cfg.budget, max(0, self.G - self.win_size))] * self.L
        if self._next_budgets is not None and self._next_budgets[0] == self.view.step:
            return self._next_budgets[1]
        return allocate_budgets(self.scores[None], *self._budget_args())[0]

    def _budgets_from_scores(self) -> bool:
        """Whether this step's budgets come from the layer scores (proportional or softmax allocation, once a
        step has scored them; with one layer there is nothing to share)."""
        return self.allocation != Allocation.UNIFORM and self.has_scores and self.L >= 2

    def _budget_args(self) -> tuple:
        return self.cfg.budget, self.G, max(0, self.G - self.win_size), self.allocation, self.cfg.softmax_temp

    def next_budgets_request(self):
        return (self._budget_args(), self.scores) if self._budgets_from_scores() else None

    def set_next_budgets(self, step, budgets):
        self._next_budgets = (step, budgets)

    # -- per layer ----------------------------------------------------------
    def wants_scores(self, layer):
        if layer == 0:
            return False
        # input scores are cheap, so take them at full steps too (they feed the next allocation);
        # value scores would cost an extra projection, so only when selecting
        return not self.full_step or (self.proxy == Proxy.INPUT and self.allocation != Allocation.UNIFORM)

    def layer_key(self, layer, scored):
        full = layer == 0 or self.full_step
        return (full, self.refresh_prompt, self.refresh_gen, None if full else self.budgets[layer], scored)

    def row_floor(self, layer):
        if layer == 0 or self.full_step:
            return None
        return 0 if self.refresh_prompt else self.P

    def plan_key(self):
        return (self.full_step, self.refresh_prompt, self.refresh_gen, tuple(self.budgets))

    def topk_rows(self, layer):
        if layer == 0 or self.full_step or self.refresh_prompt or self.refresh_gen:
            return None
        return self.win_size, self.budgets[layer]

    def observe(self, layer, scores):
        if self._scored_this_step:
            torch.mean(scores, dim=(0, 1), out=self.scores[layer])           # one kernel, in place

    def bind_layer_means(self, means):
        if self.allocation == Allocation.UNIFORM:        # the budgets never read the scores
            return False
        if means.shape != self.scores.shape or means.dtype != self.scores.dtype:
            raise ValueError(f"layer means must be [{self.L}] float32, got {list(means.shape)} {means.dtype}")
        if means is not self.scores:                     # keep what the last scored step left
            means.copy_(self.scores)
            self.scores = means
        return True

    def rows(self, layer, scores):
        if scores is not None:
            self.observe(layer, scores)
        if layer == 0 or self.full_step:
            return None
        if self.refresh_gen:
            gen = self._gen
        else:
            # the window is forced; the budget goes to the most-changed rows outside it
            gen = self._select(batch_mean(scores), self.window, self.budgets[layer])
        return gen if self._prompt is None else torch.cat([self._prompt, gen])


def allocate_budgets(scores: torch.Tensor, budget: int, G: int, cap: int, allocation: Allocation,
                     softmax_temp: float) -> list[list[int]]:
    """DCU's k_l of every layer for each of B sequences from their layer scores [B, L] (``DcuPolicy``'s
    proportional or softmax rule; index 0 unused: layer 0 is full). One pass and one readback for the whole
    batch; a sequence gets the same budgets alone or in a batch (every operation works row by row)."""
    L = scores.shape[1]
    s = scores[:, 1:].double()                                                  # [B, L-1]
    total = budget * (L - 1)
    if allocation == Allocation.PROPORTIONAL:
        denom = s.sum(1, keepdim=True)
        w = torch.where(denom > 0, s / denom.clamp(min=1e-30), torch.full_like(s, 1.0 / (L - 1)))
    else:
        w = torch.softmax(softmax_temp * s, dim=1)
    k = torch.floor(total * w).clamp(0, G).long().tolist()
    return [[min(budget, cap)] + [min(x, cap) for x in row] for row in k]


def make_cache_policy(cfg: DecodeConfig, spec: ModelSpec | None = None) -> CachePolicy:
    """The cache policy ``cfg.cache``; ``dcu-reference`` fixes the released code's settings."""
    kind = cfg.cache
    if kind == CachePolicyKind.FULL:
        return FullPolicy()
    if kind == CachePolicyKind.PREFIX:
        return PrefixPolicy()
    if kind == CachePolicyKind.DUAL:
        return DualPolicy()
    if kind == CachePolicyKind.DLLM_CACHE:
        return DllmCachePolicy(cfg)
    if kind == CachePolicyKind.DCU:
        return DcuPolicy(cfg, cfg.proxy, cfg.allocation, cfg.refresh_interval, cfg.prompt_interval,
                         cfg.gen_interval)
    return DcuPolicy(cfg, Proxy.VALUE, Allocation.UNIFORM, None, 5000, 5000)
