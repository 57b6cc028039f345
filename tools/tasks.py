"""Task families with checkable answers: generated ``arithmetic`` and ``sorting``, and local ``gsm8k``.

Generated problems are short natural prompts with chat-style answers (just the answer string)::

    arithmetic  "What is 73+45?"    -> "118"
    sorting     "Sort: 5 12 9 1"    -> "1 5 9 12"

Generation is seeded (``random.Random(seed)``), so the same call returns the same problems on every
machine. Train and test sets are disjoint by construction: each problem's canonical prompt is hashed
(SHA-256) into 100 buckets, and buckets below ``TEST_PERCENT`` belong to the test split only.
A "fresh" test set is simply the test split drawn with a new seed.

``gsm8k`` reads a local JSONL in the public GSM8K format (``{"question": ..., "answer": "... #### 72"}``)
and builds few-shot chat prompts as multi-turn messages; answers are extracted from ``#### n`` first,
otherwise from the last number of the text.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import random
import re
from pathlib import Path

from dllm.errors import ConfigError

TEST_PERCENT = 10          # share of hash buckets reserved for the test split
FEWSHOT_DEFAULT = 4        # GSM8K shots, as in the Dynamic-dLLM evaluation
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


class Task(str, enum.Enum):
    ARITHMETIC = "arithmetic"
    SORTING = "sorting"
    GSM8K = "gsm8k"


class Split(str, enum.Enum):
    TRAIN = "train"
    TEST = "test"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question with its reference answer.

    ``prompt`` is the final user turn; ``shots`` are earlier (user, assistant) turns for few-shot
    prompting. ``messages()`` gives the chat-template input.
    """
    task: Task
    prompt: str
    answer: str
    shots: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "task", Task(self.task))

    def messages(self) -> list[dict]:
        out = []
        for user, assistant in self.shots:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out + [{"role": "user", "content": self.prompt}]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer}


@dataclasses.dataclass(frozen=True)
class GenConfig:
    """Shape of the generated families (the defaults are what the shipped model was trained on)."""
    max_operand: int = 99            # arithmetic: operands in [0, max_operand] (two digits)
    ops: tuple[str, ...] = ("+",)    # arithmetic: "+" and/or "-" (subtraction keeps results >= 0)
    sort_min_len: int = 3            # sorting: list length range
    sort_max_len: int = 5
    sort_max_value: int = 99         # sorting: values in [0, sort_max_value]

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        if not self.ops or set(self.ops) - {"+", "-"}:
            raise ConfigError(f"GenConfig.ops must be a non-empty subset of ('+', '-'), got {self.ops}")
        if self.max_operand < 1 or self.sort_max_value < 1:
            raise ConfigError(f"GenConfig: max_operand ({self.max_operand}) and sort_max_value "
                              f"({self.sort_max_value}) must be >= 1")
        if not 2 <= self.sort_min_len <= self.sort_max_len:
            raise ConfigError(f"GenConfig: need 2 <= sort_min_len ({self.sort_min_len}) <= "
                              f"sort_max_len ({self.sort_max_len})")


# -- splits ---------------------------------------------------------------------------------------
def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, from a stable hash of its text."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100
    return Split.TEST if bucket < TEST_PERCENT else Split.TRAIN


# -- generated families ---------------------------------------------------------------------------
def make_arithmetic(rng: random.Random, cfg: GenConfig) -> Problem:
    """One addition (or subtraction) problem of operands up to ``cfg.max_operand``."""
    a, b = rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand)
    op = rng.choice(cfg.ops)
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b
    return Problem(Task.ARITHMETIC, f"What is {a}{op}{b}?", str(value))


def make_sorting(rng: random.Random, cfg: GenConfig) -> Problem:
    """One list of small numbers to sort ascending."""
    n = rng.randint(cfg.sort_min_len, cfg.sort_max_len)
    values = [rng.randint(0, cfg.sort_max_value) for _ in range(n)]
    return Problem(Task.SORTING, "Sort: " + " ".join(map(str, values)),
                   " ".join(map(str, sorted(values))))


_MAKERS = {Task.ARITHMETIC: make_arithmetic, Task.SORTING: make_sorting}


def sample_problem(task: Task | str, rng: random.Random, split: Split | str,
                   cfg: GenConfig = GenConfig()) -> Problem:
    """Draw problems of ``task`` from ``rng`` until one falls in ``split``."""
    task, split = Task(task), Split(split)
    if task not in _MAKERS:
        raise ConfigError(f"task {task.value!r} is not generated; generated tasks are "
                          f"{[t.value for t in _MAKERS]} (gsm8k reads a file: use load_gsm8k)")
    while True:
        p = _MAKERS[task](rng, cfg)
        if split_of(p.prompt) == split:
            return p


