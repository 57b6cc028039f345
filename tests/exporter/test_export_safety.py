"""Export safety: an export replaces only what it owns, refuses overlaps with the checkpoint, holds a lock,
and a SIGKILL at any moment leaves the old directory or the new one (real subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dllm.errors import ConfigError, ExportError
from dllm.exporter.config import ExportConfig
from dllm.exporter.engine_dir import ExportLock, _clashes, lock_path
from dllm.exporter.export import export_checkpoint
from dllm.exporter.integrity import STAMP, check_consistency, onnx_checks, verify_files
from dllm.exporter.manifest import MANIFEST, read_manifest
from dllm.exporter.models import write_tiny_checkpoint

torch.set_num_threads(1)
OLD = dict(max_seq_len=64, validate=False, with_vproj=False)        # the directory a user already has
NEW = dict(max_seq_len=48, validate=False, with_vproj=False)        # a re-export: same files, new manifest


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llada", "llada")


@pytest.fixture(scope="module")
def old_export(ckpt, tmp_path_factory):
    return export_checkpoint(ExportConfig(ckpt, tmp_path_factory.mktemp("old") / "engines", **OLD))


USER_FILES = {"notes.txt": b"keep me", "results/bench.json": b'{"tokens_per_s": 1}',
              "onnx/README.txt": b"my notes on the graphs", ".hidden": b"dotfile"}


def user_target(old_export, tmp_path):
    """A copy of the old engine directory with a user's own files in it."""
    out = tmp_path / "engines"
    shutil.copytree(old_export, out, symlinks=True)
    for rel, data in USER_FILES.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    os.symlink("../elsewhere", out / "ckpt-link")
    (out / "empty-folder").mkdir()
    return out


def assert_user_files_intact(out):
    for rel, data in USER_FILES.items():
        assert (out / rel).read_bytes() == data, rel
    assert os.readlink(out / "ckpt-link") == "../elsewhere"
    assert (out / "empty-folder").is_dir()


def assert_loads(out) -> object:
    """The directory is a complete export: manifest consistent, every file matches its sha256."""
    m = read_manifest(out)
    check_consistency(out, m)
    verify_files(out, onnx_checks(m), full=True)
    return m


def assert_clean(out):
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], leftovers


# -- ownership --------------------------------------------------------------------------------------
def test_reexport_carries_over_what_it_does_not_own(old_export, ckpt, tmp_path):
    out = user_target(old_export, tmp_path)
    inode = os.stat(out / "notes.txt").st_ino
    export_checkpoint(ExportConfig(ckpt, out, **NEW))
    m = assert_loads(out)
    assert m.max_seq_len == 48
    assert_user_files_intact(out)
    assert os.stat(out / "notes.txt").st_ino == inode          # the same file, not a rewritten copy
    assert "notes.txt" not in m.files and "onnx/layer_00.onnx.data" in m.files
    assert (out / STAMP).is_file()
    assert_clean(out)


def test_first_release_manifest_and_unreadable_manifest_keep_user_files(old_export, ckpt, tmp_path):
    # a manifest without 'files' (written before files were recorded): owned = its subgraphs and tokenizer
    out = user_target(old_export, tmp_path / "v0")
    data = json.loads((out / MANIFEST).read_text())
    data.pop("files")
    (out / MANIFEST).write_text(json.dumps(data))
    export_checkpoint(ExportConfig(ckpt, out, **NEW))
    assert_user_files_intact(out)
    # a corrupt manifest: only paths an export could have written are replaced
    out = user_target(old_export, tmp_path / "corrupt")
    (out / MANIFEST).write_text("{")
    export_checkpoint(ExportConfig(ckpt, out, **NEW))
    assert_user_files_intact(out)
    assert_loads(out)


def test_a_user_file_where_the_export_writes_is_refused(old_export, ckpt, tmp_path):
    out = user_target(old_export, tmp_path)
    (out / "onnx" / "vproj_00.onnx").write_bytes(b"my own graph")          # the old export had no vproj
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(ExportError, match=r"would overwrite but did not write: \['onnx/vproj_00.onnx'\]"):
        export_checkpoint(ExportConfig(ckpt, out, max_seq_len=48, validate=False))
    assert (out / "onnx" / "vproj_00.onnx").read_bytes() == b"my own graph"
    assert (out / MANIFEST).read_bytes() == before
    assert_user_files_intact(out)


def test_clash_rules():
    new = {"onnx/layer_00.onnx", "plans/tag/layer_00.plan", MANIFEST}
    foreign = ["onnx/layer_00.onnx", "plans", "notes.txt", "onnx/README.txt", "plans/tag/layer_00.plan/"]
    assert _clashes(foreign, new) == ["onnx/layer_00.onnx", "plans", "plans/tag/layer_00.plan/"]


