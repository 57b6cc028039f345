"""dllm-eval on the shipped model: an exported ONNX engine directory, the torch backend and the reference."""

from __future__ import annotations

import json

import pytest
import torch

from dllm.tools import eval as dllm_eval
from dllm.tools.assets import shipped_model_dir

METHOD_KEYS = {"accuracy", "correct", "n", "mean_steps", "mean_nfe", "latency_ms_mean", "tokens_per_second",
               "canvas_tokens_per_second", "wall_s", "elapsed_s"}


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import export_checkpoint

    torch.set_num_threads(1)
    return export_checkpoint(ExportConfig(shipped_model_dir(), tmp_path_factory.mktemp("eng") / "tiny",
                                          validate=False))


def test_eval_methods_and_reference_write_json(engine_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = dllm_eval.main([str(engine_dir), "--task", "arithmetic", "--limit", "5", "--reference",
                         str(shipped_model_dir()), "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["full", "dual+threshold", "dcu", "dcu+apd", "reference"]
    for m, r in report["methods"].items():
        assert set(r) == METHOD_KEYS and r["n"] == 5 and r["tokens_per_second"] > 0, m
    assert report["decode"]["gen_length"] == 32 and report["n_problems"] == 5
    assert len(report["problems"]) == 5 and "full" in report["problems"][0]
    # full + schedule is the reference decoding: the same tokens, so the same answers
    assert [p["full"]["text"] for p in report["problems"]] == [p["reference"]["text"] for p in report["problems"]]
    assert report["methods"]["reference"]["accuracy"] >= 0.8
    assert "dcu+apd" in capsys.readouterr().out


def test_eval_in_batches_gives_the_same_answers(engine_dir, tmp_path, capsys):
    """--batch-size decodes problems together; every answer, and so the accuracy, is batch 1's."""
    reports = {}
    for batch in (1, 3):
        out = tmp_path / f"eval-{batch}.json"
        assert dllm_eval.main([str(engine_dir), "--task", "sorting", "--limit", "7", "--methods", "full,dcu+apd",
                               "--batch-size", str(batch), "--json", str(out)]) == 0
        reports[batch] = json.loads(out.read_text())
    one, three = reports[1], reports[3]
    assert three["batch_size"] == 3 and one["batch_size"] == 1
    for m in ("full", "dcu+apd"):
        assert [p[m] for p in three["problems"]] == [p[m] for p in one["problems"]]     # text, correct, steps
        assert three["methods"][m]["accuracy"] == one["methods"][m]["accuracy"]
    assert dllm_eval.main([str(engine_dir), "--task", "sorting", "--limit", "10", "--methods", "full",
                           "--batch-size", "9"]) == 2                        # the engines take 8 at once
    assert "--max-batch" in capsys.readouterr().err
    assert dllm_eval.main([str(engine_dir), "--task", "sorting", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_eval_checkpoint_with_torch_backend_and_gsm8k(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"})
                              for i in range(3)))
    out = tmp_path / "g.json"
    rc = dllm_eval.main([str(shipped_model_dir()), "--backend", "torch", "--task", "gsm8k", "--data", str(data),
                         "--fewshot", "1", "--methods", "full,reference", "--gen-length", "16", "--block-length",
                         "8", "--steps", "16", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["n_problems"] == 2 and set(report["methods"]) == {"full", "reference"}


def test_eval_reports_bad_usage(tmp_path, capsys):
    assert dllm_eval.main([str(shipped_model_dir()), "--task", "sorting", "--methods", "full"]) == 2
    assert "dllm-export" in capsys.readouterr().err
    assert dllm_eval.main([str(shipped_model_dir()), "--task", "gsm8k", "--methods", "reference"]) == 2
    assert "--data" in capsys.readouterr().err
