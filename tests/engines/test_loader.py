"""open_engine_dir on directories written by the real exporter, and its error messages."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from dllm.errors import BackendError, ConfigError, EngineDirError
from dllm.engines import Backend, EngineSet, available_backends, open_engine_dir
from dllm.exporter.manifest import MANIFEST
from tests.conftest import write_schema_1


def full_forward(engines: EngineSet, ids: torch.Tensor) -> torch.Tensor:
    """Every row recomputed through embed -> layers -> head (k = N): logits [B, N, V]."""
    spec = engines.spec
    B, N = ids.shape
    h = engines.embed.run({"ids": ids})["h"]                                  # [B, N, D]
    pos = torch.arange(N, dtype=torch.int32).expand(B, N).contiguous()        # [B, N]
    for i in range(spec.n_layers):
        # every row is overwritten by the scatter (fused torch layers write these caches in place)
        kc, vc = (torch.zeros(B, N, spec.n_kv_heads, spec.head_dim) for _ in range(2))
        o = engines.layer(i).run({"h_rows": h, "pos": pos, "kv_len": torch.full((B,), N, dtype=torch.int32),
                                  "k_cache": kc, "v_cache": vc})
        h = h + o["attn_rows"] + o["mlp_rows"]
    return engines.head.run({"h_rows": h})["logits"]


def edited_copy(src, dst, edit) -> object:
    """A copy of an engine directory with its manifest passed through ``edit(dict)``."""
    shutil.copytree(src, dst)
    path = dst / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_onnxruntime_and_torch_sets_agree(engine_dirs, arch):
    ort_set = open_engine_dir(engine_dirs[arch], "onnxruntime", "cpu", verify_hashes=True, intra_op_threads=1)
    torch_set = open_engine_dir(engine_dirs[arch], Backend.TORCH)
    assert ort_set.backend == Backend.ONNXRUNTIME and torch_set.backend == Backend.TORCH
    assert ort_set.spec == torch_set.spec and ort_set.spec.arch.value == arch
    assert set(ort_set.engines) == set(torch_set.engines) and ort_set.has_vproj
    assert ort_set.tokenizer_dir == engine_dirs[arch] / "tokenizer"
    assert (ort_set.tokenizer_dir / "tokenizer.json").exists()
    for n in (5, 17):
        ids = torch.randint(0, ort_set.spec.vocab_size, (1, n), generator=torch.Generator().manual_seed(n),
                            dtype=torch.int32)
        got, want = full_forward(ort_set, ids), full_forward(torch_set, ids)
        assert got.shape == (1, n, ort_set.spec.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_schema_version_mismatch(engine_dirs, tmp_path):
    path = edited_copy(engine_dirs["dream"], tmp_path / "old", lambda d: d.update(schema_version=99))
    with pytest.raises(EngineDirError, match=r"schema version 99, this toolkit reads versions 1 and 2; it was "
                                             r"written by a newer dllm-export: upgrade dllm-deploy"):
        open_engine_dir(path, "onnxruntime")


def test_engine_sets_carry_max_batch(engine_dirs):
    assert open_engine_dir(engine_dirs["dream"], "onnxruntime", intra_op_threads=1).max_batch == 8   # the default
    assert open_engine_dir(engine_dirs["dream"], "torch").max_batch == 8


@pytest.fixture(scope="module")
def schema_1_dir(shipped_engine_dir, tmp_path_factory):
    return write_schema_1(shipped_engine_dir, tmp_path_factory.mktemp("schema-1") / "tiny-llada")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_schema_1_directory_loads_and_decodes_as_before(shipped_engine_dir, schema_1_dir, backend):
    """A directory written before batching (layers without kv_len) still loads, verifies and serves batch 1: the
    runtime feeds kv_len only to layers that declare it, and it decodes exactly the tokens of a schema-2 export."""
    from dllm.exporter.manifest import read_manifest
    from dllm.runtime import Pipeline

    assert read_manifest(schema_1_dir).schema_version == 1
    engines = open_engine_dir(schema_1_dir, backend, verify_hashes=True, intra_op_threads=1)
    assert engines.max_batch == 1 and not engines.layer(0).decl.takes_kv_len
    if backend == "onnxruntime":
        assert [i.name for i in engines.layer(0).session.get_inputs()] == ["h_rows", "pos", "k_cache", "v_cache"]
    old = Pipeline.from_dir(schema_1_dir, backend, intra_op_threads=1)
    new = Pipeline.from_dir(shipped_engine_dir, backend, intra_op_threads=1)
    for cfg in (new.default_config(), new.default_config(cache="dcu", commit="apd")):
        want = new.generate("What is 12 + 30?", cfg)
        got = old.generate("What is 12 + 30?", cfg)
        assert got.ids == want.ids and got.text == want.text, cfg


def test_not_an_engine_dir_and_missing_onnx(engine_dirs, tmp_path):
    with pytest.raises(EngineDirError, match=r"not an engine directory \(no manifest.json\).*dllm-export"):
        open_engine_dir(tmp_path, "onnxruntime")
    path = tmp_path / "partial"
    shutil.copytree(engine_dirs["dream"], path)
    (path / "onnx" / "layer_01.onnx").unlink()
    with pytest.raises(EngineDirError, match=r"lacks files \['onnx/layer_01.onnx'\].*re-run dllm-export"):
        open_engine_dir(path, "onnxruntime")


def test_tampered_onnx_fails_hash_check(engine_dirs, tmp_path):
    path = tmp_path / "tampered"
    shutil.copytree(engine_dirs["dream"], path)
    with open(path / "onnx" / "head.onnx.data", "r+b") as f:
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(EngineDirError, match=r"\['onnx/head.onnx.data'\] differ from the sha256 .*changed after"):
        open_engine_dir(path, "onnxruntime", verify_hashes=True)


def test_missing_plan_for_this_device(engine_dirs):
    from dllm.engines.trt_backend import import_tensorrt

    try:
        import_tensorrt()
    except BackendError:
        pytest.skip("no TensorRT module here")
    from dllm.engines.trt_build import device_tag

    # The Dream directory was exported without plans.
    with pytest.raises(EngineDirError, match=rf"no TensorRT plans for this device \(tag '{device_tag()}'\); it has "
                                             r"plans for no device.*--backend tensorrt"):
        open_engine_dir(engine_dirs["dream"], "tensorrt", "cuda")
    llada = engine_dirs["llada"]
    present = sorted(json.loads((llada / MANIFEST).read_text())["plans"])
    assert present, "the LLaDA fixture directory should hold plans built by the exporter"
    with pytest.raises(EngineDirError, match=rf"tag 'h100-sm90-trt-10.3.0.30'\); it has plans for \['{present[0]}'\]"):
        open_engine_dir(llada, "tensorrt", "cuda", plan_tag="h100-sm90-trt-10.3.0.30")


def test_tensorrt_on_a_machine_without_gpu(engine_dirs):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from dllm.engines.trt_backend import import_tensorrt

    try:
        import_tensorrt()
    except BackendError:
        pytest.skip("no TensorRT module here")
    # The plans for this machine's tag exist (TensorRT-RTX builds on CPU); running them needs a GPU.
    with pytest.raises(BackendError, match=r"TensorRT engines need an NVIDIA GPU; use --backend onnxruntime"):
        open_engine_dir(engine_dirs["llada"], "tensorrt", "cpu")


def test_torch_backend_needs_the_checkpoint(engine_dirs, tiny_checkpoints, tmp_path):
    path = edited_copy(engine_dirs["llada"], tmp_path / "moved",
                       lambda d: d["source"].update(checkpoint=str(tmp_path / "gone")))
    with pytest.raises(EngineDirError, match=r"checkpoint .* was exported from \(.*gone, which is gone\); "
                                             r"re-export .* or pass checkpoint=PATH"):
        open_engine_dir(path, "torch")
    engines = open_engine_dir(path, "torch", checkpoint=tiny_checkpoints["llada"])
    assert engines.backend == Backend.TORCH
    with pytest.raises(EngineDirError, match="different model"):
        open_engine_dir(path, "torch", checkpoint=tiny_checkpoints["dream"])


def hide_modules(monkeypatch, *names):
    """Make ``import name`` raise ImportError, as on a machine without the package."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_backend_not_installed_says_how_to_install(engine_dirs, monkeypatch):
    hide_modules(monkeypatch, "onnxruntime", "tensorrt", "tensorrt_rtx_bindings")
    with pytest.raises(BackendError, match=r"onnxruntime package.*`pip install onnxruntime`.*onnxruntime-gpu"):
        open_engine_dir(engine_dirs["dream"], "onnxruntime")
    with pytest.raises(BackendError, match=r"pip install 'dllm-deploy\[tensorrt\]'.*tensorrt-rtx-cu13-bindings"):
        open_engine_dir(engine_dirs["dream"], "tensorrt", "cuda")
    status = available_backends()
    assert not status[Backend.ONNXRUNTIME].available and "pip install onnxruntime" in status[Backend.ONNXRUNTIME].detail
    assert not status[Backend.TENSORRT].available and "tensorrt" in status[Backend.TENSORRT].detail
    assert status[Backend.TORCH].available


