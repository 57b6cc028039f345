"""Commit policies: which masked tokens of the current block become real this step.

Pure logic on torch tensors (no engines): each policy says which canvas positions it needs
logits for (``logit_range``), then turns those logits into a transfer mask (``select``).

| policy      | rule                                                                         | source |
|-------------|------------------------------------------------------------------------------|--------|
| `schedule`  | fixed count per step: LLaDA even split (remainder first) / Dream timesteps    | C.1, D.3 |
| `threshold` | top-1 + every block mask with conf >= theta, until the block is empty         | C.2 |
| `factor`    | the n-th most confident needs conf >= 1 - f/(n+1) (with Fast-dLLM's quirk)    | C.2 |
| `apd`       | conf >= tau (global scalar or per token), tau moved by -alpha*c + beta*H       | B |

Random draws come from one ``torch.Generator`` (``cfg.seed``) in the reference decoders' order
and shapes (runtime/reference.py), so ``schedule`` replays the reference token for token even
at temperature > 0. All positions are absolute canvas positions; ``lo``/``hi`` bound the rows
whose logits the policy receives.

``step_key(view)`` names the host values a step's ``select`` depends on when ``select`` is free of
host syncs, random draws and data-dependent shapes ("capturable"): the executor then records it in
the step's CUDA graph. None: ``select`` runs eagerly after the graph. With fused kernels
(``self.ops``, dllm.kernels) the argmax, the float64 confidence and APD's statistics come from one
pass over the logits (``vocab_stats``) instead of a materialised float64 softmax.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F

from dllm.spec import Arch
from dllm.runtime.config import Alg, ApdMode, CommitPolicyKind, DecodeConfig, Remasking
from dllm.runtime.view import StepView

NEG_INF = -math.inf


class CommitPolicy(abc.ABC):
    """Turns logits into committed tokens. Subclasses implement ``logit_range`` and ``select``."""

    until_empty = True     # run until the block has no masks (at most block_length steps)
    ops = None             # dllm.kernels.KernelOps, set by the executor (None: plain torch)

    def __init__(self, cfg: DecodeConfig, mask_id: int):
        self.cfg, self.mask_id = cfg, int(mask_id)

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

    def _greedy(self) -> bool:
        """Argmax tokens ranked by their probability: no random draw anywhere in ``select``."""
        return self.cfg.temperature == 0 and self.cfg.remasking == Remasking.LOW_CONFIDENCE

    # -- shared pieces ------------------------------------------------------
    def candidates(self, ids: torch.Tensor, lo: int, view: StepView) -> torch.Tensor:
        """Masks of the current block among rows [lo, lo+R): [B, R] bool."""
        cand = ids == self.mask_id
        R = ids.shape[1]
        if lo < view.start or lo + R > view.end:
            inside = torch.zeros(R, dtype=torch.bool, device=ids.device)
            inside[max(0, view.start - lo):max(0, min(R, view.end - lo))] = True
            cand = cand & inside
        return cand

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """x0 [B, R]: argmax, or LLaDA's float64 Gumbel-max when temperature > 0."""
        T = self.cfg.temperature
        if T == 0:
            return logits.argmax(-1)
        noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=self.gen)
        return (logits.double().exp() / (-torch.log(noise)) ** T).argmax(-1)

    def confidence(self, logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """[B, R] float64 probability of x0 (``low_confidence``) or U(0,1) (``random``)."""
        if self.cfg.remasking == Remasking.RANDOM:
            return torch.rand(x0.shape, device=x0.device, generator=self.gen).double()
        p = F.softmax(logits.double(), dim=-1)                                  # [B, R, V]
        return p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)

    def sample_with_confidence(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, conf) [B, R]: ``sample`` then ``confidence``, from one fused pass when greedy."""
        if self.ops is not None and self._greedy():
            stats = self.ops.vocab_stats(logits)
            return stats.x0, stats.conf
        x0 = self.sample(logits)
        return x0, self.confidence(logits, x0)


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

    def select(self, logits, ids, view):
        B, R, _ = logits.shape
        lo, N = view.start, view.canvas_len
        if self.ops is not None and self._greedy():
            x0, conf = self.sample_with_confidence(logits)
            return self._top_count(conf, ids, view), x0
        # the reference draws its noise over the whole canvas; draw the same and use our rows
        if self.cfg.temperature > 0:
            noise = torch.rand((B, N, logits.shape[-1]), dtype=torch.float64, device=logits.device,
                               generator=self.gen)[:, lo:lo + R]
            x0 = (logits.double().exp() / (-torch.log(noise)) ** self.cfg.temperature).argmax(-1)
        else:
            x0 = logits.argmax(-1)                                               # [B, R]
        if self.cfg.remasking == Remasking.RANDOM:
            conf = torch.rand((B, N), device=logits.device, generator=self.gen)[:, lo:lo + R]
        else:
            conf = F.softmax(logits.double(), dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        return self._top_count(conf, ids, view), x0

    def _top_count(self, conf: torch.Tensor, ids: torch.Tensor, view: StepView) -> torch.Tensor:
        """This step's count of the most confident block masks, as a transfer mask [B, R]."""
        B, R = conf.shape
        lo, N = view.start, view.canvas_len
        cand = self.candidates(ids, lo, view)
        # rank on a canvas-wide tensor like the reference, so ties break identically
        full = torch.full((B, N), NEG_INF, dtype=conf.dtype, device=conf.device)
        full[:, lo:lo + R] = conf.masked_fill(~cand, NEG_INF)
        k = self.counts[view.step_in_block]
        transfer = torch.zeros((B, N), dtype=torch.bool, device=conf.device)
        if k > 0:
            transfer.scatter_(1, torch.topk(full, k, dim=-1).indices, True)
        return transfer[:, lo:lo + R]


