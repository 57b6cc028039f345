"""The one decode loop for LLaDA and Dream: a canvas, blocks, steps, one cache and one commit policy.

```
canvas = [prompt, MASK * G]
for each block:
    for each step (schedule: steps/num_blocks; adaptive: until the block is empty, <= block_length):
        cache.begin_step(view)                        # which rows each layer recomputes
        lo, hi = commit.logit_range(view)             # which positions need logits
        committed = executor.run_step(cache, commit, view, lo, hi).committed
```
``run_step`` runs the layers, the head and the commit decision, updates the canvas (which the
executor owns, so a whole step can be one CUDA graph) and returns the committed positions.
Token ids only: tokenizers live in ``Pipeline``. One host sync per step (the committed positions,
which the loop needs anyway to stop adaptive blocks and to centre the DCU window).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from dllm.engines.engine_set import EngineSet
from dllm.errors import ConfigError
from dllm.runtime.config import DecodeConfig
from dllm.runtime.executor import Executor
from dllm.runtime.guidance import GuidedExecutor
from dllm.runtime.view import StepView


@dataclasses.dataclass
class DecodeResult:
    """What one generation produced, with its cost."""
    ids: list[int]                   # the generated ids only (gen_length of them, EOS tail included)
    canvas: torch.Tensor             # [1, P + G] final canvas on the host (prompt + generation)
    prompt_length: int
    steps: int                       # decoding steps (= model forwards)
    nfe: int                         # network function evaluations (one per step)
    rows_per_step: list[list[int]]   # rows recomputed per layer, per step
    tokens_per_step: list[int]
    commit_step: list[int]           # step (0-based) at which each generated position was committed
    wall_s: float                    # latency: prompt in, every position final
    engine_s: float                  # host time inside engine calls
    step_end_s: list[float] = dataclasses.field(default_factory=list)   # time since start at each step's end
    eos_ids: tuple[int, ...] = ()

    @property
    def answer_length(self) -> int:
        """Generated tokens before the first EOS (the answer; the EOS padding after it is not counted)."""
        eos = set(self.eos_ids)
        return next((i for i, t in enumerate(self.ids) if t in eos), len(self.ids))

    @property
    def first_token_s(self) -> float:
        """Seconds until the answer's first token was committed (what a stream can show first)."""
        step = self.commit_step[0] if self.commit_step else -1
        return self.step_end_s[step] if 0 <= step < len(self.step_end_s) else self.wall_s

    @property
    def mean_rows_per_layer(self) -> list[float]:
        """Rows recomputed per layer, averaged over steps."""
        if not self.rows_per_step:
            return []
        n = len(self.rows_per_step)
        return [sum(r[l] for r in self.rows_per_step) / n for l in range(len(self.rows_per_step[0]))]

    @property
    def tokens_per_second(self) -> float:
        """Answer tokens (before the first EOS) per second of wall time."""
        return self.answer_length / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def canvas_tokens_per_second(self) -> float:
        """Every generated position (EOS padding included) per second of wall time: the canvas rate."""
        return len(self.ids) / self.wall_s if self.wall_s > 0 else float("inf")


StepCallback = Callable[[torch.Tensor, StepView, list], None]


def as_prompt_tensor(prompt_ids, device: torch.device) -> torch.Tensor:
    """Prompt ids (list, 1-D or [1, P] tensor) -> LongTensor [1, P] on ``device``."""
    if isinstance(prompt_ids, torch.Tensor):
        t = prompt_ids.detach()
    else:
        try:
            t = torch.tensor(list(prompt_ids), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError):   # RuntimeError: an id beyond int64
            raise ConfigError(f"prompt ids must be a list of ints within the vocabulary or a tensor, got "
                              f"{type(prompt_ids).__name__} {str(prompt_ids)[:80]}") from None
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] != 1:
        raise ConfigError(f"prompt ids must be one sequence ([P] or [1, P]), got shape {list(t.shape)}; "
                          "decode one prompt at a time")
    if t.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"prompt ids must be integers, got dtype {t.dtype}")
    if t.shape[1] == 0:
        raise ConfigError("the prompt is empty; pass at least one token (e.g. the BOS id)")
    return t.to(device=device, dtype=torch.long)


