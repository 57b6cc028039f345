"""TensorRT builds of every subgraph with the real profiles (TensorRT-RTX builds on CPU: a real parser and builder)."""

import pytest
import torch

from dllm.exporter.config import BuildConfig, ExportConfig, make_profiles
from dllm.exporter.export import export_checkpoint
from dllm.exporter.manifest import read_manifest
from dllm.exporter.models import Checkpoint, write_tiny_checkpoint
from dllm.exporter.onnx_export import export_subgraph
from dllm.exporter.subgraphs import declare

trt_build = pytest.importorskip("dllm.engines.trt_build")
try:
    TRT = trt_build.load_trt()
except Exception as e:  # noqa: BLE001 - skip by capability
    pytest.skip(f"no TensorRT module: {e}", allow_module_level=True)

pytestmark = pytest.mark.tensorrt
torch.set_num_threads(1)
MAX = 256


def test_profiles_derive_from_declarations():
    from dllm.exporter.models import tiny_spec

    decls = declare(tiny_spec("dream"), "fp16")
    cached, refresh = make_profiles(decls, MAX, opt_rows=16, max_batch=4)
    assert (cached.min["k"], cached.opt["k"], cached.max["k"]) == (1, 16, 64)
    assert cached.max["N"] == refresh.max["N"] == refresh.max["k"] == MAX
    for p in (cached, refresh):   # every profile takes batches 1..max_batch, tuned for batch 1
        assert (p.min["B"], p.opt["B"], p.max["B"]) == (1, 1, 4)
    layer = decls[1]
    shapes = trt_build.profile_shapes(layer, cached)
    assert shapes["h_rows"] == ((1, 1, 64), (1, 16, 64), (4, 64, 64))
    assert shapes["kv_len"] == ((1,), (1,), (4,))                    # one length per sequence
    _, _, Hkv, hd = layer.inputs[3].dims                          # k_cache [B, N, Hkv, hd]
    assert shapes["k_cache"][2] == (4, MAX, Hkv, hd)
    assert "N" not in make_profiles(decls[:1], MAX, 16)[0].max    # embed alone has no N
    assert make_profiles(decls, MAX, 16)[0].max["B"] == 8         # the default --max-batch


def test_device_tag_names_module_and_version():
    tag = trt_build.device_tag(TRT)
    assert TRT.version in tag and ("rtx" in tag if TRT.is_rtx else "trt" in tag)


@pytest.mark.parametrize("arch, dtype", [("llada", "bf16"), ("dream", "fp16")])
def test_every_subgraph_builds(arch, dtype, tmp_path):
    ckpt = Checkpoint(write_tiny_checkpoint(tmp_path / "ckpt", arch))
    decls = declare(ckpt.spec, dtype, with_vproj=True)
    # batches up to 16: the layers' kv_len [B] and every [B, ...] input take their batch range from the profiles
    build = BuildConfig(make_profiles(decls, MAX, opt_rows=16, max_batch=16), timing_cache=tmp_path / "timing.cache")
    builder = trt_build.PlanBuilder(build, TRT)
    for decl in decls:
        files, _ = export_subgraph(decl, ckpt, dtype, tmp_path / "onnx" / f"{decl.name}.onnx")
        result = builder.build(decl, files.model, tmp_path / "plans" / f"{decl.name}.plan")
        assert result.size > 0 and result.path.exists(), decl.name
    assert builder.save_timing_cache().exists()


def test_export_with_tensorrt_backend_records_plans(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "llada")
    cfg = ExportConfig(ckpt, tmp_path / "engines", backend="tensorrt", max_seq_len=128, validate=False,
                       with_vproj=False, max_batch=3)
    out = export_checkpoint(cfg)
    m = read_manifest(out)
    assert m.max_batch == 3 and {p.max["B"] for p in m.profiles} == {3}
    tag = trt_build.device_tag(TRT)
    assert list(m.plans) == [tag]
    assert set(m.plans[tag]) == {s.decl.name for s in m.subgraphs}
    for entry in m.plans[tag].values():
        assert (out / entry["file"]).stat().st_size > 0 and entry["build_s"] is not None
    assert m.build["tensorrt"][tag]["timing_cache"] == f"plans/{tag}/timing.cache"
    assert (out / m.build["tensorrt"][tag]["timing_cache"]).exists()
    events = []
    export_checkpoint(cfg, progress=events.append)                 # nothing changed: nothing rebuilt
    assert {e.status.value for e in events if e.status.value != "start"} == {"skipped"}
