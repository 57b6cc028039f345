"""TensorRT backend: profile choice (pure), the no-GPU error, and real plans on a GPU (skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from dllm.errors import BackendError
from dllm.engines.trt_backend import NEED_GPU, TrtEngine, choose_profile, describe, import_tensorrt
from dllm.exporter.config import make_profiles
from dllm.exporter.models.writer import tiny_spec
from dllm.exporter.subgraphs import declare


def trt_or_skip():
    try:
        return import_tensorrt()
    except BackendError as e:
        pytest.skip(f"no TensorRT module: {e}")


def test_profile_choice_prefers_the_tightest_range():
    decls = declare(tiny_spec("llada"), "fp32")
    # cached k 1..64, refresh k 1..256, both B 1..4
    cached, refresh = make_profiles(decls, max_seq_len=256, opt_rows=16, max_batch=4)
    profiles = (refresh, cached)                                           # order in the plan must not matter
    assert choose_profile(profiles, {"B": 1, "k": 8, "N": 200}) == 1      # cached
    assert choose_profile(profiles, {"B": 1, "k": 64, "N": 64}) == 1      # still fits cached
    assert choose_profile(profiles, {"B": 1, "k": 200, "N": 200}) == 0    # refresh
    assert choose_profile(profiles, {"B": 1, "k": 8}) == 1                # embed/head: no N
    assert choose_profile(profiles, {"B": 1, "k": 8, "N": 300}) is None   # beyond max_seq_len
    assert choose_profile(profiles, {"B": 4, "k": 8, "N": 20}) == 1       # a full batch
    assert choose_profile(profiles, {"B": 5, "k": 8, "N": 20}) is None    # beyond max_batch
    assert "cached: B 1..4, k 1..64, N 1..256" in describe(profiles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_needs_a_gpu(tmp_path):
    decl = declare(tiny_spec("llada"), "fp32")[0]
    for device in ("cpu", "cuda"):
        with pytest.raises(BackendError, match=NEED_GPU):
            TrtEngine(decl, tmp_path / "embed.plan", device)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plans_match_torch_on_gpu(tiny_checkpoints, tmp_path):
    """Build plans for this GPU with the real exporter, run them through open_engine_dir, compare with torch."""
    from dllm.engines import open_engine_dir
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import export_checkpoint

    trt = trt_or_skip()
    out = export_checkpoint(ExportConfig(tiny_checkpoints["dream"], tmp_path / "dream", dtype="fp16", max_seq_len=64,
                                         opt_rows=8, max_rows=16, validate=False, backend="tensorrt"))
    if trt.__name__ == "tensorrt_rtx_bindings" and torch.cuda.get_device_capability() == (9, 0):
        with pytest.raises(BackendError, match="do not deserialize on compute capability 9.0"):
            open_engine_dir(out, "tensorrt", "cuda")
        return
    engines = open_engine_dir(out, "tensorrt", "cuda")
    reference = open_engine_dir(out, "torch", "cuda")
    for name, engine in engines.engines.items():
        # k <= 16 runs on the "cached" profile, larger k on "refresh".
        # B = 3: a batch of mixed sequence lengths (dummy_inputs), within the default --max-batch 8
        for sizes in ({"B": 1, "k": 3, "N": 40}, {"B": 1, "k": 40, "N": 40}, {"B": 1, "k": 64, "N": 64},
                      {"B": 3, "k": 3, "N": 40}, {"B": 3, "k": 40, "N": 40}):
            feeds = {k: v.cuda() for k, v in engine.decl.dummy_inputs(sizes, seed=2).items()}
            want = reference.engines[name].run(feeds)
            out_buffers = engine.allocate_outputs(sizes)
            got = engine.run(feeds, out_buffers)
            torch.cuda.synchronize()
            assert got is out_buffers
            for k, ref in want.items():
                err = (got[k].float() - ref.float()).abs().max().item()
                assert err <= 2e-2 * max(1.0, ref.float().abs().max().item()), f"{name}.{k} at {sizes}: {err}"
