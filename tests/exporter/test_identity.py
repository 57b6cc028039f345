"""Checkpoint identity: the fingerprint and digest follow the tensors, not the files."""

import pytest

from dllm.errors import CheckpointError
from dllm.exporter.identity import checkpoint_fingerprint, checkpoint_identity, checkpoint_sha256
from dllm.exporter.models import write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"one": write_tiny_checkpoint(root / "one", "dream", seed=0),
            "sharded": write_tiny_checkpoint(root / "sharded", "dream", seed=0, shards=3),
            "other": write_tiny_checkpoint(root / "other", "dream", seed=1),
            "fp16": write_tiny_checkpoint(root / "fp16", "dream", seed=0, dtype=__import__("torch").float16)}


def test_same_weights_same_identity_however_sharded(ckpts):
    assert checkpoint_identity(ckpts["one"]) == checkpoint_identity(ckpts["sharded"])


@pytest.mark.parametrize("other", ["other", "fp16"])
def test_other_weights_other_identity(ckpts, other):
    assert checkpoint_fingerprint(ckpts["one"]) != checkpoint_fingerprint(ckpts[other])
    assert checkpoint_sha256(ckpts["one"]) != checkpoint_sha256(ckpts[other])


def test_truncated_and_missing_files_are_checkpoint_errors(ckpts, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpts["one"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match="truncated inside tensor"):
        checkpoint_sha256(broken)
    (broken / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="cannot read the safetensors header"):
        checkpoint_fingerprint(broken)