def test_a_non_engine_directory_is_refused_naming_its_files(ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    (out / "data.csv").write_text("y")
    with pytest.raises(ExportError, match=r"not empty \(\['data.csv', 'thesis.tex'\]\).*no manifest.json"):
        export_checkpoint(ExportConfig(ckpt, out, **NEW))
    assert sorted(p.name for p in out.iterdir()) == ["data.csv", "thesis.tex"]


def test_checkpoint_and_output_must_not_contain_each_other(ckpt, tmp_path):
    out = tmp_path / "out"
    inner = out / "ckpt"
    shutil.copytree(ckpt, inner)
    with pytest.raises(ConfigError, match="checkpoint .* is inside the output .* which an export replaces"):
        ExportConfig(inner, out)
    with pytest.raises(ConfigError, match="output .* is inside the checkpoint"):
        ExportConfig(ckpt, ckpt / "engines")
    with pytest.raises(ConfigError, match="inside the checkpoint"):
        ExportConfig(ckpt, ckpt)
    link = tmp_path / "link"                                          # the same, through a symbolic link
    os.symlink(out, link)
    with pytest.raises(ConfigError, match="inside the output"):
        ExportConfig(inner, link)
    assert (inner / "model.safetensors").is_file()


def test_an_output_that_is_a_symlink_is_refused(old_export, ckpt, tmp_path):
    target = user_target(old_export, tmp_path)
    link = tmp_path / "link"
    os.symlink(target, link)
    with pytest.raises(ExportError, match="is a symbolic link; pass the directory it points to"):
        export_checkpoint(ExportConfig(ckpt, link, **NEW))
    assert os.path.islink(link)


def test_an_interrupted_two_rename_swap_is_restored(old_export, ckpt, tmp_path):
    # where no atomic exchange exists the swap is two renames; a kill between them leaves .<out>.old
    out = user_target(old_export, tmp_path)
    os.rename(out, out.parent / f".{out.name}.old")
    export_checkpoint(ExportConfig(ckpt, out, **NEW))
    assert_user_files_intact(out)
    assert read_manifest(out).max_seq_len == 48
    assert_clean(out)


# -- the lock ---------------------------------------------------------------------------------------
def test_lock_refuses_a_second_export_and_is_removed(old_export, ckpt, tmp_path):
    out = user_target(old_export, tmp_path)
    with ExportLock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        with pytest.raises(ExportError, match=rf"another dllm-export \(pid {os.getpid()}\) is writing .*; wait"):
            export_checkpoint(ExportConfig(ckpt, out, **NEW))
    assert not lock_path(out).exists()
    export_checkpoint(ExportConfig(ckpt, out, **NEW))
    assert not lock_path(out).exists()


EXPORT_SCRIPT = textwrap.dedent("""
    import json, os, pathlib, signal, sys
    import torch
    torch.set_num_threads(1)
    from dllm.exporter import engine_dir
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import Status, export_checkpoint
    from dllm.exporter.manifest import Manifest

    ckpt, out, moment, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_after(owner, name):
        real = getattr(owner, name)
        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            die()
        setattr(owner, name, wrapped)

    if moment == "cleanup":                 # the third file removed from the old directory after the swap
        real_exchange = engine_dir._exchange
        def exchange(a, b):
            swapped = real_exchange(a, b)
            real_unlink, count = pathlib.Path.unlink, [0]
            def unlink(self, *args, **kwargs):
                real_unlink(self, *args, **kwargs)
                count[0] += 1
                if count[0] == 3:
                    die()
            pathlib.Path.unlink = unlink
            return swapped
        engine_dir._exchange = exchange
    elif moment == "manifest":
        kill_after(Manifest, "write")
    elif moment not in ("none", "subgraph"):
        kill_after(engine_dir, moment)

    def progress(event):
        print(event.stage.value, event.name, event.status.value, flush=True)
        if moment == "subgraph" and event.status == Status.DONE and event.index == 1:
            die()

    export_checkpoint(ExportConfig(ckpt, out, **options), progress=progress)
    print("finished", flush=True)
""")


def run_export(ckpt, out, moment, options, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "export.py"
    script.write_text(EXPORT_SCRIPT)
    return subprocess.run([sys.executable, str(script), str(ckpt), str(out), moment, json.dumps(options)],
                          capture_output=True, text=True, timeout=300)


def test_two_exports_at_once_one_refuses(old_export, ckpt, tmp_path):
    out = user_target(old_export, tmp_path)
    script = tmp_path / "export.py"
    script.write_text(EXPORT_SCRIPT)
    first = subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), "none",
                              json.dumps(dict(NEW, dtype="fp16"))], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().startswith("export")             # it holds the lock by now
        with pytest.raises(ExportError, match=rf"another dllm-export \(pid {first.pid}\) is writing"):
            export_checkpoint(ExportConfig(ckpt, out, **NEW))
    finally:
        rest = first.communicate(timeout=300)[0]
    assert first.returncode == 0 and "finished" in rest
    assert read_manifest(out).dtype == "fp16"
    assert_user_files_intact(out)
    export_checkpoint(ExportConfig(ckpt, out, **NEW))                  # the lock is free again
    assert read_manifest(out).dtype == "fp32"


