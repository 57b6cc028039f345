"""Hugging Face repo ids as checkpoints, resolved offline from a cache laid out as huggingface_hub lays it out."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dllm.exporter.hub import looks_like_repo_id, resolve_checkpoint
from dllm.tools.assets import shipped_model_dir

REVISION = "3f1c0ffee0ddba11deadbeef0123456789abcdef"


def hub_cache(root: Path, repo_id: str, source: Path) -> Path:
    """``root/models--ORG--NAME``: blobs named by content hash, snapshots/<rev>/ of relative symlinks to them,
    refs/main naming the revision (huggingface_hub's cache layout)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REVISION
    for d in (repo / "blobs", repo / "refs", snap):
        d.mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    for f in sorted(source.iterdir()):
        if f.is_file() and not f.name.endswith(".py"):
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    hub_cache(root, "test-org/tiny-llada", shipped_model_dir())
    return root


def offline_env(cache: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    env.pop("HF_HOME", None)
    return env


def test_repo_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert looks_like_repo_id("GSAI-ML/LLaDA-8B-Instruct") and looks_like_repo_id("org/name@v1.0")
    assert not looks_like_repo_id("/models/LLaDA-8B-Instruct") and not looks_like_repo_id("./ckpt")
    assert not looks_like_repo_id("a/b/c") and not looks_like_repo_id("../x")
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)                # an existing relative path wins over a repo id
    assert resolve_checkpoint("org/name") == Path("org/name")


def test_export_from_a_repo_id_offline(cache, tmp_path):
    out = tmp_path / "engine"
    cmd = [sys.executable, "-m", "dllm.exporter.cli", "test-org/tiny-llada", "-o", str(out), "--no-validate",
           "--no-vproj"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(cache), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"].endswith(f"models--test-org--tiny-llada/snapshots/{REVISION}")
    assert manifest["generation"]["source"] == "train_config.json"
    assert (out / "tokenizer" / "tokenizer.json").is_file() and not (out / "tokenizer" / "tokenizer.json").is_symlink()


def test_missing_repo_offline_is_a_clean_error(cache, tmp_path):
    cmd = [sys.executable, "-m", "dllm.exporter.cli", "test-org/not-cached", "-o", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(cache), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not in the local cache" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