class DreamSchedule(CommitPolicy):
    """Dream's reference commit: timestep counts int(#mask*(1-s/t)), ranked by ``alg`` (D.3)."""

    until_empty = False

    def block_steps(self, view: StepView) -> int:
        return self.cfg.steps_per_block

    def select(self, logits, ids, view):
        B, R, V = logits.shape
        lo, N = view.start, view.canvas_len
        cand = self.candidates(ids, lo, view)                                   # [B, R]
        mlog = logits[cand]                                                     # [M, V] in position order
        T = self.cfg.temperature
        if T > 0:
            mlog = mlog / T
        probs = torch.softmax(mlog, dim=-1)                                     # model dtype, as Dream
        if T > 0 and probs.shape[0] > 0:
            tok = torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)  # [M]
            conf = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        else:
            conf, tok = probs.max(dim=-1)
        if self.cfg.alg == Alg.TOPK_MARGIN:
            top2 = torch.topk(probs, min(2, V), dim=-1).values
            conf = top2[:, 0] - (top2[:, 1] if V > 1 else 0)
        elif self.cfg.alg == Alg.ENTROPY:
            conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        x0 = ids.clone()
        x0[cand] = tok
        k = dream_count(view.block_masks / B, view.step_in_block, self.cfg.steps_per_block, self.cfg.eps)
        transfer = torch.zeros((B, N), dtype=torch.bool, device=logits.device)
        if k > 0:
            full = torch.full((B, N), NEG_INF, dtype=logits.dtype, device=logits.device)
            rows = full[:, lo:lo + R]
            rows[cand] = conf.to(logits.dtype)
            transfer.scatter_(1, torch.topk(full, k, dim=-1).indices, True)
        return transfer[:, lo:lo + R], x0


# -- Fast-dLLM ---------------------------------------------------------------------------------------
class ThresholdCommit(CommitPolicy):
    """Fast-dLLM: commit the most confident block mask plus every one with conf >= threshold."""

    def step_key(self, view):
        return ("threshold", view.start, view.end) if self._greedy() else None

    def select(self, logits, ids, view):
        x0, conf = self.sample_with_confidence(logits)
        cand = self.candidates(ids, view.start, view)
        conf = conf.masked_fill(~cand, NEG_INF)                                 # [B, R]
        return _with_top1(cand & (conf >= self.cfg.threshold), conf, cand), x0


class FactorCommit(CommitPolicy):
    """Fast-dLLM's factor rule: sorted confs c_(n) must reach 1 - f/(n+1) (n >= 2; n = 1 always).

    Quirk kept from the original: if the first failure is the last candidate, or none fails,
    every candidate is committed (the scan's index is bumped by one).
    """

    def step_key(self, view):
        return ("factor", view.start, view.end) if self._greedy() else None

    def select(self, logits, ids, view):
        x0, conf = self.sample_with_confidence(logits)
        cand = self.candidates(ids, view.start, view)
        conf = conf.masked_fill(~cand, NEG_INF)                                 # [B, R]
        return factor_transfer(conf, cand, self.cfg.factor), x0