# -- kills ------------------------------------------------------------------------------------------
# Each moment of an export that finishes work: during the subgraphs, and after each step of finalize.
MOMENTS = ["subgraph", "_carry_over", "manifest", "_exchange", "cleanup", "_remove_old"]


@pytest.mark.parametrize("moment", MOMENTS)
def test_sigkill_leaves_the_old_or_the_new_directory(old_export, ckpt, tmp_path, moment):
    out = user_target(old_export, tmp_path)
    old_manifest = (out / MANIFEST).read_bytes()
    options = dict(NEW, dtype="fp16") if moment == "subgraph" else NEW   # fp16: real export work to interrupt
    proc = run_export(ckpt, out, moment, options, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    m = assert_loads(out)
    state = "old" if (out / MANIFEST).read_bytes() == old_manifest else "new"
    if state == "new":
        assert (m.max_seq_len, m.dtype) == (options["max_seq_len"], options.get("dtype", "fp32"))
    expected = "old" if moment in ("subgraph", "_carry_over", "manifest") else "new"
    assert state == expected
    assert_user_files_intact(out)
    export_checkpoint(ExportConfig(ckpt, out, **options))              # resumes, and cleans up after the kill
    m = assert_loads(out)
    assert (m.max_seq_len, m.dtype) == (options["max_seq_len"], options.get("dtype", "fp32"))
    assert_user_files_intact(out)
    assert_clean(out)


@pytest.mark.parametrize("after_lines, delay", [(1, 0.0), (4, 0.1)])
def test_sigkill_at_arbitrary_moments(old_export, ckpt, tmp_path, after_lines, delay):
    out = user_target(old_export, tmp_path)
    old_manifest = (out / MANIFEST).read_bytes()
    script = tmp_path / "export.py"
    script.write_text(EXPORT_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), "none",
                             json.dumps(dict(NEW, dtype="fp16"))], stdout=subprocess.PIPE, text=True)
    for _ in range(after_lines):
        proc.stdout.readline()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    m = assert_loads(out)
    assert (out / MANIFEST).read_bytes() == old_manifest or m.dtype == "fp16"
    assert_user_files_intact(out)
    export_checkpoint(ExportConfig(ckpt, out, **dict(NEW, dtype="fp16")))
    assert_user_files_intact(out)
    assert_clean(out)


def test_ctrl_c_keeps_the_old_directory_and_the_work_done(old_export, ckpt, tmp_path):
    from pathlib import Path

    from dllm.exporter.engine_dir import partial_dir
    from dllm.exporter.export import Status

    out = user_target(old_export, tmp_path)
    old_manifest = (out / MANIFEST).read_bytes()
    script = Path(sys.executable).parent / "dllm-export"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "dllm.exporter.cli"]
    proc = subprocess.Popen(argv + [str(ckpt), "-o", str(out), "--dtype", "fp16", "--no-validate", "--no-vproj",
                                    "--max-seq-len", "48"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = partial_dir(out) / ".state" / "onnx"
    deadline = time.time() + 180
    while time.time() < deadline and not (state.is_dir() and any(state.iterdir())) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("dllm-export: interrupted: stopped by Ctrl-C; finished subgraphs are "
                                            "kept; run the same command again to resume")
    assert "Traceback" not in err
    assert (out / MANIFEST).read_bytes() == old_manifest and not lock_path(out).exists()
    assert_user_files_intact(out)
    events = []
    export_checkpoint(ExportConfig(ckpt, out, **dict(NEW, dtype="fp16")), progress=events.append)
    assert any(e.status == Status.SKIPPED for e in events)              # the work before Ctrl-C was kept
    assert_user_files_intact(out)
    assert_clean(out)


def test_a_failed_export_leaves_no_folders_behind(tmp_path):
    from dllm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a directory"):
        export_checkpoint(ExportConfig(tmp_path / "no-checkpoint", tmp_path / "a" / "b" / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
