"""dllm-bench --profile: kernel/operator categories, busy/idle arithmetic, and a real CPU profile."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dllm.tools import bench
from dllm.tools.step_profile import CATEGORY_ORDER, _union_us, classify_kernel, classify_op, summarize_events

# Kernel names as the torch profiler reports them on an H100 (torch 2.11, cu130) for a LLaDA step.
KERNELS = {
    "nvjet_tst_128x64_64x8_2x1_v_bz_TNN": "matmul",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(T1::Params)": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas":
        "matmul",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>":
        "attention",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
    "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)":
        "elementwise/reduction",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, "
    "float>, unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::MeanOps<float, float, float, "
    "float>, unsigned int, float, 4, 4>)": "elementwise/reduction",
    "void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<...> >(long, ...)": "copy/index",
    "void at::native::(anonymous namespace)::direct_copy_kernel_cuda(at::TensorIteratorBase&)": "copy/index",
    "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>(...)": "topk/sort",
    "Memcpy DtoD (Device -> Device)": "copy/index",
    "Memset (Device)": "copy/index",
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, "
    "true>(...)": "copy/index",
    "void some_custom_kernel(int)": "other",
}


@pytest.mark.parametrize("name,category", sorted(KERNELS.items()))
def test_kernel_categories(name, category):
    assert classify_kernel(name) == category


@pytest.mark.parametrize("name,category", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("aten::add_", "elementwise/reduction"), ("aten::mul", "elementwise/reduction"),
    ("aten::_softmax", "elementwise/reduction"), ("aten::index_select", "copy/index"),
    ("aten::index_copy_", "copy/index"), ("aten::copy_", "copy/index"), ("aten::topk", "topk/sort"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::empty", "other"),
    ("aten::matmul", "other"),     # a dispatcher wrapper: its own time is overhead, its mm is counted below it
])
def test_op_categories(name, category):
    assert classify_op(name) == category


def test_union_of_overlapping_intervals():
    assert _union_us([]) == 0
    assert _union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert _union_us([(20, 30), (0, 40)]) == 40


def _kernel(name, start, end):
    return SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CUDA,
                           time_range=SimpleNamespace(start=start, end=end), self_cpu_time_total=0.0)


def test_cuda_summary_counts_idle_time_between_kernels():
    # two steps, 10 ms of wall; kernels busy 2 + 3 + 1 ms (the flash kernel overlaps a gemm on another stream)
    cpu_op = SimpleNamespace(name="aten::mm", device_type=torch.autograd.DeviceType.CPU,
                             time_range=SimpleNamespace(start=0, end=9000), self_cpu_time_total=9000.0)
    events = [_kernel("nvjet_tst_gemm", 0, 2000), _kernel("flash_fwd_kernel", 1000, 2000),
              _kernel("vectorized_elementwise_kernel<add>", 3000, 6000), _kernel("Memcpy DtoD", 7000, 8000), cpu_op]
    out = summarize_events(events, steps=2, wall_s=0.010, cuda=True)
    assert out["device"] == "cuda"
    assert out["categories_ms_per_step"]["matmul"] == 1.0
    assert out["categories_ms_per_step"]["attention"] == 0.5
    assert out["categories_ms_per_step"]["elementwise/reduction"] == 1.5
    assert out["categories_ms_per_step"]["copy/index"] == 0.5
    assert out["busy_ms_per_step"] == 3.0                 # union: 2 + 3 + 1 ms over 2 steps
    assert out["device_idle_ms_per_step"] == 2.0          # 5 ms wall per step - 3 ms busy
    assert [t["name"] for t in out["top"]][0] == "vectorized_elementwise_kernel<add>"


def test_bench_profile_on_cpu(tmp_path, capsys):
    """A real profile of a small random model: categories add up to the operator time, matmuls dominate."""
    from dllm.exporter.models.writer import tiny_spec

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec("llada", n_layers=2, d_model=64, max_seq_len=256).to_dict()))
    out = tmp_path / "bench.json"
    assert bench.main(["--random-weights", str(spec), "--backend", "torch", "--methods", "full,dcu",
                       "--prompt-len", "32", "--gen-length", "16", "--block-length", "16", "--repeat", "1",
                       "--num-prompts", "1", "--threads", "1", "--profile", "--json", str(out)]) == 0
    assert "profile dcu:" in capsys.readouterr().err
    rep = json.loads(out.read_text())
    for name in ("full", "dcu"):
        prof = rep["methods"][name]["profile"]
        cats = prof["categories_ms_per_step"]
        assert list(cats) == list(CATEGORY_ORDER)
        assert prof["steps"] == 16
        assert cats["matmul"] > 0 and cats["copy/index"] > 0
        assert sum(cats.values()) == pytest.approx(prof["busy_ms_per_step"], abs=0.01)
        assert prof["wall_ms_per_step"] >= prof["busy_ms_per_step"]
        tops = [t["ms_per_step"] for t in prof["top"]]
        assert tops == sorted(tops, reverse=True) and len(tops) > 3


def test_fused_kernels_cut_the_operators_of_a_layer_step(tiny_model_engines_for_ops):
    """The CPU proxy for GPU launch cost: operators per layer step, plain torch path vs Triton kernels
    (Triton's interpreter on the CPU counts each kernel as one launch)."""
    counts = tiny_model_engines_for_ops
    for method in ("full", "dcu", "dcu+apd"):
        plain, triton = counts["plain"][method], counts["triton"][method]
        assert triton["per_layer_step"] < 0.5 * plain["per_layer_step"], (method, plain, triton)
        assert set(plain["by_region_per_step"]) == {"embed", "layer", "head", "commit", "other"}


@pytest.fixture(scope="module")
def tiny_model_engines_for_ops():
    from dllm.engines.engine_set import torch_engine_set
    from dllm.exporter.models import DiffusionLM, tiny_spec
    from dllm.exporter.models.writer import init_weights
    from dllm.kernels._triton import HAVE_TRITON
    from dllm.runtime import DecodeConfig, Pipeline, method_config
    from dllm.tools.step_profile import profile_decode

    if not HAVE_TRITON:
        pytest.skip("needs triton")
    model = init_weights(DiffusionLM(tiny_spec("llada", n_layers=2)), seed=0, std=0.5)
    base = DecodeConfig(gen_length=8, block_length=8, steps=8, budget=2, window=2, allocation="uniform")
    out = {}
    for kernels in ("plain", "triton"):
        pipe = Pipeline(torch_engine_set(model, "fp32", kernels=kernels))
        out[kernels] = {m: profile_decode(pipe, list(range(6, 14)), method_config(m, base))["ops"]
                        for m in ("full", "dcu", "dcu+apd")}
    return out


def test_a_profiled_batch_shows_what_each_added_sequence_costs(tmp_path, capsys):
    """dllm-bench --batch --profile: one profile per method and batch size. A batch picks each layer's DCU
    rows in one launch and decides its commits in one pass, so a layer step and the commit cost as many
    operators at batch 8 as at batch 4: neither grows with the batch."""
    from dllm.exporter.models.writer import tiny_spec

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec("llada", n_layers=3, d_model=64, max_seq_len=256).to_dict()))
    out = tmp_path / "bench.json"
    assert bench.main(["--random-weights", str(spec), "--backend", "torch", "--methods", "dcu@allocation=uniform",
                       "--prompt-len", "8", "--gen-length", "16", "--block-length", "16", "--repeat", "1",
                       "--warmup", "1", "--budget", "4", "--window", "4", "--num-prompts", "8", "--threads", "1",
                       "--batch", "1,4,8", "--profile", "--json", str(out)]) == 0
    assert "profile dcu@allocation=uniform at batch 8:" in capsys.readouterr().err
    by_size = json.loads(out.read_text())["batch"]["dcu@allocation=uniform"]
    prof = {b: by_size[b]["profile"] for b in ("1", "4", "8")}
    assert all(p["steps"] == 16 for p in prof.values())                 # one prompt length: in lockstep
    region = {b: p["ops"]["by_region_per_step"] for b, p in prof.items()}
    assert region["8"]["layer"] == region["4"]["layer"] > 0
    assert region["8"]["commit"] == region["4"]["commit"] > 0
