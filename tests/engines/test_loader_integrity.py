"""open_engine_dir refuses damaged directories before any engine runs, on every backend, and the torch
backend refuses a checkpoint other than the one exported."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from dllm.errors import EngineDirError, IntegrityError
from dllm.engines import open_engine_dir
from dllm.exporter.manifest import MANIFEST


@pytest.fixture
def copy(engine_dirs, tmp_path):
    out = tmp_path / "dream"
    shutil.copytree(engine_dirs["dream"], out)
    return out


def flip(path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def test_a_flipped_byte_fails_the_default_load(copy):
    open_engine_dir(copy, "onnxruntime")                                # hashes the copy once, stamps it
    flip(copy / "onnx" / "layer_00.onnx.data", 4 * 123 + 3)
    with pytest.raises(IntegrityError, match=r"layer_00.onnx.data'\] differ from the sha256 .*re-run dllm-export"):
        open_engine_dir(copy, "onnxruntime")
    assert open_engine_dir(copy, "torch").backend.value == "torch"     # torch reads the checkpoint, not the onnx


def test_pipeline_refuses_before_any_token(copy):
    from dllm.runtime import DecodeConfig, Pipeline

    flip(copy / "onnx" / "head.onnx.data", 11, 0x01)
    cfg = DecodeConfig(gen_length=8, block_length=8, steps=8)
    with pytest.raises(IntegrityError):
        Pipeline.from_dir(copy, "onnxruntime", intra_op_threads=1).generate([5, 6], cfg)


def test_tampered_manifest_fails_on_every_backend(copy):
    data = json.loads((copy / MANIFEST).read_text())
    data["model"]["n_layers"] = 3
    (copy / MANIFEST).write_text(json.dumps(data))
    for backend in ("onnxruntime", "torch", "tensorrt"):
        with pytest.raises(EngineDirError, match="model.n_layers is 3 but the manifest lists 2 layer subgraphs"):
            open_engine_dir(copy, backend, "cuda" if backend == "tensorrt" else "cpu")


def _other_weights(src, dst, change):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_torch_backend_refuses_other_weights(engine_dirs, tiny_checkpoints, tmp_path):
    path = engine_dirs["llada"]
    ckpt = tiny_checkpoints["llada"]
    open_engine_dir(path, "torch", checkpoint=ckpt, verify_hashes=True)
    name = "model.transformer.blocks.1.ff_out.weight"
    finetuned = _other_weights(ckpt, tmp_path / "finetuned", lambda t: t.__setitem__(name, t[name] * 1.01))
    with pytest.raises(EngineDirError, match=r"holds other weights than the ones .* \(weights_fingerprint differs\); "
                                             r"pass the checkpoint it was exported from"):
        open_engine_dir(path, "torch", checkpoint=finetuned)

    def poke(t):          # one value outside the fingerprint's samples: only the full check sees it
        w = t[name].clone().view(-1)
        w[w.numel() // 4] += 1.0
        t[name] = w.view(t[name].shape)
    poked = _other_weights(ckpt, tmp_path / "poked", poke)
    open_engine_dir(path, "torch", checkpoint=poked)
    with pytest.raises(EngineDirError, match=r"weights_sha256 differs"):
        open_engine_dir(path, "torch", checkpoint=poked, verify_hashes=True)


def test_damaged_plan_is_caught_before_the_gpu_is_needed(engine_dirs, tmp_path):
    from dllm.engines.trt_build import device_tag

    try:
        tag = device_tag()
    except Exception:
        pytest.skip("no TensorRT module here")
    src = engine_dirs["llada"]
    if tag not in json.loads((src / MANIFEST).read_text())["plans"]:
        pytest.skip("the fixture directory has no plans for this machine")
    out = tmp_path / "llada"
    shutil.copytree(src, out)
    flip(out / "plans" / tag / "layer_01.plan", 4096)
    with pytest.raises(IntegrityError, match=rf"plans/{tag}/layer_01.plan'\] differ from the sha256"):
        open_engine_dir(out, "tensorrt", "cuda")
