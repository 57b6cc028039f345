"""dllm-export: flags to ExportConfig, summary, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest
import torch

from dllm.exporter.cli import main
from dllm.exporter.manifest import read_manifest
from dllm.exporter.models import write_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("dream") / "ckpt", "dream")


def test_export_prints_a_summary(ckpt, tmp_path, capsys):
    out = tmp_path / "engines"
    rc = main([str(ckpt), "-o", str(out), "--dtype", "fp16", "--max-seq-len", "48", "--opt-rows", "8",
               "--max-batch", "4"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "onnx/: 6 subgraphs" in stdout and "max_batch 4" in stdout
    assert "validation (ort-cpu): 6/6 subgraphs passed" in stdout
    m = read_manifest(out)
    assert m.dtype == "fp16" and m.max_seq_len == 48 and m.profiles[0].opt["k"] == 8
    assert m.max_batch == 4 and all(p.max["B"] == 4 for p in m.profiles)
    rc = main([str(ckpt), "-o", str(out), "--no-validate", "--no-vproj", "--max-seq-len", "48"])
    assert rc == 0 and "validation: skipped" in capsys.readouterr().out
    assert [s.decl.name for s in read_manifest(out).subgraphs] == ["embed", "layer_00", "layer_01", "head"]
    assert not (out / "onnx" / "vproj_00.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nothing"], "is not a directory"),
    (["{ckpt}", "--max-seq-len", "100000"], "beyond the model's limit"),
    (["{ckpt}", "--opt-rows", "0"], "--opt-rows (opt_rows) must be at least 1"),
    (["{ckpt}", "--max-batch", "0"], "--max-batch (max_batch) must be at least 1, got 0"),
])
def test_errors_are_one_line_with_exit_code_2(ckpt, tmp_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args] + ["-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("dllm-export: error:") and len(err.strip().splitlines()) == 1


def test_entry_point_installed(ckpt, tmp_path):
    proc = subprocess.run(["dllm-export", str(tmp_path / "nope"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True)
    if proc.returncode == 127:
        proc = subprocess.run([sys.executable, "-m", "dllm.exporter.cli", str(tmp_path / "nope"), "-o",
                               str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_reexport_says_what_it_reused_and_logs_plain_lines(ckpt, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main([str(ckpt), "-o", str(out), "--no-validate", "--max-seq-len", "48"]) == 0
    first = capsys.readouterr()
    assert "(6 exported, 0 reused unchanged)" in first.out
    # stderr is not a terminal here: one line per subgraph, no carriage returns
    assert "\r" not in first.err and "export: 1/6 embed done" in first.err and "export: 6/6" in first.err
    assert main([str(ckpt), "-o", str(out), "--no-validate", "--max-seq-len", "48"]) == 0
    second = capsys.readouterr()
    assert "(0 exported, 6 reused unchanged)" in second.out and "export: 6/6 vproj_01 skipped" in second.err


def test_help_choices_match_the_enums():
    from dllm.exporter import cli
    from dllm.exporter.config import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ_LEN, DEFAULT_OPT_ROWS, ExportBackend
    from dllm.exporter.subgraphs import DType

    assert set(cli.DTYPES) == {d.value for d in DType} and set(cli.BACKENDS) == {b.value for b in ExportBackend}
    assert (cli.DEFAULT_MAX_SEQ_LEN, cli.DEFAULT_OPT_ROWS, cli.DEFAULT_MAX_BATCH) == \
        (DEFAULT_MAX_SEQ_LEN, DEFAULT_OPT_ROWS, DEFAULT_MAX_BATCH)


def test_generation_defaults_are_recorded(tmp_path):
    """The shipped model's training config becomes the engine directory's generation defaults."""
    from dllm.tools.assets import shipped_model_dir

    out = tmp_path / "tiny"
    assert main([str(shipped_model_dir()), "-o", str(out), "--no-validate", "--no-vproj"]) == 0
    g = read_manifest(out).generation
    assert g == {"gen_length": 64, "block_length": 64, "steps": 64, "chat": True, "max_gen_length": 64,
                 "source": "train_config.json"}


def test_a_canvas_without_room_for_the_default_generation_warns_before_exporting(tmp_path, capsys):
    """--max-seq-len at or below the default gen length fits no prompt: said first, the export still runs."""
    from dllm.tools.assets import shipped_model_dir

    out = tmp_path / "short"
    assert main([str(shipped_model_dir()), "-o", str(out), "--no-validate", "--no-vproj", "--max-seq-len", "64"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("dllm-export: warning: --max-seq-len 64 leaves no room for a prompt before the default "
                          "generation of 64 tokens (train_config.json)")
    assert read_manifest(out).max_seq_len == 64
    assert main([str(shipped_model_dir()), "-o", str(tmp_path / "fits"), "--no-validate", "--no-vproj",
                 "--max-seq-len", "65"]) == 0
    assert "warning" not in capsys.readouterr().err