def test_available_backends_describes_this_machine():
    status = available_backends()
    assert set(status) == set(Backend)
    assert status[Backend.ONNXRUNTIME].available and "cpu" in status[Backend.ONNXRUNTIME].devices
    trt = status[Backend.TENSORRT]
    assert trt.available == (trt.module is not None and torch.cuda.is_available())


def test_bad_arguments(engine_dirs):
    with pytest.raises(ConfigError, match=r"backend 'tensorflow' is not one of \['torch', 'onnxruntime', 'tensorrt'\]"):
        open_engine_dir(engine_dirs["dream"], "tensorflow")
    with pytest.raises(ConfigError, match=r"unknown onnxruntime options \['thread_count'\]"):
        open_engine_dir(engine_dirs["dream"], "onnxruntime", thread_count=2)
    with pytest.raises(ConfigError, match=r"--threads must be a positive integer"):
        open_engine_dir(engine_dirs["dream"], "onnxruntime", threads=0)
    with pytest.raises(ConfigError, match=r"disagree"):
        open_engine_dir(engine_dirs["dream"], "onnxruntime", threads=2, intra_op_threads=1)


def test_threads_reach_the_sessions_and_torch(engine_dirs):
    engines = open_engine_dir(engine_dirs["dream"], "onnxruntime", threads=2)
    assert engines.threads == 2 and engines.torch_threads == 1     # torch only orchestrates around ORT
    sess = engines.embed.session
    assert sess.get_session_options().intra_op_num_threads == 2
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert open_engine_dir(engine_dirs["dream"], "onnxruntime", intra_op_threads=3).threads == 3
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match=r"device 'cuda' asked for a CUDA device, but this torch .* sees none"):
            open_engine_dir(engine_dirs["dream"], "onnxruntime", "cuda")


def test_import_is_light():
    import subprocess

    code = ("import sys, dllm.engines; "
            "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'tensorrt_rtx_bindings', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
