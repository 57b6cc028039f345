"""Generation defaults: the canvas a model answers well with, carried from the checkpoint to the runtime.

``dllm-export`` reads them from the checkpoint (``generation_defaults_from_checkpoint``) and records
them in the engine directory's manifest under ``generation`` (docs/engine-dir.md); ``Pipeline`` and
the tools start from them whenever a flag or argument does not say otherwise. Where they come from:

1. ``generation_config.json``: ``gen_length`` or ``max_new_tokens``, ``block_length``, ``steps``,
   ``max_gen_length`` (Dream's release carries ``max_new_tokens`` and ``steps``);
2. else ``train_config.json`` (written by ``dllm-train-tiny``): the longest response canvas the model was
   trained on is both the generation length and the longest one it handles well, in one block (the
   model learned to denoise the whole response at once);
3. ``chat``: on when the tokenizer carries a chat template (an instruct model).

An engine directory without the ``generation`` entry (older exports) gets ``GenerationDefaults()``:
the runtime's own defaults (``DecodeConfig``), no chat template, no length warning.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dllm.errors import ConfigError

GENERATION_CONFIG = "generation_config.json"
TRAIN_CONFIG = "train_config.json"
_CANVAS_KEYS = ("gen_length", "block_length", "steps")


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Decode defaults of one model; None means "the runtime's default"."""
    gen_length: int | None = None
    block_length: int | None = None
    steps: int | None = None           # None: one token per step (steps = gen length)
    chat: bool = False                 # wrap text prompts in the tokenizer's chat template
    max_gen_length: int | None = None  # longest generation the model handles well; longer ones warn
    source: str = ""                   # the file they were read from

    def __post_init__(self):
        for name in _CANVAS_KEYS + ("max_gen_length",):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"generation defaults: {name} must be a positive integer or null, got {v!r}"
                                  f"{' (from ' + self.source + ')' if self.source else ''}")
        if not isinstance(self.chat, bool):
            raise ConfigError(f"generation defaults: chat must be true or false, got {self.chat!r}")

    def decode_values(self) -> dict:
        """The DecodeConfig fields these defaults set (gen_length, block_length, steps where known)."""
        values = {k: getattr(self, k) for k in _CANVAS_KEYS if getattr(self, k) is not None}
        gen = values.get("gen_length")
        if gen is not None and "block_length" not in values and gen % 32:
            values["block_length"] = gen         # the runtime's block (32) does not divide it: one block
        block = values.get("block_length", 32)
        if "steps" in values and (gen is None or gen % block or values["steps"] % (gen // block)):
            del values["steps"]                  # not a whole number of steps per block: one token per step
        return values

    def length_warning(self, gen_length: int) -> str | None:
        """A one-line warning when ``gen_length`` is beyond what the model handles well, else None."""
        if self.max_gen_length is None or gen_length <= self.max_gen_length:
            return None
        return (f"--gen-length {gen_length} is beyond the {self.max_gen_length} positions this model handles well "
                f"({self.source or 'its generation defaults'}); answers may degrade. Use "
                f"--gen-length {self.max_gen_length} or less")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "GenerationDefaults":
        """From a manifest's ``generation`` entry (missing or empty: no defaults); unknown keys are ignored
        so that newer writers stay readable."""
        if not d:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def has_chat_template(tokenizer_dir: Path) -> bool:
    """Whether the tokenizer files in ``tokenizer_dir`` carry a chat template."""
    if (tokenizer_dir / "chat_template.jinja").is_file() or (tokenizer_dir / "chat_template.json").is_file():
        return True
    config = _read_json(tokenizer_dir / "tokenizer_config.json") or {}
    return bool(config.get("chat_template"))


def _positive(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def generation_defaults_from_checkpoint(checkpoint: str | Path) -> GenerationDefaults:
    """The generation defaults of a checkpoint directory (see the module docstring for the sources)."""
    root = Path(checkpoint)
    chat = has_chat_template(root)
    gen = _read_json(root / GENERATION_CONFIG) or {}
    gen_length = _positive(gen.get("gen_length")) or _positive(gen.get("max_new_tokens"))
    if gen_length is not None:
        block = _positive(gen.get("block_length"))
        steps = _positive(gen.get("steps"))
        return GenerationDefaults(gen_length=gen_length, block_length=block if block and gen_length % block == 0
                                  else None, steps=steps, chat=chat,
                                  max_gen_length=_positive(gen.get("max_gen_length")), source=GENERATION_CONFIG)
    train = _read_json(root / TRAIN_CONFIG) or {}
    canvas = _positive(train.get("max_canvas"))
    if canvas is not None:
        return GenerationDefaults(gen_length=canvas, block_length=canvas, steps=canvas, chat=chat,
                                  max_gen_length=canvas, source=TRAIN_CONFIG)
    return GenerationDefaults(chat=chat, source="tokenizer files" if chat else "")
