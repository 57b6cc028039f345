"""Every dllm-* command: one line and an exit code for every way it can end; DLLM_DEBUG adds the traceback."""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from dllm.cli_common import (EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, Parser, check_output_dir,
                             check_output_file, run_cli, write_text)
from dllm.errors import ConfigError, DllmWarning

# (command, module, the function its body calls that a test can make fail, argv that parses)
CLIS = [
    ("dllm-export", "dllm.exporter.export", "export_checkpoint", ["ckpt", "-o", "out"]),
    ("dllm-run", "dllm.runtime.cli", "run", ["dir", "--prompt-ids", "1"]),
    ("dllm-bench", "dllm.tools.bench", "bench", ["dir"]),
    ("dllm-eval", "dllm.tools.eval", "config_from_args", ["dir", "--task", "sorting"]),
    ("dllm-train-tiny", "dllm.tools.train_tiny", "train", ["--out", "x"]),
    ("dllm-demo", "dllm.tools.demo", "run", []),
]
MAINS = {"dllm-export": "dllm.exporter.cli", "dllm-run": "dllm.runtime.cli", "dllm-bench": "dllm.tools.bench",
         "dllm-eval": "dllm.tools.eval", "dllm-train-tiny": "dllm.tools.train_tiny", "dllm-demo": "dllm.tools.demo"}


def raiser(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("exc, code, needle", [
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted: stopped by Ctrl-C"),
    (ConfigError("--x must be 1; pass --x 1"), EXIT_BAD_INPUT, "error: --x must be 1; pass --x 1"),
    (ValueError("boom"), EXIT_FAILURE, "error: unexpected ValueError: boom; this is a bug"),
    (PermissionError(13, "Permission denied", "/root/x"), EXIT_FAILURE, "Permission denied (/root/x); check the path"),
    (MemoryError(), EXIT_FAILURE, "out of memory"),
])
@pytest.mark.parametrize("prog, module, func, argv", CLIS, ids=[c[0] for c in CLIS])
def test_every_command_ends_in_one_line(monkeypatch, capsys, prog, module, func, argv, exc, code, needle):
    monkeypatch.delenv("DLLM_DEBUG", raising=False)
    monkeypatch.setattr(importlib.import_module(module), func, raiser(exc))
    main = importlib.import_module(MAINS[prog]).main
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[-1] and err.startswith(f"{prog}: ") and needle in err, err


@pytest.mark.parametrize("prog, module, func, argv", CLIS, ids=[c[0] for c in CLIS])
def test_debug_flag_adds_the_traceback(monkeypatch, capsys, prog, module, func, argv):
    monkeypatch.setenv("DLLM_DEBUG", "1")
    monkeypatch.setattr(importlib.import_module(module), func, raiser(ConfigError("bad value")))
    assert importlib.import_module(MAINS[prog]).main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1] == f"{prog}: error: bad value"


@pytest.mark.parametrize("prog", list(MAINS))
def test_flag_errors_are_one_line(capsys, prog):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(MAINS[prog]).main(["--no-such-flag"])
    assert e.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"{prog}: error: ") and err.endswith(f"(see {prog} --help)")


def test_warnings_print_on_one_line(capsys):
    def body():
        warnings.warn("odd input\nreplaced", DllmWarning)
    assert run_cli("tool", body) == 0
    assert capsys.readouterr().err == "tool: warning: odd input replaced\n"


def test_parser_error_is_one_line(capsys):
    p = Parser(prog="tool")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit):
        p.parse_args(["--n", "x"])
    assert capsys.readouterr().err == "tool: error: argument --n: invalid int value: 'x' (see tool --help)\n"


def test_output_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"--json .* is a directory; pass a file path inside it"):
        check_output_file(tmp_path, "--json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--json .*/f/out.json: .*/f is a file, not a directory"):
        check_output_file(tmp_path / "f" / "out.json", "--json")
    with pytest.raises(ConfigError, match=r"--json /sys/dllm-test/out.json: cannot write in /sys"):
        check_output_file("/sys/dllm-test/out.json", "--json")   # read-only even for root
    assert check_output_file(tmp_path / "new" / "deep" / "r.json", "--json") == tmp_path / "new" / "deep" / "r.json"
    assert not (tmp_path / "new").exists()                      # checking creates nothing
    with pytest.raises(ConfigError, match=r"--out .*/f is a file; pass a directory path"):
        check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(ConfigError, match=r"could not write it"):
        write_text("/sys/dllm-test.json", "{}", "--json")
    path = write_text(tmp_path / "a" / "r.json", "{}", "--json")
    assert path.read_text() == "{}" and oct(path.stat().st_mode & 0o777) != "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]     # no temp file left


# -- real processes ---------------------------------------------------------------------------------
def command(name: str, module: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def test_real_process_debug_switch(tmp_path):
    argv = command("dllm-run", "dllm.runtime.cli") + [str(tmp_path / "missing"), "--prompt-ids", "1"]
    quiet = subprocess.run(argv, capture_output=True, text=True, env={**_env(), "DLLM_DEBUG": "0"})
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip() == f"dllm-run: error: {tmp_path / 'missing'} is not a directory; pass an engine " \
                                   "directory written by dllm-export"
    loud = subprocess.run(argv, capture_output=True, text=True, env={**_env(), "DLLM_DEBUG": "1"})
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def _env() -> dict:
    import os
    return {k: v for k, v in os.environ.items() if k != "DLLM_DEBUG"}


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT at its default, as under an interactive shell. A suite started in the
    background by a non-interactive shell (``cmd &``) hands its children SIGINT ignored, and Python then
    never raises KeyboardInterrupt, which is right for them and not what these tests are about."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_when(proc: subprocess.Popen, stream, marker: str, timeout: float = 180) -> tuple[int, str]:
    """Send SIGINT once ``marker`` appears on ``stream`` (stdout or stderr); return (exit code, stderr)."""
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = stream.readline()
        seen.append(line)
        if marker in line or not line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, ("".join(seen) if stream is proc.stderr else "") + err


def test_ctrl_c_in_training_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "ckpt"
    proc = subprocess.Popen(command("dllm-train-tiny", "dllm.tools.train_tiny") +
                            ["--out", str(out), "--steps", "100000", "--eval-every", "0", "--threads", "1",
                             "--batch", "8", "--d-model", "32", "--layers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_as_from_a_terminal)
    code, err = interrupt_when(proc, proc.stdout, "[train] step")
    assert code == EXIT_INTERRUPTED, err
    assert err.strip() == "dllm-train-tiny: interrupted: stopped by Ctrl-C"
    assert not out.exists() and list(tmp_path.iterdir()) == []          # nothing half-written


def test_ctrl_c_in_bench_is_one_line(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text('{"arch": "llada", "n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "head_dim": 16, '
                    '"mlp_hidden": 64, "vocab_size": 64, "max_seq_len": 4096, "rope_theta": 10000.0, '
                    '"norm_eps": 1e-5, "qkv_bias": false, "mask_id": 2, "eos_ids": [1], "logit_shift": false}')
    proc = subprocess.Popen(command("dllm-bench", "dllm.tools.bench") +
                            ["--random-weights", str(spec), "--backend", "torch", "--methods", "full",
                             "--repeat", "100000", "--num-prompts", "1", "--gen-length", "32", "--json",
                             str(tmp_path / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_as_from_a_terminal)
    code, err = interrupt_when(proc, proc.stderr, "[bench] 1 methods")     # logged just before decoding starts
    assert code == EXIT_INTERRUPTED, err
    last = err.strip().splitlines()[-1]
    assert last == "dllm-bench: interrupted: stopped by Ctrl-C" and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