def check_prompt(prompt: torch.Tensor, engines: EngineSet, cfg: DecodeConfig, max_seq_len: int | None = None) -> None:
    spec = engines.spec
    P = prompt.shape[1]
    limit = max_seq_len or spec.max_seq_len
    if P + cfg.gen_length > limit:
        raise ConfigError(f"prompt of {P} tokens + --gen-length {cfg.gen_length} = {P + cfg.gen_length} exceeds the "
                          f"canvas limit of {limit} tokens (max_seq_len); shorten the prompt to at most "
                          f"{max(0, limit - cfg.gen_length)} tokens or lower --gen-length")
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= spec.vocab_size:
        raise ConfigError(f"prompt ids must lie in [0, {spec.vocab_size}), got min {lo} max {hi}")
    if bool((prompt == spec.mask_id).any()):
        raise ConfigError(f"the prompt contains the mask id {spec.mask_id}; prompts must be real tokens")


def decode(engines: EngineSet, prompt_ids, cfg: DecodeConfig, *, executor: Executor | None = None,
           on_step: StepCallback | None = None, max_seq_len: int | None = None) -> DecodeResult:
    """Decode ``cfg.gen_length`` tokens after ``prompt_ids`` with ``cfg``'s cache and commit policies.

    prompt_ids: a list of ints, a 1-D tensor or a [1, P] tensor.
    executor: pass one to reuse its buffers across calls (``Pipeline`` does).
    on_step(canvas, view, committed): called after every step with the device canvas [1, N], the
        step view and the absolute positions committed in that step.
    max_seq_len: the canvas limit (an engine directory's export limit); default the model's.
    """
    steps = decode_steps(engines, prompt_ids, cfg, executor=executor, max_seq_len=max_seq_len)
    while True:
        try:
            event = next(steps)
        except StopIteration as stop:
            return stop.value
        if on_step is not None:
            on_step(*event)


def decode_steps(engines: EngineSet, prompt_ids, cfg: DecodeConfig, *, executor: Executor | None = None,
                 max_seq_len: int | None = None):
    """``decode`` as a generator: yields ``(canvas, view, committed)`` after every step and returns
    the DecodeResult (``StopIteration.value``). Used for streaming."""
    if not isinstance(cfg, DecodeConfig):
        raise ConfigError(f"decode needs a DecodeConfig, got {type(cfg).__name__}")
    spec, device = engines.spec, torch.device(engines.device)
    prompt = as_prompt_tensor(prompt_ids, device)
    check_prompt(prompt, engines, cfg, max_seq_len)
    executor = executor or Executor(engines)
    if cfg.cfg_scale > 0:                     # classifier-free guidance: a twin runs the prompt-masked canvas
        executor = GuidedExecutor(executor, cfg)
    B, P, G = 1, prompt.shape[1], cfg.gen_length
    N = P + G
    t_start = time.perf_counter()

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    cache = executor.cache_policy(cfg, spec)
    commit = executor.commit_policy(cfg, spec)
    cache.reset(spec.n_layers, P, G, device)
    executor.reset(B, P, N, cache)
    commit.reset(B, P, G, spec.vocab_size, device, generator)
    canvas = executor.canvas                                                          # [1, N]
    canvas.fill_(spec.mask_id)
    canvas[:, :P] = prompt

    view = StepView(prompt_len=P, canvas_len=N, key_pos=P - 1)
    rows_per_step, tokens_per_step, step_end_s, engine_s = [], [], [], 0.0
    commit_step = [-1] * G
    for b in range(cfg.num_blocks):
        view.block_index, view.start, view.end = b, P + b * cfg.block_length, P + (b + 1) * cfg.block_length
        view.block_masks, view.step_in_block = cfg.block_length, 0
        commit.begin_block(view)
        for i in range(commit.block_steps(view)):
            if commit.until_empty and view.block_masks == 0:
                break
            view.step_in_block = i
            view.step += 1
            cache.begin_step(view)
            lo, hi = commit.logit_range(view)
            outcome = executor.run_step(cache, commit, view, lo, hi)
            committed = outcome.committed
            for pos in committed:
                commit_step[pos - P] = view.step - 1
            view.block_masks -= len(committed)
            if committed:
                view.key_pos = committed[-1]
            rows_per_step.append(outcome.stats.rows)
            tokens_per_step.append(len(committed))
            engine_s += outcome.stats.engine_s
            step_end_s.append(time.perf_counter() - t_start)
            yield canvas, view, committed
    final = canvas.cpu()
    wall = time.perf_counter() - t_start
    return DecodeResult(ids=final[0, P:].tolist(), canvas=final, prompt_length=P, steps=view.step, nfe=view.step,
                        rows_per_step=rows_per_step, tokens_per_step=tokens_per_step, commit_step=commit_step,
                        wall_s=wall, engine_s=engine_s, step_end_s=step_end_s, eos_ids=tuple(spec.eos_ids))