def factor_transfer(conf: torch.Tensor, cand: torch.Tensor, factor: float) -> torch.Tensor:
    """Transfer mask [B, R] of the factor rule, without host syncs."""
    B, R = conf.shape
    s, order = torch.sort(conf, dim=-1, descending=True)                        # [B, R]
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


# -- APD ---------------------------------------------------------------------------------------------
class ApdCommit(CommitPolicy):
    """Adaptive Parallel Decoding (ALGORITHMS.md B).

    With p the float64 softmax, c = 1 - (second-largest prob) and H = 1 - cos(p_t, p_{t-1}):
    - ``global``:    tau -= alpha * mean_M(c) - beta * mean_M(H) over the block's masks M;
    - ``per_token``: tau_i -= alpha * c_i - beta * H_i for every gen position from the block on
      (earlier positions are decoded; their tau can no longer matter).
    No update at step 1. The update uses this step's logits and happens before committing.
    Commit: block masks with conf >= tau, plus the most confident one. Clamp and block reset
    are optional (off by default).
    """

    def reset(self, batch, prompt_len, gen_len, vocab, device, generator):
        super().reset(batch, prompt_len, gen_len, vocab, device, generator)
        shape = (batch, gen_len) if self.cfg.apd_mode == ApdMode.PER_TOKEN else ()
        # buffers keep their identity across generations of the same shape: captured graphs read them
        tau, dev = getattr(self, "tau", None), torch.device(device)
        if tau is None or tuple(tau.shape) != shape or tau.device.type != dev.type or \
                (dev.index is not None and tau.device.index != dev.index):
            self.tau = torch.full(shape, self.cfg.tau0, dtype=torch.float64, device=device)
            self.prev = None
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

    def select(self, logits, ids, view):
        B, R, V = logits.shape
        g0 = view.start - view.prompt_len                                       # gen index of row 0
        cand = self.candidates(ids, view.start, view)
        if self.ops is not None and self._greedy():
            x0, conf = self._fused_stats(logits, cand, g0)
        else:
            x0, conf = self._plain_stats(logits, cand, g0)
        conf = conf.masked_fill(~cand, NEG_INF)
        tau = self.tau if self.tau.dim() == 0 else self.tau[:, g0:g0 + R]
        return _with_top1(cand & (conf >= tau), conf, cand), x0

    def _plain_stats(self, logits, cand, g0):
        B, R, V = logits.shape
        p = F.softmax(logits.double(), dim=-1)                                  # [B, R, V]
        x0 = self.sample(logits)
        if self.cfg.remasking == Remasking.RANDOM:
            conf = torch.rand(x0.shape, device=x0.device, generator=self.gen).double()
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

    def after_step(self, view):
        self.has_prev = True

    def _update(self, c, H, cand, g0):
        cfg = self.cfg
        if cfg.apd_mode == ApdMode.PER_TOKEN:
            t = self.tau[:, g0:g0 + c.shape[1]]
            t.add_(-cfg.alpha * c + cfg.beta * H)
        else:
            w = cand.double()
            n = w.sum().clamp(min=1)                                            # mean is 0 without masks
            self.tau.add_(-cfg.alpha * (c * w).sum() / n + cfg.beta * (H * w).sum() / n)
        if cfg.tau_min is not None or cfg.tau_max is not None:
            self.tau.clamp_(min=cfg.tau_min, max=cfg.tau_max)


def make_commit_policy(cfg: DecodeConfig, arch: Arch, mask_id: int) -> CommitPolicy:
    """The commit policy ``cfg.commit`` for a model of architecture ``arch``."""
    if cfg.commit == CommitPolicyKind.SCHEDULE:
        return (DreamSchedule if Arch(arch) == Arch.DREAM else LladaSchedule)(cfg, mask_id)
    cls = {CommitPolicyKind.THRESHOLD: ThresholdCommit, CommitPolicyKind.FACTOR: FactorCommit,
           CommitPolicyKind.APD: ApdCommit}[cfg.commit]
    return cls(cfg, mask_id)
