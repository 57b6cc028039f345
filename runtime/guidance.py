"""Classifier-free guidance: the decode loop's executor plus a twin for the unconditional canvas.

LLaDA's guidance (``cfg_scale`` s > 0): every step also runs the canvas with the prompt masked, and
the commit policy sees ``un + (s + 1) * (cond - un)``. The unconditional canvas gets its own
Executor and its own cache policy (same config), so every cache method keeps separate caches for the
two canvases and reuses rows exactly as it would without guidance.

``GuidedExecutor`` has what the loop uses of an Executor (``cache_policy``, ``commit_policy``, ``reset``,
``canvas``, ``run_step``), so the loop only wraps its executor when ``cfg.cfg_scale > 0``. Guided steps
run eagerly (no CUDA graphs): the two canvases' logits are mixed between the head and the commit.
"""

from __future__ import annotations

import torch

import time

from dllm.runtime.cache_policy import CachePolicy, make_cache_policy
from dllm.runtime.commit import CommitPolicy
from dllm.runtime.config import DecodeConfig
from dllm.runtime.executor import Executor, StepOutcome, StepStats
from dllm.runtime.view import StepView


class GuidedExecutor:
    """``run_step`` commits from guided logits; rows and engine time count both canvases."""

    def __init__(self, executor: Executor, cfg: DecodeConfig):
        self.cond = executor
        self.uncond = Executor(executor.engines)
        self.scale = cfg.cfg_scale
        self.spec = executor.spec
        self.un_policy = make_cache_policy(cfg, self.spec)

    def cache_policy(self, cfg: DecodeConfig, spec) -> CachePolicy:
        return self.cond.cache_policy(cfg, spec)

    def commit_policy(self, cfg: DecodeConfig, spec) -> CommitPolicy:
        return self.cond.commit_policy(cfg, spec)

    @property
    def canvas(self) -> torch.Tensor:
        return self.cond.canvas

    def reset(self, batch: int, prompt_len: int, canvas_len: int, policy: CachePolicy) -> None:
        self.cond.reset(batch, prompt_len, canvas_len, policy)
        self.un_policy.reset(self.spec.n_layers, prompt_len, canvas_len - prompt_len, self.cond.device)
        self.uncond.reset(batch, prompt_len, canvas_len, self.un_policy)
        self.P = prompt_len
        # the unconditional canvas: the prompt masked, the generation shared with the real canvas
        self.un_canvas = torch.full((batch, canvas_len), self.spec.mask_id, dtype=torch.long, device=self.cond.device)

    def run_step(self, cache: CachePolicy, commit: CommitPolicy, view: StepView, lo: int, hi: int) -> StepOutcome:
        t0 = time.perf_counter()
        canvas = self.cond.canvas
        cond, stats = self.cond.step(canvas, cache, view, lo, hi)              # [B, hi-lo, V]
        self.un_canvas[:, self.P:] = canvas[:, self.P:]
        self.un_policy.begin_step(view)
        un, un_stats = self.uncond.step(self.un_canvas, self.un_policy, view, lo, hi)
        logits = un + (self.scale + 1) * (cond - un)                            # LLaDA's formula, its order
        self.cond.apply_commit(commit, logits, view, lo, hi)
        commit.after_step(view)
        rows = [a + b for a, b in zip(stats.rows, un_stats.rows)]
        return StepOutcome(self.cond.read_committed(lo, hi), StepStats(rows, time.perf_counter() - t0))
