"""dllm-demo end to end: export, load on ONNX Runtime CPU, answer with dcu+apd next to full."""

from __future__ import annotations

import pytest
import torch

from dllm.tools import demo

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from dllm.exporter.models.writer import write_tiny_checkpoint

    torch.set_num_threads(1)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llada", "llada", seed=5, n_layers=2,
                                 d_model=64, max_seq_len=256)


def test_demo_on_a_checkpoint_and_reuse(tiny_checkpoint, tmp_path, capsys):
    args = ["--checkpoint", str(tiny_checkpoint), "--engine-dir", str(tmp_path / "eng"), "--repeat", "1",
            "--gen-length", "32", "--block-length", "16"]
    assert demo.main(args) == 0
    out = capsys.readouterr()
    assert f"prompt: {demo.DEFAULT_PROMPT}" in out.out
    assert "full (reference)" in out.out and "dcu + apd" in out.out and "speedup of dcu+apd over full" in out.out
    assert "subgraphs exported, 0 reused" in out.err
    assert demo.main(args + ["--prompt", "Sort: 3 1 2"]) == 0          # second run reuses the export
    out = capsys.readouterr()
    assert "0 subgraphs exported" in out.err and "prompt: Sort: 3 1 2" in out.out


def test_demo_without_the_shipped_model_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "shipped_checkpoint", lambda: None)     # as in an install without the asset
    args = demo.build_parser().parse_args(["--engine-dir", str(tmp_path / "eng"), "--repeat", "1",
                                           "--gen-length", "16", "--block-length", "16"])
    messages = []
    answers = demo.run(args, log=messages.append)
    assert any("RANDOM checkpoint" in m for m in messages)
    assert set(answers) == {"full", "dcu+apd"}
    assert answers["full"].steps == 16 and answers["full"].latency_ms > 0 and answers["full"].tokens_per_s >= 0
    capsys.readouterr()


@pytest.mark.skipif(demo.shipped_checkpoint() is None, reason="the shipped model is not trained/committed yet")
def test_demo_on_the_shipped_model(tmp_path, capsys):
    args = demo.build_parser().parse_args(["--engine-dir", str(tmp_path / "eng"), "--repeat", "1"])
    answers = demo.run(args, log=lambda m: None)
    assert answers["full"].text.isdigit()           # an answer in the trained format (85 when right)
    assert answers["dcu+apd"].steps < answers["full"].steps
    capsys.readouterr()
