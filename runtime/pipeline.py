"""Pipeline: the user-facing edge. Prompts (ids, text or chat messages) in, ids and text out.

>>> pipe = Pipeline.from_dir("out/", backend="onnxruntime", device="cpu")
>>> res = pipe.generate("What is 12+7?")                 # the engine directory's generation defaults
>>> res.text, res.latency_s, res.tokens_per_second
>>> cfg = pipe.default_config(cache="dcu", commit="apd")  # those defaults, plus what you change
>>> for delta in pipe.stream([{"role": "user", "content": "Sort: 5 2 9 1"}], cfg):
...     print(delta, end="", flush=True)

The decode loop works on ids only; the tokenizer (and its chat template) lives here, and so do the
model's generation defaults (``dllm.generation``) and the CPU thread count of a generation
(``dllm.threads``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from dllm.engines.engine_set import EngineSet
from dllm.errors import ConfigError, DllmWarning
from dllm.generation import GenerationDefaults, generation_defaults_from_checkpoint
from dllm.runtime.config import DecodeConfig
from dllm.runtime.executor import Executor
from dllm.runtime.loop import DecodeResult, StepCallback, decode_batch_steps, decode_steps
from dllm.runtime.prompts import check_ids, encode_chat, encode_text, encode_text_as_chat, load_tokenizer
from dllm.runtime.text import CommittedText
from dllm.threads import torch_threads


class GenerationWarning(DllmWarning):
    """A generation runs with settings the model is known to handle badly (e.g. too long a gen length)."""


@dataclasses.dataclass
class GenerationResult:
    """One generation: ids, text and what it cost."""
    ids: list[int]                    # generated ids only (EOS tail included)
    text: str | None                  # generated text cut at the first EOS (None without a tokenizer)
    prompt_ids: list[int]
    steps: int
    nfe: int
    rows_per_layer: list[float]       # rows recomputed per layer, mean over steps
    rows_per_step: list[list[int]]    # rows recomputed per layer, per step
    tokens_per_step: list[int]
    wall_s: float                     # latency of the request: prompt in, every position final
    first_token_s: float              # time until the answer's first token was committed (a stream shows it)
    answer_tokens: int                # generated tokens before the first EOS
    tokens_per_second: float          # answer_tokens / wall time (EOS padding not counted)
    canvas_tokens_per_second: float   # every generated position / wall time (EOS padding counted)
    engine_s: float
    decode: DecodeResult              # the loop's full record (canvas, commit steps)

    @property
    def latency_s(self) -> float:
        return self.wall_s

    def to_dict(self) -> dict:
        """JSON-ready summary (the CLI's --json)."""
        return {"ids": self.ids, "text": self.text, "prompt_ids": self.prompt_ids, "steps": self.steps,
                "nfe": self.nfe, "latency_s": self.wall_s, "first_token_s": self.first_token_s,
                "answer_tokens": self.answer_tokens, "tokens_per_second": self.tokens_per_second,
                "canvas_tokens_per_second": self.canvas_tokens_per_second, "wall_s": self.wall_s,
                "engine_s": self.engine_s, "rows_per_layer": self.rows_per_layer,
                "tokens_per_step": self.tokens_per_step}


Prompt = "str | Sequence[int] | torch.Tensor | Sequence[dict]"


class Pipeline:
    """An EngineSet plus a tokenizer: ``generate`` and ``stream`` for ids, text or chat messages."""

    def __init__(self, engines: EngineSet, tokenizer=None, *, max_seq_len: int | None = None,
                 generation: GenerationDefaults | None = None):
        """``tokenizer``: a Hugging Face tokenizer; None loads ``engines.tokenizer_dir`` on first use
        (ids-only use needs none). ``max_seq_len``: canvas limit (default: the model's).
        ``generation``: the model's decode defaults (``from_dir`` reads them from the engine directory)."""
        self.engines = engines
        self.spec = engines.spec
        self._tokenizer = tokenizer
        self.max_seq_len = max_seq_len or self.spec.max_seq_len
        self.generation = generation or GenerationDefaults()
        self.executor = Executor(engines)
        self.last_result: GenerationResult | None = None
        self.last_results: list[GenerationResult] = []
        self._warned: set[tuple] = set()      # the settings already warned about, each once

    # -- construction -------------------------------------------------------
    @classmethod
    def from_dir(cls, engine_dir: str | os.PathLike, backend: str = "onnxruntime", device: str = "cpu",
                 threads: int | None = None, **options) -> "Pipeline":
        """Open an engine directory (``dllm-export`` output) on ``backend`` and ``device``.

        threads: CPU threads of one generation (``dllm.threads``; None: the default, fine for small
        models). ``options`` go to ``dllm.engines.open_engine_dir``: ``verify_hashes=True`` hashes every
        file against the manifest (the default trusts the verified stamp for unchanged files), and
        backend settings such as ``intra_op_threads``."""
        try:
            from dllm.engines.loader import open_engine_dir
        except ImportError as e:   # pragma: no cover - the loader ships with the package
            raise ConfigError(f"engine directories need dllm.engines.loader, which failed to import ({e}); "
                              "use Pipeline.from_checkpoint meanwhile") from None
        from dllm.exporter.manifest import read_manifest

        engines = open_engine_dir(engine_dir, backend, device, threads=threads, **options)
        manifest = read_manifest(engine_dir)
        return cls(engines, max_seq_len=manifest.max_seq_len,
                   generation=GenerationDefaults.from_dict(manifest.generation))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, dtype: str = "fp32", device: str = "cpu",
                        with_vproj: bool = True, threads: int | None = None, cuda_graphs: bool = False
                        ) -> "Pipeline":
        """Torch engines straight from a Hugging Face checkpoint directory (no export needed); ``cuda_graphs``
        (CUDA only) replays captured graphs of steps and layers (``EngineSet.cuda_graphs``)."""
        from dllm.engines.engine_set import torch_engine_set
        from dllm.exporter.models.checkpoint import Checkpoint

        ckpt = Checkpoint(checkpoint_dir)
        return cls(torch_engine_set(ckpt, dtype, device, with_vproj=with_vproj, threads=threads,
                                    cuda_graphs=cuda_graphs),
                   generation=generation_defaults_from_checkpoint(checkpoint_dir))

    def default_config(self, **changes) -> DecodeConfig:
        """The model's generation defaults (gen length, block, steps) with ``changes`` applied:
        ``pipe.default_config(cache="dcu", commit="apd")``. Unknown keys raise ConfigError."""
        return DecodeConfig.from_dict({**self.generation.decode_values(), **changes})

    # -- tokenizer edge -----------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tdir = self.engines.tokenizer_dir
            if tdir is None or not Path(tdir).is_dir():
                raise ConfigError("text prompts need a tokenizer, and this engine set has none; pass "
                                  "Pipeline(engines, tokenizer=...) or prompt with token ids")
            self._tokenizer = load_tokenizer(tdir)
        return self._tokenizer

    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: ids pass through, text is tokenized (with ``chat``: as the user turn of the
        chat template), chat messages go through the tokenizer's chat template with
        ``add_generation_prompt=True``. Checked in ``dllm.runtime.prompts`` (one prompt, ids in the
        vocabulary, UTF-8 text; unknown characters warn)."""
        where = f"the tokenizer in {self.engines.tokenizer_dir}" if self._tokenizer is None else "the tokenizer"
        if isinstance(prompt, torch.Tensor):
            return check_ids(prompt, self.spec.vocab_size)
        if isinstance(prompt, str):
            return encode_text_as_chat(self.tokenizer, prompt, where) if chat else encode_text(self.tokenizer, prompt)
        if isinstance(prompt, dict):
            prompt = [prompt]
        if isinstance(prompt, (list, tuple)) and prompt:
            if all(isinstance(m, dict) for m in prompt):
                return encode_chat(self.tokenizer, prompt, where)
            if not any(isinstance(m, dict) for m in prompt):
                return check_ids(prompt, self.spec.vocab_size)
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise ConfigError("the prompt is empty; pass text, chat messages or at least one token id")
        raise ConfigError(f"a prompt is text, a list of token ids, a tensor of ids or a list of chat messages "
                          f"({{'role': ..., 'content': ...}}); got {type(prompt).__name__}")

    def decode_text(self, ids: Sequence[int]) -> str:
        """Text of generated ids, cut at the first EOS id."""
        eos = set(self.spec.eos_ids)
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        return self.tokenizer.decode(list(ids[:cut]), skip_special_tokens=True)

    def _wants_chat(self, chat: bool | None) -> bool:
        """Whether a text prompt goes through the chat template: as asked, else the model's generation
        default (on for instruct models) where the tokenizer still carries a template."""
        if chat is not None:
            return chat
        return self.generation.chat and bool(getattr(self.tokenizer, "chat_template", None))

    def _has_tokenizer(self) -> bool:
        return self._tokenizer is not None or (self.engines.tokenizer_dir is not None
                                               and Path(self.engines.tokenizer_dir).is_dir())

    # -- generation ---------------------------------------------------------
    def generate(self, prompt, config: DecodeConfig | None = None, *, chat: bool | None = None,
                 on_step: StepCallback | None = None, batch_size: int | None = None,
                 stop: Callable[[int], bool] | None = None,
                 on_result: Callable[[int, GenerationResult], None] | None = None):
        """Generate ``config.gen_length`` tokens after ``prompt`` (ids, text or chat messages).

        A list of prompts (texts, id lists, tensors or message lists) is a batch: it returns one
        GenerationResult per prompt, in order, each exactly what that prompt gives alone; up to
        ``batch_size`` of them (default all, at most the engines' ``--max-batch``) share every step,
        and a waiting prompt takes the slot of a finished one.
        config: None uses ``default_config()``. chat: wrap a text prompt as a user message in the chat
        template; None follows the model's generation defaults (on for instruct models).
        on_step(canvas, view, committed): called after every step with the canvas [1, N] (prompt +
            generation, still-masked positions hold the mask id), the step view and the positions
            committed in that step (a batch calls on_step(index, canvas, view, committed)); an exception
            it raises stops the generation between two steps and propagates (the whole batch).
        stop(index) -> True (a batch only) drops that prompt between two steps, or before it starts:
            its result is None and the other prompts go on unchanged (a server cancels one request of a
            batch this way).
        on_result(index, result) (a batch only): each prompt's GenerationResult as soon as it ends, before
            the rest of the batch (a server answers each request this way)."""
        results = None
        for event in self._run(prompt, config, chat, stream=False, on_step=on_step, batch_size=batch_size,
                               stop=stop, on_result=on_result):
            results = event
        return results

    def stream(self, prompt, config: DecodeConfig | None = None, *, chat: bool | None = None,
               on_step: StepCallback | None = None, batch_size: int | None = None,
               stop: Callable[[int], bool] | None = None,
               on_result: Callable[[int, GenerationResult], None] | None = None) -> Iterator:
        """Yield the generated text as it becomes final: each time the committed prefix of the
        generation (up to the first still-masked position, cut at EOS) grows, the new text is
        yielded, so ``"".join(stream)`` is the final text. ``self.last_result`` holds the result.
        A list of prompts streams ``(index, text)`` pairs, each sequence's deltas in order, and
        ``self.last_results`` holds the results. ``chat``, ``on_step``, ``batch_size``, ``stop`` and
        ``on_result`` as in ``generate``."""
        for event in self._run(prompt, config, chat, stream=True, on_step=on_step, batch_size=batch_size,
                               stop=stop, on_result=on_result):
            if not isinstance(event, (list, GenerationResult)):     # the last event is the result
                yield event

    def _check_settings(self, cfg: DecodeConfig) -> None:
        """Warn, once per setting, where a valid config decodes badly or wastes steps."""
        checks = {("gen_length", cfg.gen_length): lambda: self.generation.length_warning(cfg.gen_length),
                  ("steps", cfg.steps_per_block, cfg.block_length): lambda: _idle_steps_warning(cfg)}
        for key, message in checks.items():
            if key not in self._warned and (text := message()) is not None:
                self._warned.add(key)
                warnings.warn(text, GenerationWarning, stacklevel=4)

    def _run(self, prompt, config, chat, stream: bool, on_step=None, batch_size: int | None = None,
             stop=None, on_result=None) -> Iterator:
        """Yields text deltas (``stream``), then the result (one GenerationResult, or a list for a batch)."""
        cfg = self.default_config() if config is None else config
        if not isinstance(cfg, DecodeConfig):
            raise ConfigError(f"config must be a DecodeConfig, got {type(cfg).__name__}")
        self._check_settings(cfg)
        batch = is_prompt_batch(prompt)
        if not batch and batch_size is not None:
            raise ConfigError("batch_size applies to a list of prompts; pass [prompt, ...] or drop batch_size")
        if not batch and stop is not None:
            raise ConfigError("stop applies to a list of prompts; stop a single prompt by raising in on_step")
        if not batch and on_result is not None:
            raise ConfigError("on_result applies to a list of prompts; a single prompt's result is what "
                              "generate returns")
        prompts = list(prompt) if batch else [prompt]
        ids = []
        for i, p in enumerate(prompts):
            try:
                ids.append(self.encode(p, chat=isinstance(p, str) and self._wants_chat(chat)))
            except ConfigError as e:
                raise ConfigError(f"prompt {i}: {e}" if batch else str(e)) from None
        text_out = self._has_tokenizer()
        if stream and not text_out:
            raise ConfigError("stream() yields text and needs a tokenizer; use generate() for ids only")
        built: dict[int, GenerationResult] = {}

        def finished(i: int, res) -> None:
            built[i] = _generation_result(ids[i], res, self.decode_text(res.ids) if text_out else None)
            if on_result is not None:
                on_result(i, built[i])

        with torch_threads(self.engines.torch_threads):
            if batch:
                steps = decode_batch_steps(self.engines, ids, cfg, executor=self.executor, batch_size=batch_size,
                                           max_seq_len=self.max_seq_len, stop=stop, on_finish=finished)
            else:
                steps = _indexed(decode_steps(self.engines, ids[0], cfg, executor=self.executor,
                                              max_seq_len=self.max_seq_len))
            texts = [CommittedText(self.tokenizer, self.spec.mask_id, self.spec.eos_ids) if stream else None
                     for _ in ids]
            while True:
                try:
                    index, canvas, view, committed = next(steps)
                except StopIteration as stop:
                    decoded = stop.value
                    break
                if on_step is not None:
                    if batch:
                        on_step(index, canvas, view, committed)
                    else:
                        on_step(canvas, view, committed)
                if stream and committed:
                    delta = texts[index].advance(canvas[0, len(ids[index]):].tolist())
                    if delta:
                        yield (index, delta) if batch else delta
        decoded = decoded if batch else [decoded]
        results = []
        for i, (p, res) in enumerate(zip(ids, decoded)):
            if res is None:                   # dropped by stop()
                results.append(None)
                continue
            result = built[i] if i in built else _generation_result(p, res, self.decode_text(res.ids) if text_out
                                                                     else None)
            if stream and result.text is not None:
                delta = texts[i].rest(result.text)
                if delta:
                    yield (i, delta) if batch else delta
            results.append(result)
        self.last_results = results
        self.last_result = results[-1]          # None when stop() dropped the last prompt
        yield results if batch else results[0]


def _idle_steps_warning(cfg: DecodeConfig) -> str | None:
    """A block has ``block_length`` positions, so a schedule of more steps per block has steps that commit
    nothing: valid (the reference decoders run them too), but time spent for no token."""
    idle = cfg.steps_per_block - cfg.block_length
    if idle <= 0:
        return None
    return (f"--steps {cfg.steps} gives {cfg.steps_per_block} steps to each block of {cfg.block_length} positions, "
            f"so at least {idle} steps of every block commit nothing (the reference decoders run them too); "
            f"--steps {cfg.block_length * cfg.num_blocks} or fewer decodes in fewer steps")


def _indexed(steps):
    """A single decode's events as those of a batch of one: ``(0, canvas, view, committed)``."""
    while True:
        try:
            event = next(steps)
        except StopIteration as stop:
            return stop.value
        yield (0, *event)


def is_prompt_batch(prompt) -> bool:
    """Whether ``prompt`` is a list of prompts: a list whose items are texts, id lists, id tensors or
    message lists (a list of ints is one prompt of ids, a list of dicts one chat)."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return False
    return all(isinstance(p, (str, torch.Tensor)) or (isinstance(p, (list, tuple)) and not isinstance(p, str))
               for p in prompt)


def _generation_result(prompt_ids: list[int], result: DecodeResult, text: str | None) -> GenerationResult:
    return GenerationResult(
        ids=result.ids, text=text, prompt_ids=prompt_ids, steps=result.steps, nfe=result.nfe,
        rows_per_layer=result.mean_rows_per_layer, rows_per_step=result.rows_per_step,
        tokens_per_step=result.tokens_per_step, wall_s=result.wall_s, first_token_s=result.first_token_s,
        answer_tokens=result.answer_length, tokens_per_second=result.tokens_per_second,
        canvas_tokens_per_second=result.canvas_tokens_per_second, engine_s=result.engine_s, decode=result)
