"""The one decode loop for LLaDA and Dream: canvases, blocks, steps, a cache and a commit policy per sequence.

```
canvas[b] = [prompt_b, MASK * G, padding]          # one row per slot of the batch
while any sequence has steps left:
    for each slot b: lo_b, hi_b = run_b.next_step()    # its block, its step (runtime/sequence.py)
    committed = executor.run_batch(steps)             # every layer, head and commit, all slots at once
    for each slot b: run_b.finish_step(committed[b])  # a finished sequence frees its slot for the next prompt
```
A sequence takes exactly the steps it takes alone: each ``SequenceRun`` owns its policies, view and
random generator, and its canvas row holds it where it sits alone, ``[prompt, generation, padding]``.
Slots are continuous batching at the level of steps: when a sequence finishes, the
next waiting prompt takes its slot at the next step (every policy recomputes all rows at a sequence's
first step, so nothing of the previous occupant remains). ``decode`` is a batch of one.

``run_batch`` runs the layers, the head and the commit decisions, updates the canvas (which the executor
owns, so a whole step can be one CUDA graph) and returns the committed positions. Token ids only:
tokenizers live in ``Pipeline``. One host sync per step, whatever the batch size (the committed
positions, which the loop needs anyway to stop adaptive blocks and to centre the DCU windows).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import torch

from dllm.engines.engine_set import EngineSet
from dllm.errors import ConfigError
from dllm.runtime.config import DecodeConfig
from dllm.runtime.executor import Executor, SlotStep
from dllm.runtime.guidance import GuidedExecutor
from dllm.runtime.sequence import SequenceRun
from dllm.runtime.view import StepView

# With CUDA graphs, batched canvases are rounded up to a multiple of this many rows, so that shapes repeat
# and captured graphs replay across batches; elsewhere a batch's canvas is exact (padding rows cost compute).
CANVAS_BUCKET = 32


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
        # offer only fixes that work: a gen length of whole blocks that fits, a prompt of at least one token
        room, block = limit - P, cfg.block_length
        fixes = ([f"lower --gen-length to at most {room - room % block}"] if room >= block else
                 [f"lower --gen-length and --block-length to at most {room}"] if room >= 1 else [])
        if limit - cfg.gen_length >= 1:
            fixes.append(f"shorten the prompt to at most {limit - cfg.gen_length} tokens")
        fix = " or ".join(fixes) or f"shorten the prompt and lower --gen-length (together at most {limit} tokens)"
        raise ConfigError(f"prompt of {P} tokens + --gen-length {cfg.gen_length} = {P + cfg.gen_length} exceeds the "
                          f"canvas limit of {limit} tokens (max_seq_len); {fix}")
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
    return _drain(decode_steps(engines, prompt_ids, cfg, executor=executor, max_seq_len=max_seq_len), on_step)


def _drain(steps, on_step):
    """Run a step generator to its end, handing each event to ``on_step``; returns the generator's value."""
    while True:
        try:
            event = next(steps)
        except StopIteration as done:
            return done.value
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
    P, G = prompt.shape[1], cfg.gen_length
    N = P + G
    run = SequenceRun(0, prompt, cfg, executor.cache_policy(cfg, spec), executor.commit_policy(cfg, spec))
    executor.reset(1, P, N, run.cache)
    run.start(spec.n_layers, spec.vocab_size, device)
    canvas = executor.canvas                                                          # [1, N]
    canvas.fill_(spec.mask_id)
    canvas[:, :P] = prompt
    while (span := run.next_step()) is not None:
        outcome = executor.run_step(run.cache, run.commit, run.view, *span)
        run.finish_step(outcome.committed, outcome.stats.rows, outcome.stats.engine_s)
        yield canvas, run.view, outcome.committed
    return _result(run, canvas[0], spec.eos_ids)


