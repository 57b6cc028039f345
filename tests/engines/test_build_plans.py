"""Plans built on the device from a copied engine directory (no checkpoint): python -m dllm.engines.build_plans."""

import shutil

import pytest
import torch

from dllm.errors import EngineDirError
from dllm.exporter.config import ExportConfig
from dllm.exporter.export import export_checkpoint
from dllm.exporter.manifest import read_manifest
from dllm.exporter.models import write_tiny_checkpoint

trt_build = pytest.importorskip("dllm.engines.trt_build")
try:
    TRT = trt_build.load_trt()
except Exception as e:  # noqa: BLE001 - skip by capability
    pytest.skip(f"no TensorRT module: {e}", allow_module_level=True)

pytestmark = pytest.mark.tensorrt
torch.set_num_threads(1)


def test_build_plans_from_the_onnx_files_alone(tmp_path, capsys):
    from dllm.engines.build_plans import main

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "llada", n_layers=1, d_model=32, n_heads=2, mlp_hidden=64)
    out = export_checkpoint(ExportConfig(ckpt, tmp_path / "host", max_seq_len=64, validate=False, with_vproj=False))
    copied = tmp_path / "device"
    shutil.copytree(out, copied)
    shutil.rmtree(ckpt)                                   # the device has no checkpoint
    assert main([str(copied)]) == 0
    tag = trt_build.device_tag(TRT)
    m = read_manifest(copied)
    assert set(m.plans[tag]) == {"embed", "layer_00", "head"}
    for entry in m.plans[tag].values():
        assert (copied / entry["file"]).stat().st_size > 0 and entry["build_s"] is not None
    assert m.build["tensorrt"][tag]["timing_cache"] == f"plans/{tag}/timing.cache"
    assert m.tools[TRT.name] == TRT.version and "--backend tensorrt" in capsys.readouterr().out
    assert not list(copied.rglob("*.partial"))
    # a file that is not the exported one is refused before anything is built
    data = copied / "onnx/layer_00.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\1")
    before = (copied / "manifest.json").read_text()
    assert main([str(copied)]) == 2
    assert "differs from its manifest sha256" in capsys.readouterr().err
    assert (copied / "manifest.json").read_text() == before
    with pytest.raises(EngineDirError):
        from dllm.engines.build_plans import build_plans
        build_plans(tmp_path / "nowhere")


def test_build_plans_keeps_a_schema_1_directory_schema_1(tmp_path):
    """Plans for a directory written before batching: its layer graphs without kv_len, batch-1 profiles, and a
    manifest that stays schema 1 (no max_batch), so older readers still read it."""
    import json

    from dllm.engines.build_plans import build_plans
    from tests.conftest import write_schema_1

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "llada", n_layers=1, d_model=32, n_heads=2, mlp_hidden=64)
    out = export_checkpoint(ExportConfig(ckpt, tmp_path / "new", max_seq_len=64, validate=False, with_vproj=False))
    old = write_schema_1(out, tmp_path / "old")
    tag = build_plans(old, log=lambda line: None)
    data = json.loads((old / "manifest.json").read_text())
    assert data["schema_version"] == 1 and "max_batch" not in data
    m = read_manifest(old)
    assert set(m.plans[tag]) == {"embed", "layer_00", "head"} and m.max_batch == 1
    assert all(p.max["B"] == 1 for p in m.profiles)
    assert [t.name for t in m.subgraph("layer_00").decl.inputs] == ["h_rows", "pos", "k_cache", "v_cache"]