def generate(task: Task | str, n: int, *, seed: int, split: Split | str = Split.TEST,
             cfg: GenConfig = GenConfig(), unique: bool = True) -> list[Problem]:
    """``n`` seeded problems of a generated task from one split (distinct prompts if ``unique``)."""
    rng = random.Random(f"{Task(task).value}:{Split(split).value}:{seed}")
    out, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        p = sample_problem(task, rng, split, cfg)
        if unique and p.prompt in seen:
            continue
        seen.add(p.prompt)
        out.append(p)
    if len(out) < n:
        raise ConfigError(f"could only draw {len(out)} distinct {Task(task).value} problems of {n} "
                          "requested; ask for fewer or widen GenConfig")
    return out


# -- GSM8K -----------------------------------------------------------------------------------------
def gsm8k_question(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def load_gsm8k(path: str | os.PathLike, *, fewshot: int = FEWSHOT_DEFAULT,
               fewshot_path: str | os.PathLike | None = None) -> list[Problem]:
    """GSM8K problems from a local JSONL, each with ``fewshot`` solved examples as earlier chat turns.

    The shots come from ``fewshot_path`` if given, otherwise from the first ``fewshot`` rows of
    ``path``, which are then left out of the returned problems (so no problem sees its own answer).
    """
    if fewshot < 0:
        raise ConfigError(f"fewshot must be at least 0 (solved examples before each question), got {fewshot}")
    rows = _read_jsonl(Path(path))
    if fewshot_path is not None:
        shot_rows = _read_jsonl(Path(fewshot_path))[:fewshot]
    else:
        shot_rows, rows = rows[:fewshot], rows[fewshot:]
    if len(shot_rows) < fewshot:
        raise ConfigError(f"asked for {fewshot} GSM8K shots but only {len(shot_rows)} rows are available")
    shots = tuple((gsm8k_question(r["question"]), r["answer"].strip()) for r in shot_rows)
    out = []
    for r in rows:
        gold = extract_answer(Task.GSM8K, r["answer"])
        if gold is None:
            raise ConfigError(f"GSM8K answer has no final number: {r['answer'][-80:]!r}")
        out.append(Problem(Task.GSM8K, gsm8k_question(r["question"]), gold, shots))
    return out


def _read_jsonl(path: Path) -> list[dict]:
    fmt = '{"question": ..., "answer": "... #### n"} object per line'
    if path.is_dir():
        raise ConfigError(f"GSM8K data {path} is a directory; pass the JSONL file itself (one {fmt})")
    if not path.is_file():
        raise ConfigError(f"GSM8K data file {path} does not exist; pass a JSONL with one {fmt}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8 JSONL") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i} is not valid JSON ({e}); each line must be one {fmt}") from None
        if not isinstance(row, dict) or not {"question", "answer"} <= set(row):
            raise ConfigError(f"{path}:{i} needs keys 'question' and 'answer' (GSM8K format), "
                              f"got {sorted(row) if isinstance(row, dict) else type(row).__name__}")
        for key in ("question", "answer"):
            if not isinstance(row[key], str):
                raise ConfigError(f"{path}:{i}: {key!r} must be a string, got {type(row[key]).__name__} "
                                  f"{str(row[key])[:40]!r}; quote it in the JSONL")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path} has no problems (it is empty); pass a JSONL with one {fmt}")
    return rows


# -- answers --------------------------------------------------------------------------------------
def _normalize_number(s: str) -> str:
    s = s.replace(",", "").rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or "0"


def extract_answer(task: Task | str, text: str) -> str | None:
    """The answer a model's text commits to, or None if it has none.

    arithmetic/sorting: the first line, whitespace collapsed (the answer *is* the text).
    gsm8k: the number after the last ``####`` if present, else the last number in the text.
    """
    task = Task(task)
    if task == Task.GSM8K:
        marked = re.findall(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
        if marked:
            return _normalize_number(marked[-1])
        numbers = _NUMBER.findall(text)
        return _normalize_number(numbers[-1]) if numbers else None
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    line = " ".join(line.split())
    return line or None


def is_correct(task: Task | str, text: str, answer: str) -> bool:
    """Exact match of the extracted answer against the reference answer."""
    got = extract_answer(task, text)
    if got is None:
        return False
    if Task(task) == Task.GSM8K:
        return got == _normalize_number(answer.strip())
    return got == " ".join(answer.split())
