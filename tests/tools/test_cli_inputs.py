"""dllm-bench, dllm-eval and dllm-train-tiny with hostile input: one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from dllm.tools import bench, eval as dllm_eval, train_tiny


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import export_checkpoint
    from dllm.exporter.models.writer import write_tiny_checkpoint

    torch.set_num_threads(1)
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llada", "llada", max_seq_len=128)
    return export_checkpoint(ExportConfig(ckpt, tmp_path_factory.mktemp("eng") / "llada", validate=False))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "empty.jsonl").write_text("\n\n")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01")
    (root / "number.jsonl").write_text(json.dumps({"question": "q", "answer": 7}) + "\n")
    (root / "list.jsonl").write_text("[1, 2]\n")
    (root / "shots.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    (root / "afile").write_text("x")
    (root / "full").mkdir()
    (root / "full" / "mine.txt").write_text("keep")
    return root


def one_line_error(capsys, prog: str, message: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ") and re.search(message, err), err


BENCH = [
    (["--json", "{files}"], r"--json .* is a directory; pass a file path inside it"),
    (["--json", "/sys/dllm-test/r.json"], r"--json /sys/dllm-test/r.json: cannot write in /sys"),
    (["--plot", "{files}/afile/p.png"], r"--plot .*/afile/p.png: .*/afile is a file, not a directory"),
    (["--device", "bogus"], r"--device 'bogus' is not a device"),
    (["--device", "cuda:x1"], r"--device 'cuda:x1' is not a device"),
    (["--tasks", "gsm8k"], r"--tasks 'gsm8k': task prompts come from \['arithmetic', 'sorting'\]"),
    (["--tau0", "1.5"], r"--tau0 \(tau0\) must be in \[0, 1\]"),
    (["--methods", "dcu+apd@tau0=7"], r"--tau0 \(tau0\) must be in \[0, 1\]"),
    (["--prompt-len", "0"], r"--prompt-len must be at least 1"),
    (["--layers", "2"], r"--layers and --dtype apply to --random-weights only"),
    (["--step-bucket-slack", "0.5"], r"--step-bucket-slack must be at least 1 .*got 0.5"),
    (["--step-bucket-slack", "nan"], r"--step-bucket-slack must be at least 1 .*got nan"),
    (["--step-bucket-slack", "inf", "--no-row-buckets"], r"drop it with --no-row-buckets"),
]


@pytest.mark.parametrize("argv, message", BENCH, ids=[b[1][:40] for b in BENCH])
def test_bench_hostile_input(engine_dir, files, capsys, argv, message):
    assert bench.main([str(engine_dir), *[a.format(files=files) for a in argv]]) == 2
    one_line_error(capsys, "dllm-bench", message)


@pytest.mark.parametrize("threads", ["-2", "0"])
def test_bench_threads_must_be_positive(engine_dir, capsys, threads):
    """--threads is a positive count (every tool parses it the same way), refused before anything loads."""
    with pytest.raises(SystemExit) as e:
        bench.main([str(engine_dir), "--threads", threads])
    assert e.value.code == 2
    one_line_error(capsys, "dllm-bench", rf"argument --threads: {threads} is not a positive integer")


def test_bench_plot_without_matplotlib(engine_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench.main([str(engine_dir), "--plot", str(tmp_path / "p.png")]) == 2
    one_line_error(capsys, "dllm-bench", r"--plot needs matplotlib, which is not installed; pip install "
                                         r"'dllm-deploy\[plot\]'")


EVAL = [
    (["--task", "gsm8k", "--data", "{files}"], r"GSM8K data .* is a directory; pass the JSONL file itself"),
    (["--task", "gsm8k", "--data", "{files}/nope.jsonl"], r"GSM8K data file .*nope.jsonl does not exist"),
    (["--task", "gsm8k", "--data", "{files}/empty.jsonl"], r"empty.jsonl has no problems \(it is empty\)"),
    (["--task", "gsm8k", "--data", "{files}/binary.jsonl"], r"binary.jsonl is not UTF-8 text"),
    (["--task", "gsm8k", "--data", "{files}/number.jsonl", "--fewshot", "0"], r"number.jsonl:1: 'answer' must be "
                                                                               r"a string, got int"),
    (["--task", "gsm8k", "--data", "{files}/list.jsonl"], r"list.jsonl:1 needs keys 'question' and 'answer'"),
    (["--task", "gsm8k", "--data", "{files}/shots.jsonl", "--fewshot", "1"], r"no problems left after the 1 "
                                                                              r"few-shot rows"),
    (["--task", "gsm8k", "--data", "{files}/shots.jsonl", "--fewshot", "-1"], r"--fewshot must be at least 0"),
    (["--task", "sorting", "--json", "{files}"], r"--json .* is a directory"),
    (["--task", "sorting", "--json", "/sys/dllm-test.json"], r"cannot write in /sys"),
    (["--task", "sorting", "--device", "cuda:abc"], r"--device 'cuda:abc' is not a device"),
    (["--task", "sorting", "--reference", "{files}/afile"], r"--reference .*afile is not a directory"),
    (["--task", "sorting", "--limit", "0"], r"--limit must be positive"),
    (["--task", "sorting", "--tau0", "-0.5"], r"--tau0 \(tau0\) must be in \[0, 1\]"),
]


@pytest.mark.parametrize("argv, message", EVAL, ids=[e[1][:40] for e in EVAL])
def test_eval_hostile_input(engine_dir, files, capsys, argv, message):
    assert dllm_eval.main([str(engine_dir), *[a.format(files=files) for a in argv]]) == 2
    one_line_error(capsys, "dllm-eval", message)


TRAIN = [
    (["--lr", "0"], r"TrainConfig.lr must be a finite number above 0, got 0.0"),
    (["--lr", "nan"], r"TrainConfig.lr must be a finite number above 0, got nan"),
    (["--warmup", "-1"], r"TrainConfig.warmup must be at least 0"),
    (["--time-limit", "-5"], r"TrainConfig.time_limit must be a finite number of at least 0"),
    (["--tight-frac", "nan"], r"tight_frac must be in \[0, 1\], got nan"),
    (["--sort-len", "three-five"], r"--sort-len 'three-five' is not a range of integers like 3-5"),
    (["--sort-len", "5-3"], r"need 2 <= sort_min_len \(5\) <= sort_max_len \(3\)"),
    (["--ops", "*"], r"GenConfig.ops must be a non-empty subset"),
    (["--heads", "0"], r"TrainConfig.heads must be positive"),
    (["--d-model", "30", "--heads", "4"], r"d_model \(30\) must be a multiple of heads \(4\)"),
]


@pytest.mark.parametrize("argv, message", TRAIN, ids=[t[1][:40] for t in TRAIN])
def test_train_hostile_flags(tmp_path, capsys, argv, message):
    assert train_tiny.main(["--out", str(tmp_path / "ckpt"), "--steps", "1", *argv]) == 2
    one_line_error(capsys, "dllm-train-tiny", message)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("out, message", [
    ("{files}/afile", r"--out .*afile is a file; pass a directory path"),
    ("{files}/full", r"--out .*full is not empty \(\['mine.txt'\]\).*nothing there is overwritten"),
    ("/sys/dllm-test/ckpt", r"--out /sys/dllm-test/ckpt: cannot write in /sys"),
])
def test_train_refuses_outputs_it_would_damage(files, capsys, out, message):
    assert train_tiny.main(["--out", out.format(files=files), "--steps", "1", "--eval-every", "0"]) == 2
    one_line_error(capsys, "dllm-train-tiny", message)
    assert (files / "full" / "mine.txt").read_text() == "keep" and (files / "afile").read_text() == "x"


def test_train_writes_into_an_empty_directory(tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    assert train_tiny.main(["--out", str(out), "--steps", "2", "--eval-every", "0", "--batch", "4", "--d-model", "32",
                            "--layers", "1", "--threads", "1"]) == 0
    assert (out / "config.json").is_file() and (out / "train_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]                 # no temp directory left beside it
