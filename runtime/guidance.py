"""Classifier-free guidance: the decode loop's executor plus a twin for the unconditional canvas.

LLaDA's guidance (``cfg_scale`` s > 0): every step also runs the canvas with the prompt masked, and
the commit policy sees ``un + (s + 1) * (cond - un)``. The unconditional canvas gets its own
Executor and its own cache policy (same config), so every cache method keeps separate caches for the
two canvases and reuses rows exactly as it would without guidance.

``GuidedExecutor`` has the three methods the loop uses (``cache_policy``, ``reset``, ``step``), so the
loop only wraps its executor when ``cfg.cfg_scale > 0``.
"""

from __future__ import annotations

import torch

from dllm.runtime.cache_policy import CachePolicy, make_cache_policy
from dllm.runtime.config import DecodeConfig
from dllm.runtime.executor import Executor, StepStats
from dllm.runtime.view import StepView


class GuidedExecutor:
    """``step`` returns guided logits; rows and engine time count both canvases."""

    def __init__(self, executor: Executor, cfg: DecodeConfig):
        self.cond = executor
        self.uncond = Executor(executor.engines)
        self.scale = cfg.cfg_scale
        self.spec = executor.spec
        self.un_policy = make_cache_policy(cfg, self.spec)

    def cache_policy(self, cfg: DecodeConfig, spec) -> CachePolicy:
        return self.cond.cache_policy(cfg, spec)

    def reset(self, batch: int, prompt_len: int, canvas_len: int, policy: CachePolicy) -> None:
        self.cond.reset(batch, prompt_len, canvas_len, policy)
        self.un_policy.reset(self.spec.n_layers, prompt_len, canvas_len - prompt_len, self.cond.device)
        self.uncond.reset(batch, prompt_len, canvas_len, self.un_policy)
        self.P = prompt_len
        # the unconditional canvas: the prompt masked, the generation shared with the real canvas
        self.un_canvas = torch.full((batch, canvas_len), self.spec.mask_id, dtype=torch.long, device=self.cond.device)

    def step(self, canvas: torch.Tensor, policy: CachePolicy, view: StepView, lo: int, hi: int
             ) -> tuple[torch.Tensor, StepStats]:
        cond, stats = self.cond.step(canvas, policy, view, lo, hi)             # [B, hi-lo, V]
        self.un_canvas[:, self.P:] = canvas[:, self.P:]
        self.un_policy.begin_step(view)
        un, un_stats = self.uncond.step(self.un_canvas, self.un_policy, view, lo, hi)
        logits = un + (self.scale + 1) * (cond - un)                            # LLaDA's formula, its order
        rows = [a + b for a, b in zip(stats.rows, un_stats.rows)]
        return logits, StepStats(rows, stats.engine_s + un_stats.engine_s)
