"""Commit policies: which masked tokens of the current block become real this step.

Pure logic on torch tensors (no engines): each policy says which canvas positions it needs
logits for (``logit_range``), then turns those logits into a transfer mask (``select``).

| policy      | rule                                                                         | source |
|-------------|------------------------------------------------------------------------------|--------|
| `schedule`  | fixed count per step: LLaDA even split (remainder first) / Dream timesteps    | C.1, D.3 |
| `threshold` | top-1 + every block mask with conf >= theta, until the block is empty         | C.2 |
| `factor`    | the n-th most confident needs conf >= 1 - f/(n+1) (with Fast-dLLM's quirk)    | C.2 |
| `apd`       | conf >= tau (global scalar or per token), tau moved by -alpha*c + beta*H       | B |

With ``fastdllm_dream`` (Fast-dLLM's Dream port, C.2) the Dream `schedule` and `threshold` commit only
the block's first position at the block's full step. Then `schedule` goes on with the timestep schedule
at index 1, ranked by negative entropy; `threshold` takes the block's masks in order of confidence, the
first always and the others above the threshold, drawing tokens for every mask of the rows it feeds.

Random draws come from one ``torch.Generator`` (``cfg.seed``) in the reference decoders' order
and shapes (runtime/reference.py; the draws themselves live in runtime/sampling.py), so a seeded
run replays the reference token for token even at temperature > 0. All positions are absolute
canvas positions; ``lo``/``hi`` bound the rows whose logits the policy receives.

``step_key(view)`` names the host values a step's ``select`` depends on when ``select`` is free of
host syncs, random draws and data-dependent shapes ("capturable"): the executor then records it in
the step's CUDA graph. None: ``select`` runs eagerly after the graph. ``select`` never changes host
state it reads (a replayed graph runs none of its Python); ``after_step`` does that bookkeeping.
With fused kernels (``self.ops``, dllm.kernels) the argmax, the float64 confidence and APD's
statistics come from one pass over the logits (``vocab_stats``) instead of a float64 softmax.

In a batch, the sequences whose policies give equal ``batch_key`` values decide a step together: one
``select_batch`` over every sequence's rows (``BatchRows``), with device state such as APD's tau in tables
the executor owns, one row per slot (``make_batch_tables``, ``bind_batch``). Greedy ``apd``, ``threshold``
and LLaDA's ``schedule`` (sequences of one canvas length) do; each sequence still gets exactly what its
own ``select`` gives it.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import torch
import torch.nn.functional as F

from dllm.errors import ConfigError
from dllm.spec import Arch
from dllm.runtime.config import Alg, ApdMode, CachePolicyKind, CommitPolicyKind, DecodeConfig, Remasking
from dllm.runtime.sampling import dream_draw, dream_probs, gumbel_argmax, restrict
from dllm.runtime.view import StepView

NEG_INF = -math.inf


class CommitPolicy(abc.ABC):
    """Turns logits into committed tokens. Subclasses implement ``logit_range`` and ``select``."""

    until_empty = True     # run until the block has no masks (at most block_length steps)
    ops = None             # dllm.kernels.KernelOps, set by the executor (None: plain torch)

    def __init__(self, cfg: DecodeConfig, mask_id: int, arch: Arch = Arch.LLADA):
        self.cfg, self.mask_id, self.arch = cfg, int(mask_id), Arch(arch)

    def reset(self, batch: int, prompt_len: int, gen_len: int, vocab: int, device: torch.device,
              generator: torch.Generator) -> None:
        """Start a new generation."""
        self.batch, self.prompt_len, self.gen_len, self.vocab = batch, prompt_len, gen_len, vocab
        self.device, self.gen = device, generator

    def begin_block(self, view: StepView) -> None:
        """Called before the first step of every block."""

    def block_steps(self, view: StepView) -> int:
        """Most steps this block may take (the loop also stops early when ``until_empty`` and empty)."""
        return self.cfg.block_length

    def logit_range(self, view: StepView) -> tuple[int, int]:
        """Canvas positions [lo, hi) whose logits ``select`` needs (default: the current block)."""
        return view.start, view.end

    @abc.abstractmethod
    def select(self, logits: torch.Tensor, ids: torch.Tensor, view: StepView) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, R, V] and current ids [B, R] of positions [lo, hi) -> (transfer [B, R] bool, x0 [B, R])."""

    def step_key(self, view: StepView) -> tuple | None:
        """The host values this step's ``select`` depends on, or None when it cannot be captured in a
        CUDA graph (random draws, host syncs or data-dependent shapes). Default: not capturable."""
        return None

    def after_step(self, view: StepView) -> None:
        """Host-side bookkeeping after a step's ``select``. ``select`` itself must not change host state
        that it reads: a captured graph replays the work ``select`` recorded."""

    # -- deciding a batch's step together (see BatchRows) ----------------------
    def batch_key(self, view: StepView) -> tuple | None:
        """Sequences whose policies give equal keys (not None) this step decide it together: one
        ``select_batch`` over every sequence's rows, with the policies' device state in tables the executor
        owns (``make_batch_tables``, ``bind_batch``). None (the default): this policy decides alone."""
        return None

    def make_batch_tables(self, batch: int, gen_len: int, vocab: int, dtype: torch.dtype, device: torch.device):
        """The device state of ``batch`` sequences, one row each (policies with equal ``batch_key``); None when
        the policy keeps none."""
        return None

    def bind_batch(self, tables, b: int) -> None:
        """Keep this policy's device state in row b of ``tables`` from now on (moving what it holds there)."""

    def select_batch(self, view: StepView, logits: torch.Tensor, ids: torch.Tensor, rows: "BatchRows",
                     tables) -> tuple[torch.Tensor, torch.Tensor]:
        """``select`` for every sequence of a batch at once, called on one of their policies with its view (the
        equal ``batch_key`` vouches that what the others' would add is the same): logits [B, R, V] and ids
        [B, R] of each sequence's rows (``rows``) -> (transfer [B, R] bool, x0 [B, R]). Row b of the result
        equals what slot b's own policy selects from its rows alone."""
        raise NotImplementedError

    def _greedy(self) -> bool:
        """Argmax tokens ranked by their probability: no random draw anywhere in ``select``."""
        return self.cfg.temperature == 0 and self.cfg.remasking == Remasking.LOW_CONFIDENCE

    # -- shared pieces ------------------------------------------------------
    def without_mask_tokens(self, transfer: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(transfer, x0) without the positions whose token is the mask itself. The reference decoders
        write such a token and the position stays masked; leaving it out of ``transfer`` writes the same
        canvas and keeps the loop's count of the block's masks exact (random models do predict it)."""
        return transfer & (x0 != self.mask_id), x0

    def batch_confidence(self, logits: torch.Tensor, ids: torch.Tensor, rows: "BatchRows"
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's greedy (x0, conf, cand) [B, R]: each sequence's candidates are the masks of its block
        (rows past its range never are), conf -inf everywhere else."""
        cand = (ids == self.mask_id) & rows.in_block
        stats = self.ops.vocab_stats(logits)
        return stats.x0, stats.conf.masked_fill(~cand, NEG_INF), cand

    def candidates(self, ids: torch.Tensor, lo: int, view: StepView) -> torch.Tensor:
        """Masks of the current block among rows [lo, lo+R): [B, R] bool."""
        cand = ids == self.mask_id
        R = ids.shape[1]
        if lo < view.start or lo + R > view.end:
            inside = torch.zeros(R, dtype=torch.bool, device=ids.device)
            inside[max(0, view.start - lo):max(0, min(R, view.end - lo))] = True
            cand = cand & inside
        return cand

    def sample(self, logits: torch.Tensor, cand: torch.Tensor, lo: int, view: StepView, *,
               canvas_noise: bool = False, noise_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """x0 [B, R] of logits [B, R, V] (rows [lo, lo+R)): the argmax at temperature 0; above it
        LLaDA's Gumbel-max over the top-p/top-k restricted logits (noise over the whole canvas when
        ``canvas_noise``), or for Dream one draw from softmax(logits/T) per candidate [B, R] bool."""
        cfg = self.cfg
        if cfg.temperature == 0:
            return logits.argmax(-1)
        if self.arch == Arch.DREAM:
            x0 = logits.argmax(-1)
            _, x0[cand] = dream_draw(dream_probs(logits[cand], cfg.temperature, cfg.top_p, cfg.top_k),
                                     cfg.temperature, self.gen)
            return x0
        canvas = (view.canvas_len, lo) if canvas_noise else None
        return gumbel_argmax(restrict(logits, cfg.top_p, cfg.top_k), cfg.temperature, self.gen, canvas=canvas,
                             noise_dtype=noise_dtype)

    def confidence(self, logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """[B, R] float64 probability of x0 (``low_confidence``) or U(0,1) (``random``)."""
        if self.cfg.remasking == Remasking.RANDOM:
            return torch.rand(x0.shape, device=x0.device, generator=self.gen).double()
        p = F.softmax(logits.double(), dim=-1)                                  # [B, R, V]
        return p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)

    def sample_with_confidence(self, logits: torch.Tensor, cand: torch.Tensor, lo: int, view: StepView
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, conf) [B, R]: ``sample`` then ``confidence``, from one fused pass when greedy."""
        if self.ops is not None and self._greedy():
            stats = self.ops.vocab_stats(logits)
            return stats.x0, stats.conf
        x0 = self.sample(logits, cand, lo, view)
        return x0, self.confidence(logits, x0)


@dataclasses.dataclass
class BatchRows:
    """Where each sequence of a batch sits in a batched commit, as device tensors [B, R] over R rows (the
    longest logit range of the batch; a shorter range repeats its last row, as the head's rows do)."""
    last: torch.Tensor          # min(r, R_b - 1): the row each row stands for (int64)
    idx: torch.Tensor           # its canvas position (int64)
    gen: torch.Tensor           # its gen-relative position (int64)
    in_block: torch.Tensor      # bool: its canvas position lies in the sequence's current block
    valid: torch.Tensor         # bool: r < R_b, a row of the sequence's own range


# -- schedule --------------------------------------------------------------------------------------
def even_split(n: int, steps: int) -> list[int]:
    """LLaDA's schedule: n tokens over ``steps``, remainder to the first steps (10 over 4 -> 3,3,2,2)."""
    base, rem = divmod(n, steps)
    return [base + (i < rem) for i in range(steps)]


def dream_count(num_mask: float, i: int, steps: int, eps: float) -> int:
    """Dream's count at step i: int(#mask * (1 - s/t)) in float32 as Dream computes it; all at the last step."""
    if i == steps - 1:
        return int(num_mask)
    ts = torch.linspace(1, eps, steps + 1)                                     # float32
    return int(torch.tensor(num_mask, dtype=torch.float32) * (1 - ts[i + 1] / ts[i]))


class LladaSchedule(CommitPolicy):
    """LLaDA's reference commit: the block's masks split evenly over steps/num_blocks steps."""

    until_empty = False

    def block_steps(self, view: StepView) -> int:
        return self.cfg.steps_per_block

    def begin_block(self, view: StepView) -> None:
        self.counts = even_split(view.block_masks, self.cfg.steps_per_block)

    def step_key(self, view):
        return ("schedule", self.counts[view.step_in_block], view.start, view.end) if self._greedy() else None

    def batch_key(self, view):
        if self.ops is None or not self._greedy():
            return None
        # ranked on canvas-wide rows, like the reference: rows of one length break ties as they do alone
        return ("schedule", self.cfg, self.counts[view.step_in_block], view.canvas_len)

    def select_batch(self, view, logits, ids, rows, tables):
        B = logits.shape[0]
        x0, conf, _ = self.batch_confidence(logits, ids, rows)
        conf = conf.gather(1, rows.last)                                        # repeated rows: equal values
        full = torch.full((B, view.canvas_len), NEG_INF, dtype=conf.dtype, device=conf.device)
        full.scatter_(1, rows.idx, conf)
        k = self.counts[view.step_in_block]
        transfer = torch.zeros(full.shape, dtype=torch.bool, device=conf.device)
        if k > 0:
            transfer.scatter_(1, torch.topk(full, k, dim=-1).indices, True)
        return self.without_mask_tokens(transfer.gather(1, rows.idx) & rows.valid, x0)

    def select(self, logits, ids, view):
        B, R, _ = logits.shape
        lo, N = view.start, view.canvas_len
        cand = self.candidates(ids, lo, view)
        if self.ops is not None and self._greedy():
            x0, conf = self.sample_with_confidence(logits, cand, lo, view)
        else:
            # the reference draws its noise over the whole canvas; draw the same and use our rows
            x0 = self.sample(logits, cand, lo, view, canvas_noise=True)          # [B, R]
            if self.cfg.remasking == Remasking.RANDOM:
                conf = torch.rand((B, N), device=logits.device, generator=self.gen)[:, lo:lo + R]
            else:
                conf = F.softmax(logits.double(), dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        # rank on a canvas-wide tensor like the reference, so ties break identically
        full = torch.full((B, N), NEG_INF, dtype=conf.dtype, device=conf.device)
        full[:, lo:lo + R] = conf.masked_fill(~cand, NEG_INF)
        k = self.counts[view.step_in_block]
        transfer = torch.zeros((B, N), dtype=torch.bool, device=conf.device)
        if k > 0:
            transfer.scatter_(1, torch.topk(full, k, dim=-1).indices, True)
        return self.without_mask_tokens(transfer[:, lo:lo + R], x0)


class DreamSchedule(CommitPolicy):
    """Dream's reference commit (D.3): at step i of S, int(#mask * (1 - s/t)) block masks (all at the
    last step), the most confident by ``alg`` or, with ``alg_temp`` > 0, drawn from softmax(conf/alg_temp).
    ``origin`` instead moves each mask with probability 1 - s/t. Tokens come from Dream's
    temperature/top-p/top-k distribution, one draw per block mask (rows in canvas order)."""

    until_empty = False

    def block_steps(self, view: StepView) -> int:
        return self.cfg.steps_per_block

    def select(self, logits, ids, view):
        cand = self.candidates(ids, view.start, view)                           # [B, R]
        if self.cfg.alg == Alg.ORIGIN:
            return self._origin(logits, ids, cand, view)
        conf, tok = self.dream_tokens(logits[cand], self.cfg.alg)               # [M], [M] in canvas order
        x0 = ids.clone()
        x0[cand] = tok
        k = dream_count(view.block_masks / logits.shape[0], view.step_in_block, self.cfg.steps_per_block,
                        self.cfg.eps)
        return self.without_mask_tokens(self.top_count(conf.to(logits.dtype), cand, k, view), x0)

    def dream_tokens(self, mask_logits: torch.Tensor, alg: Alg) -> tuple[torch.Tensor, torch.Tensor]:
        """Dream's ``sample_tokens`` on block-mask rows [M, V] -> (confidence by ``alg`` [M], token [M])."""
        cfg = self.cfg
        probs = dream_probs(mask_logits, cfg.temperature, cfg.top_p, cfg.top_k)   # [M, V], model dtype
        conf, tok = dream_draw(probs, cfg.temperature, self.gen)
        V = probs.shape[-1]
        if alg == Alg.TOPK_MARGIN:
            top2 = torch.topk(probs, min(2, V), dim=-1).values
            conf = top2[:, 0] - (top2[:, 1] if V > 1 else 0)
        elif alg == Alg.ENTROPY:
            conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        return conf, tok

    def top_count(self, conf: torch.Tensor, cand: torch.Tensor, k: int, view: StepView,
                  span: tuple[int, int] | None = None) -> torch.Tensor:
        """Transfer [B, R]: the k candidates [B, R] (rows [start, start+R)) ranked first by conf [M], or
        drawn with ``alg_temp``; ranked on a tensor over canvas positions ``span`` (default the whole
        canvas) like the reference, so ties and draws come out identical."""
        B, R = cand.shape
        s0, s1 = span or (0, view.canvas_len)
        lo = view.start - s0
        transfer = torch.zeros((B, s1 - s0), dtype=torch.bool, device=cand.device)
        if k > 0:
            full = torch.full((B, s1 - s0), NEG_INF, dtype=conf.dtype, device=cand.device)
            rows = full[:, lo:lo + R]
            rows[cand] = conf
            if self.cfg.alg_temp > 0:
                w = F.softmax(full / self.cfg.alg_temp, dim=-1)
                sel = torch.multinomial(w, k, generator=self.gen)                    # [B, k]
            else:
                sel = torch.topk(full, k, dim=-1).indices
            transfer.scatter_(1, sel, True)
        return transfer[:, lo:lo + R]

    def _origin(self, logits, ids, cand, view):
        """Each block mask moves with probability 1 - s/t (1 at the last step): U(0,1) over the masks,
        then one token draw per moving mask."""
        i, S = view.step_in_block, self.cfg.steps_per_block
        ts = torch.linspace(1, self.cfg.eps, S + 1)                             # float32, as Dream
        p_move = (1 - ts[i + 1] / ts[i]) if i < S - 1 else torch.tensor(1.0)
        mask_logits = logits[cand]                                              # [M, V]
        move = torch.rand(mask_logits.shape[0], device=logits.device, generator=self.gen) < p_move.to(logits.device)
        tok = torch.full((mask_logits.shape[0],), self.mask_id, dtype=torch.long, device=logits.device)
        _, tok[move] = self.dream_tokens(mask_logits[move], Alg.MASKGIT_PLUS)
        x0 = ids.clone()
        x0[cand] = tok
        transfer = torch.zeros_like(cand)
        transfer[cand] = move
        return self.without_mask_tokens(transfer, x0)


# -- Fast-dLLM ---------------------------------------------------------------------------------------
class ThresholdCommit(CommitPolicy):
    """Fast-dLLM: commit the most confident block mask plus every one with conf >= threshold."""

    def step_key(self, view):
        return ("threshold", view.start, view.end) if self._greedy() else None

    def batch_key(self, view):
        return ("threshold", self.cfg) if self.ops is not None and self._greedy() else None

    def select_batch(self, view, logits, ids, rows, tables):
        x0, conf, cand = self.batch_confidence(logits, ids, rows)
        return self.without_mask_tokens(_with_top1(cand & (conf >= self.cfg.threshold), conf, cand), x0)

    def select(self, logits, ids, view):
        cand = self.candidates(ids, view.start, view)
        x0, conf = self.sample_with_confidence(logits, cand, view.start, view)
        conf = conf.masked_fill(~cand, NEG_INF)                                 # [B, R]
        return self.without_mask_tokens(_with_top1(cand & (conf >= self.cfg.threshold), conf, cand), x0)


class FactorCommit(CommitPolicy):
    """Fast-dLLM's factor rule: sorted confs c_(n) must reach 1 - f/(n+1) (n >= 2; n = 1 always).

    Quirk kept from the original: if the first failure is the last candidate, or none fails,
    every candidate is committed (the scan's index is bumped by one).
    """

    def step_key(self, view):
        return ("factor", view.start, view.end) if self._greedy() else None

    def batch_key(self, view):
        return ("factor", self.cfg) if self.ops is not None and self._greedy() else None

    def select_batch(self, view, logits, ids, rows, tables):
        # rows past a sequence's range are never candidates, so each row of the batch sorts and counts
        # exactly its own sequence's candidates
        x0, conf, cand = self.batch_confidence(logits, ids, rows)
        return self.without_mask_tokens(factor_transfer(conf, cand, self.cfg.factor), x0)

    def select(self, logits, ids, view):
        cand = self.candidates(ids, view.start, view)
        x0, conf = self.sample_with_confidence(logits, cand, view.start, view)
        conf = conf.masked_fill(~cand, NEG_INF)                                 # [B, R]
        return self.without_mask_tokens(factor_transfer(conf, cand, self.cfg.factor), x0)


def factor_transfer(conf: torch.Tensor, cand: torch.Tensor, factor: float) -> torch.Tensor:
    """Transfer mask [B, R] of the factor rule, without host syncs."""
    B, R = conf.shape
    # stable: equal confidences keep row order, so a row's rank does not depend on how many rows follow it
    # (a sequence alone and in a batch, whose rows run to the longest sequence's range, rank alike)
    s, order = torch.sort(conf, dim=-1, descending=True, stable=True)           # [B, R]
    n = cand.sum(-1, keepdim=True)                                              # [B, 1]
    idx = torch.arange(R, device=conf.device)
    thr = 1 - factor / (idx.double() + 2)
    thr[0] = -1.0
    fail = (s < thr) & (idx < n)                                                # [B, R]
    # index where the scan breaks; n-1 when it runs through
    brk = torch.where(fail.any(-1, keepdim=True), fail.int().argmax(-1, keepdim=True), n - 1)
    count = torch.where((brk == 0) | (brk == n - 1), brk + 1, brk)              # the quirk
    take = (idx < count) & (idx < n)                                            # [B, R] in sorted order
    return torch.zeros_like(cand).scatter(1, order, take)


def _with_top1(transfer: torch.Tensor, conf: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Add each row's most confident candidate (at least one token per step while any is left)."""
    top = conf.argmax(-1, keepdim=True)                                         # [B, 1]
    return transfer.scatter(1, top, cand.gather(1, top) | transfer.gather(1, top))


# -- Fast-dLLM's Dream port -------------------------------------------------------------------------
class _FirstPositionStep(DreamSchedule):
    """What both modes of Fast-dLLM's Dream port share: the block-opening step, the rows a cached step feeds
    the model, and when a block stops.

    The opening step is the forward that refreshes the cache. The port runs Dream's sampler on every canvas
    row and keeps only the block's first position, so only that position's logits are needed. At
    temperature > 0 it makes one categorical draw per canvas row, in canvas order; how a draw consumes the
    generator does not depend on the probabilities, so a row of any valid distribution (a one-hot) stands in
    for every other row: the same token and the same generator state after.

    Cached steps feed the region [start, N) (prefix) or [start, end) (dual) and shift Dream's logits inside
    it. A block stops when a cached step leaves it empty; the first cached step always runs.
    """

    cached_steps = 0       # cached steps run in this block

    def begin_block(self, view):
        self.cached_steps = 0

    def after_step(self, view):
        if view.step_in_block > 0:
            self.cached_steps += 1

    @property
    def until_empty(self) -> bool:
        return self.cached_steps > 0

    def fed_end(self, view: StepView) -> int:
        """One past the last row a cached step feeds the model."""
        return view.canvas_len if self.cfg.cache == CachePolicyKind.PREFIX else view.end

    def logit_range(self, view):
        if view.step_in_block == 0:
            return view.start, view.start + 1                                   # only the first position is kept
        return view.start, self.cached_logit_end(view)

    def cached_logit_end(self, view: StepView) -> int:
        return view.end

    def select(self, logits, ids, view):
        if view.step_in_block == 0:
            return self.first_position(logits, ids, view)
        return self.cached_select(self.cached_step_logits(logits), ids, view)

    def cached_select(self, logits, ids, view):
        raise NotImplementedError

    def first_position(self, logits, ids, view):
        """logits [B, 1, V] of the block's first position -> its token, committed unconditionally."""
        cfg = self.cfg
        probs = dream_probs(logits[:, 0], cfg.temperature, cfg.top_p, cfg.top_k)  # [B, V]
        if cfg.temperature > 0:
            B, V = probs.shape
            N = view.canvas_len
            rows = torch.zeros((B, N, V), dtype=probs.dtype, device=probs.device)
            rows[:, :, 0] = 1                                                   # stand-ins: a valid row each
            rows[:, view.start] = probs
            _, tok = dream_draw(rows.view(B * N, V), cfg.temperature, self.gen)  # [B*N], canvas order
            tok = tok.view(B, N)[:, view.start]                                 # [B]
        else:
            tok = probs.max(dim=-1).indices
        return self.without_mask_tokens(torch.ones_like(ids, dtype=torch.bool), tok[:, None])

    @staticmethod
    def cached_step_logits(logits: torch.Tensor) -> torch.Tensor:
        """The port shifts Dream's logits inside the rows a cached step feeds, so the block's first position
        reads its own hidden state: the logits we get for the second position. [B, R, V]. (With one row, in a
        block of length 1, the row keeps the previous row's logits; they matter only if the first position
        drew the mask token itself.)"""
        if logits.shape[1] < 2:
            return logits
        return torch.cat([logits[:, 1:2], logits[:, 1:]], dim=1)


class FastDllmDreamSchedule(_FirstPositionStep):
    """Fast-dLLM's Dream port, schedule mode: step 0 of a block commits its first position; steps
    1..S-1 follow Dream's schedule from timestep index 1 (so the block ends empty after S steps). The port
    ranks by negative entropy whatever ``alg`` says (``alg_temp`` > 0 draws the positions), on a tensor over
    the fed rows."""

    def block_steps(self, view):
        return self.cfg.steps // self.cfg.num_blocks

    def cached_select(self, logits, ids, view):
        cand = self.candidates(ids, view.start, view)                           # [B, R] the block's masks
        conf, tok = self.dream_tokens(logits[cand], Alg.ENTROPY)                 # [M], [M]
        x0 = ids.clone()
        x0[cand] = tok
        k = dream_count(view.block_masks / logits.shape[0], view.step_in_block, self.block_steps(view),
                        self.cfg.eps)
        transfer = self.top_count(conf.to(logits.dtype), cand, k, view, span=(view.start, self.fed_end(view)))
        return self.without_mask_tokens(transfer, x0)


class FastDllmDreamThreshold(_FirstPositionStep):
    """Fast-dLLM's Dream port, threshold mode (its ``alg='confidence_threshold'``): after the first-position
    step, tokens are drawn for every mask of the fed rows (later blocks too in prefix mode); of the block's
    masks, as many most confident as the block has masks are taken in order, the first always and the others
    when their confidence (the drawn token's probability) reaches ``threshold``. Runs until the block is
    empty (at most ``block_length`` cached steps: more only while a model keeps drawing the mask token)."""

    def block_steps(self, view):
        return self.cfg.block_length + 1

    def cached_logit_end(self, view):
        # the draws at temperature > 0 run over every fed mask; at 0 the block's rows decide alone
        return self.fed_end(view) if self.cfg.temperature > 0 else view.end

    def cached_select(self, logits, ids, view):
        B, R, _ = logits.shape
        fed = ids == self.mask_id                                               # [B, R]
        conf, tok = self.dream_tokens(logits[fed], Alg.MASKGIT_PLUS)             # [M], [M] in canvas order
        x0 = ids.clone()
        x0[fed] = tok
        # ranked on a tensor over the fed rows, as published, so ties break identically
        full = torch.full((B, self.fed_end(view) - view.start), NEG_INF, dtype=conf.dtype, device=logits.device)
        rows = full[:, :R]
        rows[fed] = conf
        full[:, view.end - view.start:] = NEG_INF                               # the block's masks only
        transfer = torch.zeros(full.shape, dtype=torch.bool, device=logits.device)
        k = view.block_masks
        if k > 0:
            top_conf, sel = torch.topk(full, k, dim=-1)                         # [B, k]
            keep = top_conf >= self.cfg.threshold
            keep[:, 0] = True
            transfer.scatter_(1, sel, keep)
        return self.without_mask_tokens(transfer[:, :R], x0)


# -- APD ---------------------------------------------------------------------------------------------
class ApdCommit(CommitPolicy):
    """Adaptive Parallel Decoding (docs/algorithms.md).

    With p the float64 softmax, c = 1 - (second-largest prob) and H = 1 - cos(p_t, p_{t-1}):
    - ``global``:    tau -= alpha * mean_M(c) - beta * mean_M(H) over the block's masks M;
    - ``per_token``: tau_i -= alpha * c_i - beta * H_i for every gen position from the block on
      (earlier positions are decoded; their tau can no longer matter).
    No update at step 1. The update uses this step's logits and happens before committing.
    Commit: block masks with conf >= tau, plus the most confident one. Clamp and block reset
    are optional (off by default).
    """

    _bound = None          # (tables, b) once the executor keeps this policy's state in a batch's tables

    def reset(self, batch, prompt_len, gen_len, vocab, device, generator):
        super().reset(batch, prompt_len, gen_len, vocab, device, generator)
        shape = (batch, gen_len) if self.cfg.apd_mode == ApdMode.PER_TOKEN else ()
        # buffers keep their identity across generations of the same shape: captured graphs read them
        tau, dev = getattr(self, "tau", None), torch.device(device)
        if tau is None or tuple(tau.shape) != shape or tau.device.type != dev.type or \
                (dev.index is not None and tau.device.index != dev.index):
            self.tau = torch.full(shape, self.cfg.tau0, dtype=torch.float64, device=device)
            self.prev = None
            self._bound = None
        else:
            self.tau.fill_(self.cfg.tau0)
        # the previous step's distribution of every gen row: float64 probabilities on the plain path,
        # the logits themselves with fused kernels (vocab_stats recomputes p from them in registers)
        self.has_prev = False

    def begin_block(self, view):
        if self.cfg.apd_block_reset:
            self.tau.fill_(self.cfg.tau0)

    def logit_range(self, view):
        if self.cfg.apd_mode == ApdMode.PER_TOKEN:
            return view.start, view.canvas_len
        # global: the block, plus the next block so H exists at that block's first step
        return view.start, min(view.canvas_len, view.end + self.cfg.block_length)

    def step_key(self, view):
        return ("apd", self.has_prev, view.start, view.end) if self._greedy() else None

    def after_step(self, view):
        self.has_prev = True

    def select(self, logits, ids, view):
        B, R, V = logits.shape
        g0 = view.start - view.prompt_len                                       # gen index of row 0
        cand = self.candidates(ids, view.start, view)
        if self.ops is not None and self._greedy():
            x0, conf = self._fused_stats(logits, cand, g0)
        else:
            x0, conf = self._plain_stats(logits, cand, view, g0)
        conf = conf.masked_fill(~cand, NEG_INF)
        tau = self.tau if self.tau.dim() == 0 else self.tau[:, g0:g0 + R]
        return self.without_mask_tokens(_with_top1(cand & (conf >= tau), conf, cand), x0)

    def _plain_stats(self, logits, cand, view, g0):
        B, R, V = logits.shape
        p = F.softmax(logits.double(), dim=-1)                                  # [B, R, V]
        # the public code draws over the whole canvas, its Gumbel noise in the logits' dtype
        x0 = self.sample(logits, cand, view.start, view, canvas_noise=True, noise_dtype=logits.dtype)
        if self.cfg.remasking == Remasking.RANDOM:
            conf = torch.rand((B, view.canvas_len), device=x0.device,
                              generator=self.gen)[:, view.start:view.start + R].double()
        else:
            conf = p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)                   # [B, R]
        if self.prev is None or self.prev.dtype != torch.float64 or self.prev.shape != (B, self.gen_len, V):
            self.prev = torch.empty((B, self.gen_len, V), dtype=torch.float64, device=p.device)
        if self.has_prev:
            prev = self.prev[:, g0:g0 + R]
            c = 1 - torch.topk(p, min(2, V), dim=-1).values[..., -1]            # [B, R]
            H = 1 - (p * prev).sum(-1) / (p.norm(dim=-1) * prev.norm(dim=-1))   # [B, R]
            self._update(c, H, cand, g0)
        self.prev[:, g0:g0 + R] = p
        return x0, conf

    def _fused_stats(self, logits, cand, g0):
        B, R, V = logits.shape
        if self.prev is None or self.prev.dtype != logits.dtype or self.prev.shape != (B, self.gen_len, V):
            self.prev = torch.empty((B, self.gen_len, V), dtype=logits.dtype, device=logits.device)
        prev = self.prev[:, g0:g0 + R]
        stats = self.ops.vocab_stats(logits, prev if self.has_prev else None, want_c=self.has_prev)
        if self.has_prev:
            self._update(stats.c, stats.H, cand, g0)
        prev.copy_(logits)
        return stats.x0, stats.conf

    # -- a batch decides together: greedy with fused kernels, tau and prev in the executor's tables --------
    def batch_key(self, view):
        if self.ops is None or not self._greedy():
            return None
        if self.cfg.apd_mode == ApdMode.PER_TOKEN:
            return ("apd", self.cfg, self.has_prev)
        # the global means sum over each sequence's rows: only ranges of one length sum in the order they do alone
        lo, hi = self.logit_range(view)
        return ("apd", self.cfg, self.has_prev, hi - lo)

    def make_batch_tables(self, batch, gen_len, vocab, dtype, device):
        per_token = self.cfg.apd_mode == ApdMode.PER_TOKEN
        return ApdTables(torch.full((batch, gen_len) if per_token else (batch,), self.cfg.tau0, dtype=torch.float64,
                                    device=device),
                         torch.empty((batch, gen_len, vocab), dtype=dtype, device=device))

    def bind_batch(self, tables, b):
        if self._bound is not None and self._bound[0] is tables and self._bound[1] == b:
            return
        tau = tables.tau[b:b + 1] if self.tau.dim() else tables.tau[b]
        tau.copy_(self.tau)
        prev = tables.prev[b:b + 1]
        if self.has_prev and self.prev is not None and self.prev.shape == prev.shape:
            prev.copy_(self.prev)
        self.tau, self.prev, self._bound = tau, prev, (tables, b)

    def select_batch(self, view, logits, ids, rows, tables):
        cfg = self.cfg
        cand = (ids == self.mask_id) & rows.in_block                           # [B, R] each block's masks
        stats = self.ops.vocab_stats(logits, tables.prev if self.has_prev else None, want_c=self.has_prev,
                                     prev_rows=rows.gen)
        if self.has_prev:
            if cfg.apd_mode == ApdMode.PER_TOKEN:
                t = tables.tau.gather(1, rows.gen)                             # repeated rows: equal values
                tables.tau.scatter_(1, rows.gen, t.sub_(cfg.alpha * stats.c).add_(cfg.beta * stats.H))
            else:
                zero = torch.zeros((), dtype=stats.c.dtype, device=logits.device)
                n = cand.sum(1).clamp(min=1)
                tables.tau.sub_(cfg.alpha * torch.where(cand, stats.c, zero).sum(1) / n)
                tables.tau.add_(cfg.beta * torch.where(cand, stats.H, zero).sum(1) / n)
            if cfg.tau_min is not None or cfg.tau_max is not None:
                tables.tau.clamp_(min=cfg.tau_min, max=cfg.tau_max)
        b = torch.arange(logits.shape[0], device=logits.device)[:, None]
        tables.prev.index_put_((b.expand_as(rows.gen), rows.gen), logits)    # this step's logits for the next
        conf = stats.conf.masked_fill(~cand, NEG_INF)
        tau = tables.tau.gather(1, rows.gen) if tables.tau.dim() == 2 else tables.tau[:, None]
        return self.without_mask_tokens(_with_top1(cand & (conf >= tau), conf, cand), stats.x0)

    def _update(self, c, H, cand, g0):
        """tau -= alpha * c, then += beta * H (the reference's order of float64 operations)."""
        cfg = self.cfg
        if cfg.apd_mode == ApdMode.PER_TOKEN:
            t = self.tau[:, g0:g0 + c.shape[1]]
            t.sub_(cfg.alpha * c).add_(cfg.beta * H)
        else:
            # Means over the block's masks M_t only, by selection, not by weighting: rows past the block
            # may have no previous distribution yet (at a block's first step the next block's rows were
            # never computed), so their H is garbage, possibly NaN, and NaN * 0 would poison tau for good.
            zero = torch.zeros((), dtype=c.dtype, device=c.device)
            n = cand.sum().clamp(min=1)                                         # mean is 0 without masks
            self.tau.sub_(cfg.alpha * torch.where(cand, c, zero).sum() / n)
            self.tau.add_(cfg.beta * torch.where(cand, H, zero).sum() / n)
        if cfg.tau_min is not None or cfg.tau_max is not None:
            self.tau.clamp_(min=cfg.tau_min, max=cfg.tau_max)


@dataclasses.dataclass
class ApdTables:
    """APD's device state for a batch, one row per slot: tau ([B, G] per token, [B] global) and the previous
    step's logits of every gen row [B, G, V]."""
    tau: torch.Tensor
    prev: torch.Tensor


def make_commit_policy(cfg: DecodeConfig, arch: Arch, mask_id: int) -> CommitPolicy:
    """The commit policy ``cfg.commit`` for a model of architecture ``arch``."""
    arch = Arch(arch)
    if arch == Arch.LLADA and cfg.fastdllm_dream:
        raise ConfigError("--fastdllm-dream reproduces Fast-dLLM's Dream port and needs a Dream model; "
                          "for LLaDA use --cache prefix/dual with --commit threshold (Fast-dLLM's LLaDA rules)")
    if cfg.commit == CommitPolicyKind.SCHEDULE:
        if arch == Arch.DREAM:
            return (FastDllmDreamSchedule if cfg.fastdllm_dream else DreamSchedule)(cfg, mask_id, arch)
        return LladaSchedule(cfg, mask_id, arch)
    if cfg.fastdllm_dream:
        return FastDllmDreamThreshold(cfg, mask_id, arch)
    cls = {CommitPolicyKind.THRESHOLD: ThresholdCommit, CommitPolicyKind.FACTOR: FactorCommit,
           CommitPolicyKind.APD: ApdCommit}[cfg.commit]
    return cls(cfg, mask_id, arch)