def _result(run: SequenceRun, canvas_row: torch.Tensor, eos_ids) -> DecodeResult:
    """The DecodeResult of a finished sequence from its canvas row (its padding dropped)."""
    final = canvas_row[:run.N].to("cpu", copy=True)[None]       # a copy: the executor reuses its canvas
    P, view = run.prompt.shape[1], run.view
    return DecodeResult(ids=final[0, P:].tolist(), canvas=final, prompt_length=P, steps=view.step, nfe=view.step,
                        rows_per_step=run.rows_per_step, tokens_per_step=run.tokens_per_step,
                        commit_step=run.commit_step, wall_s=time.perf_counter() - run.t_start,
                        engine_s=run.engine_s, step_end_s=run.step_end_s, eos_ids=tuple(eos_ids))


def batch_canvas_length(executor: Executor, prompt_lens: list[int], gen_length: int, limit: int) -> int:
    """``canvas_length`` for a batch on ``executor``: rounded up to CANVAS_BUCKET rows only where CUDA graphs
    replay (elsewhere padding rows cost compute and buy nothing)."""
    return canvas_length(prompt_lens, gen_length, limit, CANVAS_BUCKET if executor.cuda_graphs else 1)


def canvas_length(prompt_lens: list[int], gen_length: int, limit: int, bucket: int = CANVAS_BUCKET) -> int:
    """The canvas of a batch: its longest sequence, rounded up to ``bucket`` rows while that fits (prompts
    of one length need no padding: their canvas is exact)."""
    N = max(prompt_lens) + gen_length
    if len(set(prompt_lens)) == 1:
        return N
    rounded = -(-N // bucket) * bucket
    return rounded if rounded <= limit else N


BatchStepCallback = Callable[[int, torch.Tensor, StepView, list], None]


def decode_batch(engines: EngineSet, prompts: list, cfg: DecodeConfig, *, executor: Executor | None = None,
                 batch_size: int | None = None, on_step: BatchStepCallback | None = None,
                 max_seq_len: int | None = None, stop: Callable[[int], bool] | None = None,
                 on_finish: Callable[[int, DecodeResult], None] | None = None) -> list[DecodeResult | None]:
    """Decode every prompt of ``prompts`` with ``cfg``, up to ``batch_size`` of them at a time.

    Each result equals what ``decode`` gives for that prompt alone. Prompts beyond the batch size wait
    and take a slot as soon as a sequence finishes. on_step(index, canvas, view, committed): after every
    step of every sequence (``index`` into ``prompts``; canvas [1, P + G] of that sequence).
    stop(index) -> True drops that prompt between two steps (or before it starts): its slot goes to the
    next waiting prompt, its result is None, and the other sequences go on unchanged.
    on_finish(index, result): as soon as a sequence ends (before the others), with its DecodeResult.
    """
    return _drain(decode_batch_steps(engines, prompts, cfg, executor=executor, batch_size=batch_size,
                                     max_seq_len=max_seq_len, stop=stop, on_finish=on_finish), on_step)


def decode_batch_steps(engines: EngineSet, prompts: list, cfg: DecodeConfig, *, executor: Executor | None = None,
                       batch_size: int | None = None, max_seq_len: int | None = None,
                       stop: Callable[[int], bool] | None = None,
                       on_finish: Callable[[int, DecodeResult], None] | None = None):
    """``decode_batch`` as a generator: yields ``(index, canvas, view, committed)`` after every step of every
    sequence and returns the list of DecodeResults (``StopIteration.value``; None for a prompt ``stop``
    dropped), in the order of ``prompts``."""
    stopped = (lambda i: False) if stop is None else stop
    finished = (lambda i, result: None) if on_finish is None else on_finish
    _check_batch_config(cfg)
    spec, device = engines.spec, torch.device(engines.device)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ConfigError(f"decode_batch needs a non-empty list of prompts, got {type(prompts).__name__}")
    tensors = []
    for i, p in enumerate(prompts):
        try:
            t = as_prompt_tensor(p, device)
            check_prompt(t, engines, cfg, max_seq_len)
        except ConfigError as e:
            raise ConfigError(f"prompt {i}: {e}") from None
        tensors.append(t)
    B = min(_check_batch_size(len(prompts) if batch_size is None else batch_size, engines), len(prompts))
    executor = executor or Executor(engines)
    if B == 1:                      # one slot: each prompt on its own canvas, no padding
        results: list[DecodeResult | None] = [None] * len(prompts)
        for i, t in enumerate(tensors):
            if stopped(i):
                continue
            steps = decode_steps(engines, t, cfg, executor=executor, max_seq_len=max_seq_len)
            while True:
                try:
                    event = next(steps)
                except StopIteration as done:
                    results[i] = done.value
                    finished(i, done.value)
                    break
                yield (i, *event)
                if stopped(i):
                    steps.close()
                    break
        return results
    N = batch_canvas_length(executor, [t.shape[1] for t in tensors], cfg.gen_length, max_seq_len or spec.max_seq_len)
    batch = BatchDecoder(engines, cfg, B, N, executor=executor, max_seq_len=max_seq_len, stop=stop,
                         on_finish=on_finish)
    for t in tensors:
        batch.submit(t)
    while events := batch.step():
        yield from events
    return [batch.results.get(i) for i in range(len(prompts))]


def _check_batch_config(cfg) -> None:
    if not isinstance(cfg, DecodeConfig):
        raise ConfigError(f"decode needs a DecodeConfig, got {type(cfg).__name__}")
    if cfg.cfg_scale > 0:
        raise ConfigError("classifier-free guidance (--cfg-scale) decodes one prompt at a time; "
                          "pass the prompts one by one")


def _check_batch_size(B, engines: EngineSet) -> int:
    limit = engines.max_batch
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {B!r}")
    if limit is not None and B > limit:
        raise ConfigError(f"batch size {B} exceeds the {limit} sequences these engines take at once (their "
                          f"--max-batch); pass batch_size={limit} or less (the other prompts wait for a slot), or "
                          f"re-export with dllm-export --max-batch {B}")
    return B


class BatchDecoder:
    """Step-level continuous batching of prompts that share one DecodeConfig: ``batch_size`` slots over a
    canvas of ``canvas_len`` rows. ``submit`` queues a prompt at any time (it takes the next free slot, in
    order of submission); ``step`` runs one batched step of every running sequence and returns its events
    ``(index, canvas, view, committed)``, one per sequence, or [] once nothing is running or waiting.

    Each sequence gets exactly what ``decode`` gives its prompt alone, whenever it joins. A prompt fits when
    prompt + gen_length <= canvas_len (``room``): the canvas is fixed for the batch's life. ``cancel(index)``
    (or ``stop(index)`` returning True) drops a prompt between two steps, or before it starts: its slot
    goes to the next waiting prompt and it gets no result. ``results[index]``: each finished prompt's
    DecodeResult, also handed to ``on_finish(index, result)`` as soon as it ends.
    """

    def __init__(self, engines: EngineSet, cfg: DecodeConfig, batch_size: int, canvas_len: int, *,
                 executor: Executor | None = None, max_seq_len: int | None = None,
                 stop: Callable[[int], bool] | None = None,
                 on_finish: Callable[[int, DecodeResult], None] | None = None):
        _check_batch_config(cfg)
        B, spec = _check_batch_size(batch_size, engines), engines.spec
        if not cfg.gen_length < canvas_len <= (max_seq_len or spec.max_seq_len):
            raise ConfigError(f"canvas_len {canvas_len} must exceed gen_length {cfg.gen_length} (room for a prompt) "
                              f"and stay within max_seq_len {max_seq_len or spec.max_seq_len}")
        self.engines, self.cfg, self.spec, self.max_seq_len = engines, cfg, spec, max_seq_len
        self.device = torch.device(engines.device)
        self.executor = executor = executor or Executor(engines)
        self.B, self.N = B, canvas_len
        self._stop = (lambda i: False) if stop is None else stop
        self._on_finish = (lambda i, result: None) if on_finish is None else on_finish
        executor.reset(B, canvas_len - cfg.gen_length, canvas_len, executor.cache_policy(cfg, spec, 0))
        self.canvas = executor.canvas                                                   # [B, N]
        self.canvas.fill_(spec.mask_id)
        self.slots: list[SequenceRun | None] = [None] * B
        self._views: list[torch.Tensor | None] = [None] * B    # each slot's canvas rows [1, N_b], for its events
        self.lengths = [canvas_len] * B
        self.prompts: list[torch.Tensor] = []
        self.waiting: collections.deque[int] = collections.deque()
        self.cancelled: set[int] = set()
        self.results: dict[int, DecodeResult] = {}

    @property
    def room(self) -> int:
        """The longest prompt this batch takes: its canvas less the generation."""
        return self.N - self.cfg.gen_length

    @property
    def free_slots(self) -> int:
        """Slots that no running or waiting prompt will take (a sequence that has just committed its last
        token leaves its slot at the next step, to the first waiting prompt, so its slot counts as free)."""
        return self.B - sum(run is not None and not run.finished for run in self.slots) - len(self.waiting)

    @property
    def idle(self) -> bool:
        return not self.waiting and all(run is None for run in self.slots)

    def submit(self, prompt) -> int:
        """Queue a prompt (ids, [P] or [1, P]); returns its index. Raises ConfigError, leaving the batch as it
        was, for a prompt that is invalid or longer than ``room``."""
        t = as_prompt_tensor(prompt, self.device)
        check_prompt(t, self.engines, self.cfg, self.max_seq_len)
        if t.shape[1] > self.room:
            raise ConfigError(f"a prompt of {t.shape[1]} tokens does not fit this batch's canvas of {self.N} rows "
                              f"(prompts of up to {self.room} tokens with gen_length {self.cfg.gen_length}); "
                              "decode it in a batch of its own")
        self.prompts.append(t)
        self.waiting.append(len(self.prompts) - 1)
        return len(self.prompts) - 1

    def cancel(self, index: int) -> None:
        """Drop prompt ``index`` at the next step (nothing changes for the others)."""
        self.cancelled.add(index)

    def _dropped(self, index: int) -> bool:
        return index in self.cancelled or self._stop(index)

    def _admit(self, b: int) -> SequenceRun:
        i, spec, cfg = self.waiting.popleft(), self.spec, self.cfg
        ex, prompt = self.executor, self.prompts[i]
        run = SequenceRun(i, prompt, cfg, ex.cache_policy(cfg, spec, b), ex.commit_policy(cfg, spec, b), slot=b)
        self.canvas[b, :run.P] = prompt[0]
        self.canvas[b, run.P:run.N] = spec.mask_id
        self.canvas[b, run.N:] = spec.eos_ids[0]     # padding rows: any real token; never attended to
        ex.clear_slot(b)
        self.lengths[b] = run.N
        self._views[b] = self.canvas[b:b + 1, :run.N]          # made once: a view per event costs host time
        run.start(spec.n_layers, spec.vocab_size, self.device)
        return run

    def step(self) -> list[tuple]:
        """One batched step of every running sequence (finished ones first make room for waiting prompts)."""
        steps: list[SlotStep | None] = []
        for b in range(self.B):
            run = self.slots[b]
            if run is not None and self._dropped(run.index):     # dropped: the slot is free, no result
                self.slots[b] = run = None
            span = run.next_step() if run is not None else None
            while span is None:
                if run is not None:                   # finished: its result, and the slot is free
                    self.results[run.index] = result = _result(run, self.canvas[b], self.spec.eos_ids)
                    self._on_finish(run.index, result)
                    self.slots[b] = run = None
                while self.waiting and self._dropped(self.waiting[0]):   # dropped before it started
                    self.waiting.popleft()
                if not self.waiting:
                    break
                run = self.slots[b] = self._admit(b)
                span = run.next_step()
            steps.append(None if span is None else SlotStep(run.cache, run.commit, run.view, *span))
        if all(st is None for st in steps):
            return []
        self.executor.set_lengths(self.lengths)
        events = []
        for b, out in enumerate(self.executor.run_batch(steps)):
            if out is not None:
                run = self.slots[b]
                run.finish_step(out.committed, out.stats.rows, out.stats.engine_s)
                events.append((run.index, self._views[b], run.view, out.committed))
        return events
