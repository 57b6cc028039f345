"""export_checkpoint: engine directory layout, manifest, resumability, atomicity and bad inputs."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm.errors import CheckpointError, ConfigError, EngineDirError, ExportError
from dllm.exporter.config import ExportConfig
from dllm.exporter.engine_dir import files_sha256, partial_dir
from dllm.exporter.export import Stage, Status, export_checkpoint
from dllm.exporter.manifest import read_manifest
from dllm.exporter.models import write_tiny_checkpoint
from dllm.exporter.subgraphs import declare

torch.set_num_threads(1)
MAX = 64


def statuses(events, stage=Stage.EXPORT):
    return {e.name: e.status for e in events if e.stage == stage and e.status != Status.START}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("llada") / "ckpt", "llada", shards=2)


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    events = []
    out = export_checkpoint(ExportConfig(ckpt, tmp_path_factory.mktemp("out") / "engines", max_seq_len=MAX),
                            progress=events.append)
    return out, events


def test_layout_and_manifest(ckpt, exported):
    out, events = exported
    m = read_manifest(out)
    names = [d.name for d in declare(m.model, "fp32", with_vproj=True)]
    assert [s.decl.name for s in m.subgraphs] == names
    assert set(statuses(events).values()) == {Status.DONE}
    assert m.dtype == "fp32" and m.max_seq_len == MAX and m.plans == {}
    for s in m.subgraphs:
        onnx_path = out / s.onnx
        assert s.onnx == f"onnx/{s.decl.name}.onnx"
        assert files_sha256([onnx_path, onnx_path.with_name(onnx_path.name + ".data")]) == s.sha256
        assert len(s.input_hash) == 64
        validation = m.build["validation"][s.decl.name]
        assert validation["passed"] and set(validation["batches"]) == {"single", "batched"}
        assert s.decl.takes_kv_len == (s.decl.kind.value == "layer")
    assert m.schema_version == 2 and m.max_batch == 8                  # the default --max-batch
    assert [p.name for p in m.profiles] == ["cached", "refresh"]
    cached, refresh = m.profiles
    assert cached.max["k"] <= cached.max["N"] == refresh.max["k"] == refresh.max["N"] == MAX
    assert m.source["checkpoint"] == str(ckpt.absolute())
    assert m.source["config_sha256"] == files_sha256([ckpt / "config.json"])
    assert {"torch", "onnx", "onnxruntime", "dllm"} <= set(m.tools)
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert not partial_dir(out).exists() and not (out / ".state").exists()


def test_reexport_over_a_schema_1_directory_redoes_the_layers_only(exported, tmp_path):
    from tests.conftest import write_schema_1

    out = write_schema_1(exported[0], tmp_path / "engines")
    old = read_manifest(out)
    events = []
    export_checkpoint(ExportConfig(old.source["checkpoint"], out, max_seq_len=MAX), progress=events.append)
    m = read_manifest(out)
    assert m.schema_version == 2 and all(s.decl.takes_kv_len for s in m.subgraphs if s.decl.kind.value == "layer")
    # new layer graphs (those of a fresh export); the other files are reused, validated again at B > 1 too
    assert statuses(events) == {s.decl.name: Status.DONE for s in m.subgraphs}
    assert {s.decl.name for s in m.subgraphs if s.sha256 == old.subgraph(s.decl.name).sha256} == \
        {"embed", "head", "vproj_00", "vproj_01"}
    fresh = read_manifest(exported[0])
    assert all(s.sha256 == fresh.subgraph(s.decl.name).sha256 for s in m.subgraphs)
    assert all(set(v["batches"]) == {"single", "batched"} for v in m.build["validation"].values())


def test_rerun_skips_and_changed_weights_reexport(ckpt, exported, tmp_path):
    out, _ = exported
    events = []
    export_checkpoint(ExportConfig(ckpt, out, max_seq_len=MAX), progress=events.append)
    assert set(statuses(events).values()) == {Status.SKIPPED}

    # a copy of the checkpoint with layer 1's MLP changed: only layer_01 re-exports (vproj_01 reads attn only)
    changed = tmp_path / "changed"
    shutil.copytree(ckpt, changed)
    index = json.loads((changed / "model.safetensors.index.json").read_text())
    name = "model.transformer.blocks.1.ff_out.weight"
    shard = changed / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(shard), metadata={"format": "pt"})
    events = []
    export_checkpoint(ExportConfig(changed, out, max_seq_len=MAX), progress=events.append)
    done = {n for n, s in statuses(events).items() if s == Status.DONE}
    assert done == {"layer_01"}
    m = read_manifest(out)
    assert m.source["checkpoint"] == str(changed)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import Status, export_checkpoint
    done = []
    def progress(event):
        if event.status == Status.DONE:
            done.append(event.name)
            if len(done) == 2:
                os._exit(17)          # dies like a killed process: no cleanup, no finally blocks
    export_checkpoint(ExportConfig(sys.argv[1], sys.argv[2], max_seq_len=64, validate=False),
                      progress=progress)
""")


def test_interrupted_export_leaves_nothing_that_loads_and_resumes(ckpt, tmp_path):
    out = tmp_path / "engines"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(out)], capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    with pytest.raises(EngineDirError):
        read_manifest(out)
    assert partial_dir(out).exists()
    with pytest.raises(EngineDirError):
        read_manifest(partial_dir(out))
    events = []
    export_checkpoint(ExportConfig(ckpt, out, max_seq_len=64, validate=False), progress=events.append)
    st = statuses(events)
    assert [n for n, s in st.items() if s == Status.SKIPPED] == ["embed", "layer_00"]
    read_manifest(out)


def test_bad_inputs_have_clear_errors(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        export_checkpoint(ExportConfig(tmp_path / "empty", tmp_path / "o1"))
    with pytest.raises(CheckpointError, match="not a directory"):
        export_checkpoint(ExportConfig(tmp_path / "missing", tmp_path / "o1"))
    with pytest.raises(ConfigError, match="beyond the model's limit of 512"):
        export_checkpoint(ExportConfig(ckpt, tmp_path / "o2", max_seq_len=100_000))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_checkpoint(ExportConfig(ckpt, tmp_path / "afile" / "out", max_seq_len=MAX))
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an engine directory"):
        export_checkpoint(ExportConfig(ckpt, tmp_path / "precious", max_seq_len=MAX))
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="dtype 'int8' is not supported"):
        ExportConfig(ckpt, tmp_path / "o3", dtype="int8")
    with pytest.raises(ConfigError, match="backend 'tflite'"):
        ExportConfig(ckpt, tmp_path / "o3", backend="tflite")
    with pytest.raises(ConfigError, match="inside the checkpoint"):
        ExportConfig(ckpt, ckpt / "engines")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(ckpt, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ExportError, match="cannot write"):
        export_checkpoint(ExportConfig(ckpt, ro / "out", max_seq_len=MAX))


def test_truncated_checkpoint_is_a_checkpoint_error(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        export_checkpoint(ExportConfig(broken, tmp_path / "out", max_seq_len=MAX))
    assert not (tmp_path / "out").exists()


def test_unsupported_dtype_for_the_gpu():
    from dllm.engines.trt_build import check_dtype_supported

    check_dtype_supported("bf16", None)          # no GPU: nothing to check (TensorRT-RTX CPU build)
    check_dtype_supported("bf16", (8, 7))        # Jetson Orin
    with pytest.raises(ConfigError, match="compute capability 8.0"):
        check_dtype_supported("bf16", (7, 5))
