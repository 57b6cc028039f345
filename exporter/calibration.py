"""Calibration canvases: token ids shaped like what a diffusion LM sees while it decodes.

A canvas is a prompt followed by a partly masked answer region, as at a decode step: for chat
samples (task problems, JSONL prompts) the prompt is the chat-templated question and the answer
region holds the answer and EOS padding, each position masked with a per-canvas probability t in
[0.1, 1]; for plain text every position after the first is masked with probability t. All canvases of
a set have one length (shorter ones are padded with EOS, longer ones cut), since calibration stacks them.

Sources (``QuantConfig.calib``):
- ``tasks``: seeded problems of ``dllm.tools.tasks`` (arithmetic and sorting, train split), what the
  shipped model was trained on; the default for the shipped model.
- a text file: one sample per non-empty line.
- a JSONL file: one object per line with ``text``, or ``prompt`` / ``question`` (+ ``answer``,
  ``response`` or ``completion``), or ``messages`` (chat turns; a final assistant turn is the answer).

A few samples are held out (never used for calibration) to measure each subgraph's quantization error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

from dllm.errors import ConfigError
from dllm.exporter.quant_config import TASKS_SOURCE

GEN_LENGTH = 32        # answer region of a chat canvas (the shipped model's eval canvas)
MAX_TOKENS = 256       # longest canvas
HOLDOUT = 4            # samples held out for the error report (when the source has enough)
MIN_MASK, MAX_MASK = 0.1, 1.0


@dataclasses.dataclass(frozen=True)
class Sample:
    """One calibration sample before tokenization: chat (messages + answer) or plain text."""
    messages: tuple[tuple[str, str], ...] = ()    # (role, content) turns before the answer
    answer: str = ""
    text: str | None = None                        # plain text instead of a chat


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """Canvases [n][N] for calibration and for the error report, with where they came from."""
    calib: tuple[tuple[int, ...], ...]
    holdout: tuple[tuple[int, ...], ...]
    source: str                  # human-readable: "tasks (arithmetic + sorting, train split, seed 0)"
    holdout_is_calib: bool       # the source had too few samples to hold any out

    @property
    def length(self) -> int:
        return len(self.calib[0])

    @property
    def sha256(self) -> str:
        """Hash of the exact canvases (token ids) and the source: what the quantized weights depend on."""
        blob = json.dumps({"source": self.source, "calib": self.calib, "holdout": self.holdout})
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"source": self.source, "samples": len(self.calib), "canvas_length": self.length,
                "held_out": 0 if self.holdout_is_calib else len(self.holdout), "sha256": self.sha256}


def is_shipped_model(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is the shipped tiny model (its directory, or a copy with the same weights)."""
    from dllm.tools.assets import shipped_model_dir

    shipped = shipped_model_dir()
    if Path(checkpoint).resolve() == shipped.resolve():
        return True
    mine, theirs = Path(checkpoint) / "model.safetensors", shipped / "model.safetensors"
    if not mine.is_file() or mine.stat().st_size != theirs.stat().st_size:
        return False
    return _sha256(mine) == _sha256(theirs)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- samples ---------------------------------------------------------------------------------------
def task_samples(n: int, seed: int) -> list[Sample]:
    """``n`` distinct problems, alternating arithmetic and sorting, from the tasks' train split."""
    from dllm.tools.tasks import Split, Task, generate

    half = (n + 1) // 2
    per_task = [generate(task, count, seed=seed, split=Split.TRAIN)
                for task, count in ((Task.ARITHMETIC, half), (Task.SORTING, n - half))]
    out = []
    for i in range(half):
        out += [Sample((("user", p[i].prompt),), p[i].answer) for p in per_task if i < len(p)]
    return out[:n]


def file_samples(path: Path) -> list[Sample]:
    """Samples of a text file (one per non-empty line) or a JSONL file (.jsonl)."""
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError(f"calibration file {path} has no non-empty line; give at least one sample")
    if path.suffix.lower() != ".jsonl":
        return [Sample(text=line.strip()) for _, line in lines]
    return [_json_sample(path, i, line) for i, line in lines]


def _json_sample(path: Path, lineno: int, line: str) -> Sample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{lineno} is not valid JSON ({e}); one JSON object per line") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{path}:{lineno} is a {type(row).__name__}, expected a JSON object")
    answer = next((str(row[k]) for k in ("answer", "response", "completion") if k in row), "")
    if isinstance(row.get("text"), str):
        return Sample(text=row["text"])
    for key in ("prompt", "question"):
        if isinstance(row.get(key), str):
            return Sample((("user", row[key]),), answer)
    turns = row.get("messages")
    if isinstance(turns, list) and turns and all(isinstance(t, dict) and {"role", "content"} <= set(t) for t in turns):
        turns = [(str(t["role"]), str(t["content"])) for t in turns]
        if turns[-1][0] == "assistant" and len(turns) > 1:
            return Sample(tuple(turns[:-1]), turns[-1][1])
        return Sample(tuple(turns), answer)
    raise ConfigError(f"{path}:{lineno} needs a 'text', 'prompt', 'question' or 'messages' key "
                      f"(got {sorted(row)})")


# -- canvases --------------------------------------------------------------------------------------
def _tokens(sample: Sample, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids that stay visible, ids of the region that gets masked)."""
    if sample.text is not None:
        ids = tokenizer.encode(sample.text, add_special_tokens=True)
        return ids[:1], ids[1:]
    messages = [{"role": r, "content": c} for r, c in sample.messages]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    return prompt, tokenizer.encode(sample.answer, add_special_tokens=False) if sample.answer else []


def make_canvases(samples: list[Sample], tokenizer, mask_id: int, eos_id: int, max_len: int,
                  seed: int) -> list[tuple[int, ...]]:
    """One canvas per sample, all of one length (at most ``max_len``), answer regions partly masked."""
    rng = random.Random(seed)
    parts = [_tokens(s, tokenizer) for s in samples]
    gen = max(GEN_LENGTH, max(len(a) for _, a in parts))
    length = min(max_len, max(len(p) for p, _ in parts) + gen)
    out = []
    for prompt, answer in parts:
        prompt = prompt[:length]
        region = (answer + [eos_id] * length)[:length - len(prompt)]
        t = rng.uniform(MIN_MASK, MAX_MASK)
        masked = [mask_id if rng.random() < t else tok for tok in region]
        if region and mask_id not in masked:
            masked[rng.randrange(len(masked))] = mask_id
        out.append(tuple(prompt + masked))
    return out


def load_calibration(source: str, tokenizer, spec, max_seq_len: int, samples: int, seed: int = 0) -> CalibrationSet:
    """The calibration set of ``source`` (``tasks`` or a file path) for a model and its tokenizer."""
    if source == TASKS_SOURCE:
        drawn = task_samples(samples + HOLDOUT, seed)
        desc = f"tasks (arithmetic + sorting, train split, seed {seed})"
        calib, held = drawn[:samples], drawn[samples:]
    else:
        path = Path(source)
        drawn = file_samples(path)
        desc = f"file {path.name} (sha256 {_sha256(path)[:16]})"
        n_held = min(HOLDOUT, len(drawn) // 5)
        calib, held = drawn[:len(drawn) - n_held][:samples], drawn[len(drawn) - n_held:]
    holdout_is_calib = not held
    canvases = make_canvases(calib + (held or calib), tokenizer, spec.mask_id, spec.eos_ids[0],
                             min(MAX_TOKENS, max_seq_len), seed)
    return CalibrationSet(tuple(canvases[:len(calib)]), tuple(canvases[len(calib):]), desc, holdout_is_calib)
