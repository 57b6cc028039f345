"""Pipeline: the user-facing edge. Prompts (ids, text or chat messages) in, ids and text out.

>>> pipe = Pipeline.from_dir("out/", backend="onnxruntime", device="cpu")
>>> res = pipe.generate([{"role": "user", "content": "Hi"}], DecodeConfig(cache="dcu", commit="apd"))
>>> res.text, res.tokens_per_second
>>> for delta in pipe.stream("Once upon a time", DecodeConfig(gen_length=64)):
...     print(delta, end="", flush=True)

The decode loop works on ids only; the tokenizer (and its chat template) lives here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from dllm.engines.engine_set import EngineSet
from dllm.errors import ConfigError
from dllm.runtime.config import DecodeConfig
from dllm.runtime.executor import Executor
from dllm.runtime.loop import DecodeResult, StepCallback, decode_steps


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
    wall_s: float
    tokens_per_second: float          # generated positions / wall time
    engine_s: float
    decode: DecodeResult              # the loop's full record (canvas, commit steps)

    def to_dict(self) -> dict:
        """JSON-ready summary (the CLI's --json)."""
        return {"ids": self.ids, "text": self.text, "prompt_ids": self.prompt_ids, "steps": self.steps,
                "nfe": self.nfe, "tokens_per_second": self.tokens_per_second, "wall_s": self.wall_s,
                "engine_s": self.engine_s, "rows_per_layer": self.rows_per_layer,
                "tokens_per_step": self.tokens_per_step}


Prompt = "str | Sequence[int] | torch.Tensor | Sequence[dict]"


class Pipeline:
    """An EngineSet plus a tokenizer: ``generate`` and ``stream`` for ids, text or chat messages."""

    def __init__(self, engines: EngineSet, tokenizer=None, *, max_seq_len: int | None = None):
        """``tokenizer``: a Hugging Face tokenizer; None loads ``engines.tokenizer_dir`` on first use
        (ids-only use needs none). ``max_seq_len``: canvas limit (default: the model's)."""
        self.engines = engines
        self.spec = engines.spec
        self._tokenizer = tokenizer
        self.max_seq_len = max_seq_len or self.spec.max_seq_len
        self.executor = Executor(engines)
        self.last_result: GenerationResult | None = None

    # -- construction -------------------------------------------------------
    @classmethod
    def from_dir(cls, engine_dir: str | os.PathLike, backend: str = "onnxruntime", device: str = "cpu",
                 **options) -> "Pipeline":
        """Open an engine directory (``dllm-export`` output) on ``backend`` and ``device``."""
        try:
            from dllm.engines.loader import open_engine_dir
        except ImportError as e:   # pragma: no cover - the loader ships with the package
            raise ConfigError(f"engine directories need dllm.engines.loader, which failed to import ({e}); "
                              "use Pipeline.from_checkpoint meanwhile") from None
        from dllm.exporter.manifest import read_manifest

        engines = open_engine_dir(engine_dir, backend, device, **options)
        return cls(engines, max_seq_len=read_manifest(engine_dir).max_seq_len)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, dtype: str = "fp32", device: str = "cpu",
                        with_vproj: bool = True) -> "Pipeline":
        """Torch engines straight from a Hugging Face checkpoint directory (no export needed)."""
        from dllm.engines.engine_set import torch_engine_set
        from dllm.exporter.models.checkpoint import Checkpoint

        ckpt = Checkpoint(checkpoint_dir)
        return cls(torch_engine_set(ckpt, dtype, device, with_vproj=with_vproj))

    # -- tokenizer edge -----------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tdir = self.engines.tokenizer_dir
            if tdir is None or not Path(tdir).is_dir():
                raise ConfigError("text prompts need a tokenizer, and this engine set has none; pass "
                                  "Pipeline(engines, tokenizer=...) or prompt with token ids")
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()   # config.json of an unknown model type warns; harmless here
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(tdir), local_files_only=True,
                                                                trust_remote_code=False)
            finally:
                hf_logging.set_verbosity(verbosity)
        return self._tokenizer

    def encode(self, prompt) -> list[int]:
        """Token ids of a prompt: ids pass through, text is tokenized, chat messages go through the
        tokenizer's chat template with ``add_generation_prompt=True``."""
        if isinstance(prompt, torch.Tensor):
            return [int(x) for x in prompt.reshape(-1).tolist()]
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, dict):
            prompt = [prompt]
        if isinstance(prompt, (list, tuple)):
            if all(isinstance(m, dict) for m in prompt) and prompt:
                for m in prompt:
                    if "role" not in m or "content" not in m:
                        raise ConfigError(f"chat messages need 'role' and 'content' keys, got {sorted(m)}")
                out = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
                if hasattr(out, "keys") and "input_ids" in out:    # newer transformers may return a dict
                    out = out["input_ids"]
                return [int(x) for x in out]
            if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
                return list(prompt)
        raise ConfigError(f"a prompt is text, a list of token ids, a tensor of ids or a list of chat messages "
                          f"({{'role': ..., 'content': ...}}); got {type(prompt).__name__}")

    def decode_text(self, ids: Sequence[int]) -> str:
        """Text of generated ids, cut at the first EOS id."""
        eos = set(self.spec.eos_ids)
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        return self.tokenizer.decode(list(ids[:cut]), skip_special_tokens=True)

    def _has_tokenizer(self) -> bool:
        return self._tokenizer is not None or (self.engines.tokenizer_dir is not None
                                               and Path(self.engines.tokenizer_dir).is_dir())

    # -- generation ---------------------------------------------------------
    def generate(self, prompt, config: DecodeConfig | None = None, *,
                 on_step: StepCallback | None = None) -> GenerationResult:
        """Generate ``config.gen_length`` tokens after ``prompt`` (ids, text or chat messages).

        on_step(canvas, view, committed): called after every step with the canvas [1, N] (prompt +
            generation, still-masked positions hold the mask id), the step view and the positions
            committed in that step; an exception it raises stops the generation between two steps
            and propagates (a server cancels a request this way)."""
        for _ in self._run(prompt, config, stream=False, on_step=on_step):
            pass
        return self.last_result

    def stream(self, prompt, config: DecodeConfig | None = None, *,
               on_step: StepCallback | None = None) -> Iterator[str]:
        """Yield the generated text as it becomes final: each time the committed prefix of the
        generation (up to the first still-masked position, cut at EOS) grows, the new text is
        yielded, so ``"".join(stream)`` is the final text. ``self.last_result`` holds the result.
        ``on_step`` as in ``generate``."""
        yield from self._run(prompt, config, stream=True, on_step=on_step)

    def _run(self, prompt, config, stream: bool, on_step: StepCallback | None = None) -> Iterator[str]:
        cfg = config or DecodeConfig()
        if not isinstance(cfg, DecodeConfig):
            raise ConfigError(f"config must be a DecodeConfig, got {type(cfg).__name__}")
        prompt_ids = self.encode(prompt)
        text_out = self._has_tokenizer()
        if stream and not text_out:
            raise ConfigError("stream() yields text and needs a tokenizer; use generate() for ids only")
        steps = decode_steps(self.engines, prompt_ids, cfg, executor=self.executor, max_seq_len=self.max_seq_len)
        P, mask, eos = len(prompt_ids), self.spec.mask_id, set(self.spec.eos_ids)
        emitted, done = "", False
        while True:
            try:
                canvas, view, committed = next(steps)
            except StopIteration as stop:
                result: DecodeResult = stop.value
                break
            if on_step is not None:
                on_step(canvas, view, committed)
            if stream and committed and not done:
                gen = canvas[0, P:].tolist()
                prefix = []
                for t in gen:
                    if t == mask:
                        break
                    if t in eos:
                        done = True
                        break
                    prefix.append(t)
                text = self.tokenizer.decode(prefix, skip_special_tokens=True)
                if len(text) > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted):]
                    emitted = text
        text = self.decode_text(result.ids) if text_out else None
        if stream and text is not None and text.startswith(emitted) and len(text) > len(emitted):
            yield text[len(emitted):]
        self.last_result = GenerationResult(
            ids=result.ids, text=text, prompt_ids=prompt_ids, steps=result.steps, nfe=result.nfe,
            rows_per_layer=result.mean_rows_per_layer, rows_per_step=result.rows_per_step,
            tokens_per_step=result.tokens_per_step, wall_s=result.wall_s,
            tokens_per_second=result.tokens_per_second, engine_s=result.engine_s, decode=result)
