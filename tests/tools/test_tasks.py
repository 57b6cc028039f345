"""Task generation, splits and answer extraction (pure Python, no model)."""

from __future__ import annotations

import json
import random

import pytest

from dllm.errors import ConfigError
from dllm.tools.tasks import (GenConfig, Split, Task, extract_answer, generate, is_correct, load_gsm8k,
                              sample_problem, split_of)


@pytest.mark.parametrize("task", ["arithmetic", "sorting"])
def test_generation_is_deterministic_and_checkable(task):
    a = generate(task, 50, seed=7)
    assert a == generate(task, 50, seed=7)
    assert a != generate(task, 50, seed=8)
    assert len({p.prompt for p in a}) == 50
    for p in a:
        assert is_correct(task, p.answer, p.answer)
        assert p.messages() == [{"role": "user", "content": p.prompt}]


def test_answers_are_right():
    for p in generate("arithmetic", 100, seed=1, cfg=GenConfig(ops=("+", "-"), max_operand=999)):
        a, op, b = p.prompt.removeprefix("What is ").rstrip("?").partition("+" if "+" in p.prompt else "-")
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    for p in generate("sorting", 100, seed=1):
        values = [int(x) for x in p.prompt.removeprefix("Sort: ").split()]
        assert p.answer == " ".join(map(str, sorted(values)))
        assert 3 <= len(values) <= 5


@pytest.mark.parametrize("task", ["arithmetic", "sorting"])
def test_train_and_test_splits_are_disjoint(task):
    rng = random.Random(0)
    train = {sample_problem(task, rng, Split.TRAIN).prompt for _ in range(3000)}
    test = {p.prompt for p in generate(task, 300, seed=0, split="test")}
    assert train and test and not train & test
    assert all(split_of(p) == Split.TEST for p in test)


def test_extraction_generated_tasks():
    assert extract_answer("arithmetic", " 118 \nmore") == "118"
    assert is_correct("sorting", "1  5 9\n", "1 5 9")
    assert not is_correct("sorting", "1 5 9 9", "1 5 9")
    assert not is_correct("arithmetic", "", "3")
    assert extract_answer("arithmetic", "   ") is None


def test_extraction_gsm8k():
    assert extract_answer("gsm8k", "so 3+4=7\n#### 1,234") == "1234"
    assert extract_answer("gsm8k", "#### 5\nthen #### 6.50") == "6.5"
    assert extract_answer("gsm8k", "She pays $12 and gets 3 back, so 9.") == "9"      # last number fallback
    assert extract_answer("gsm8k", "no number here") is None
    assert is_correct("gsm8k", "The answer is 72.", "72")
    assert not is_correct("gsm8k", "#### 71", "72")


def test_load_gsm8k_fewshot_chat(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"work {i}\n#### {i * 10}"} for i in range(6)]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    probs = load_gsm8k(path, fewshot=2)
    assert [p.answer for p in probs] == ["20", "30", "40", "50"]          # shots are not evaluated
    msgs = probs[0].messages()
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == "Question: Q0?\nAnswer:" and msgs[1]["content"].endswith("#### 0")
    assert msgs[-1]["content"] == "Question: Q2?\nAnswer:"


def test_bad_inputs_say_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    with pytest.raises(ConfigError, match="question"):
        load_gsm8k(bad, fewshot=0)
    with pytest.raises(ConfigError, match="does not exist"):
        load_gsm8k(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="ops"):
        GenConfig(ops=("*",))
    with pytest.raises(ConfigError, match="load_gsm8k"):
        generate(Task.GSM8K, 1, seed=0)
