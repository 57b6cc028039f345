"""ONNX Runtime backend against the torch backend, on real exported subgraphs of tiny LLaDA and Dream models.

Sizes differ from the export sizes on purpose (the ONNX files are traced at B=2, k=3, N=7).
"""

from __future__ import annotations

import pytest
import torch

from dllm.errors import BackendError, ConfigError, EngineDirError
from dllm.engines.ort_backend import OrtEngine, OrtOptions
from dllm.engines.torch_backend import TorchEngine
from dllm.exporter.subgraphs import Kind

SIZES = ({"B": 1, "k": 1, "N": 5}, {"B": 1, "k": 9, "N": 9}, {"B": 2, "k": 4, "N": 33})
# Relative to the largest reference magnitude of each output: fp16 accumulation order differs between backends.
RTOL = {"fp32": 2e-5, "fp16": 1e-2, "bf16": 4e-2}
OPTS = OrtOptions(intra_op_threads=1)


def assert_close(got: dict, want: dict, dtype: str, what: str) -> None:
    failures = []
    for name, ref in want.items():
        ref = ref.float()
        err = (got[name].float() - ref).abs().max().item()
        tol = RTOL[dtype] * max(1.0, ref.abs().max().item())
        if not err <= tol:
            failures.append(f"{name}: max error {err:.3g} > tolerance {tol:.3g}")
    assert not failures, f"{what}: " + "; ".join(failures)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_every_subgraph_matches_torch(onnx_subgraphs, arch, dtype):
    subgraphs = onnx_subgraphs(arch, dtype)
    assert {d.kind for d, _, _ in subgraphs.values()} == set(Kind)
    for name, (decl, path, module) in subgraphs.items():
        ort_engine = OrtEngine(decl, path, "cpu", OPTS)
        torch_engine = TorchEngine(decl, module)
        for sizes in SIZES:
            feeds = decl.dummy_inputs(sizes, seed=sizes["N"])
            want = torch_engine.run(feeds)
            got = ort_engine.run(feeds)
            assert all(got[t.name].dtype == t.torch_dtype for t in decl.outputs)
            assert_close(got, want, dtype, f"{arch} {dtype} {name} at {sizes}")
            out = ort_engine.allocate_outputs(sizes)
            for t in out.values():
                t.fill_(float("nan"))
            result = ort_engine.run(feeds, out)
            assert result is out
            ptrs = {k: v.data_ptr() for k, v in out.items()}
            assert {k: v.data_ptr() for k, v in result.items()} == ptrs     # written in place
            assert_close(out, want, dtype, f"{arch} {dtype} {name} at {sizes} into preallocated outputs")


def padded_batch(decl, lengths: list[int], n: int, k: int | None, seed: int) -> dict:
    """Layer feeds for sequences of ``lengths`` right-padded to one canvas of n rows: k real rows per sequence
    recomputed (None: every row, k = n, as in a full recompute); cache rows in the padding hold noise, which
    the layer must never read."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    sizes = {"B": B, "k": n if k is None else k, "N": n}
    feeds = {t.name: torch.randn(t.shape(sizes), generator=g) for t in decl.inputs if t.dtype != "int32"}
    if k is None:
        pos = torch.arange(n).expand(B, n)
    else:
        pos = torch.stack([torch.randperm(m, generator=g)[:k].sort().values for m in lengths])
    feeds.update(pos=pos.to(torch.int32).contiguous(), kv_len=torch.tensor(lengths, dtype=torch.int32))
    return feeds


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("k", [5, None])
def test_layers_in_a_batch_of_mixed_lengths(onnx_subgraphs, arch, dtype, k):
    """Three sequences of different lengths in one batch: ONNX Runtime matches torch, and each sequence's real
    rows come out as they do for that sequence alone at batch 1, unpadded (the padding is invisible)."""
    decl, path, module = onnx_subgraphs(arch, dtype)["layer_01"]
    engine, ref = OrtEngine(decl, path, "cpu", OPTS), TorchEngine(decl, module)
    lengths, n = [24, 17, 11], 24
    feeds = padded_batch(decl, lengths, n, k, seed=11)
    feeds = {name: x.to(torch.float16) if dtype == "fp16" and x.is_floating_point() else x
             for name, x in feeds.items()}
    got = engine.run(feeds)
    assert_close(got, ref.run(feeds), dtype, f"{arch} {dtype} lengths {lengths}, k {k}")
    for b, m in enumerate(lengths):
        real = slice(None) if k is not None else slice(0, m)           # k = N: the padding rows are junk
        alone = engine.run({"h_rows": feeds["h_rows"][b:b + 1, real], "pos": feeds["pos"][b:b + 1, real],
                            "kv_len": torch.tensor([m], dtype=torch.int32),
                            "k_cache": feeds["k_cache"][b:b + 1, :m], "v_cache": feeds["v_cache"][b:b + 1, :m]})
        assert_close({name: got[name][b:b + 1, real] for name in alone}, alone, dtype,
                     f"{arch} {dtype} sequence {b} (length {m}, k {k}) against itself alone")


def test_strided_feeds_and_repeated_calls(onnx_subgraphs):
    decl, path, module = onnx_subgraphs("dream", "fp32")["layer_01"]
    engine, ref = OrtEngine(decl, path, "cpu", OPTS), TorchEngine(decl, module)
    sizes = {"B": 1, "k": 3, "N": 12}
    feeds = decl.dummy_inputs(sizes, seed=3)
    # A cache that is a strided view of a bigger buffer (as a runtime may hold it).
    big = torch.randn(1, 2, 2, 12, 16)                         # [B, 2, Hkv, N, hd]
    feeds["k_cache"] = big[:, 0].transpose(1, 2)              # [B, N, Hkv, hd], not contiguous
    assert not feeds["k_cache"].is_contiguous()
    want = ref.run(feeds)
    for _ in range(3):
        assert_close(engine.run(feeds), want, "fp32", "strided k_cache")


def test_bf16_binds_by_pointer_and_cpu_layers_say_why_not(onnx_subgraphs):
    subgraphs = onnx_subgraphs("llada", "bf16")
    decl, path, module = subgraphs["embed"]          # Gather has a bf16 CPU kernel: the bf16 binding path runs
    engine = OrtEngine(decl, path, "cpu", OPTS)
    feeds = decl.dummy_inputs({"B": 2, "k": 5})
    out = engine.run(feeds)
    assert out["h"].dtype == torch.bfloat16
    assert torch.equal(out["h"], TorchEngine(decl, module).run(feeds)["h"])
    decl, path, _ = subgraphs["layer_00"]
    with pytest.raises(BackendError, match=r"CPU provider has no bf16 kernels.*--dtype fp32.*device='cuda'"):
        OrtEngine(decl, path, "cpu", OPTS)


def test_optimized_model_cache(onnx_subgraphs, tmp_path):
    decl, path, module = onnx_subgraphs("llada", "fp32")["layer_00"]
    opts = OrtOptions(intra_op_threads=1, optimized_model_dir=tmp_path / "cache")
    feeds = decl.dummy_inputs({"B": 1, "k": 2, "N": 6})
    want = TorchEngine(decl, module).run(feeds)
    first = OrtEngine(decl, path, "cpu", opts)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(n.startswith("layer_00.cpu-ort") and n.endswith(".onnx") for n in cached), cached
    second = OrtEngine(decl, path, "cpu", opts)   # loads the cached, already optimized graph
    for engine in (first, second):
        assert_close(engine.run(feeds), want, "fp32", "cached optimized model")


def test_onnx_and_declaration_disagree(onnx_subgraphs):
    subgraphs = onnx_subgraphs("llada", "fp32")
    head_decl = subgraphs["head"][0]
    with pytest.raises(EngineDirError, match=r"has inputs \{'ids': 'tensor\(int32\)'\}.*declares.*h_rows"):
        OrtEngine(head_decl, subgraphs["embed"][1], "cpu", OPTS)


def test_missing_file_and_bad_options(onnx_subgraphs, tmp_path):
    decl = onnx_subgraphs("llada", "fp32")["head"][0]
    with pytest.raises(EngineDirError, match="missing; re-run dllm-export"):
        OrtEngine(decl, tmp_path / "nope.onnx", "cpu", OPTS)
    with pytest.raises(ConfigError, match="threads must be >= 0"):
        OrtOptions(intra_op_threads=-1)
    with pytest.raises(ConfigError, match="use_torch_stream"):
        OrtOptions(cuda_provider_options={"user_compute_stream": "0"})


def test_cuda_without_cuda_provider_says_how_to_install(onnx_subgraphs):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    decl, path, _ = onnx_subgraphs("llada", "fp32")["head"]
    with pytest.raises(BackendError, match=r"only has \[.*CPUExecutionProvider.*pip install onnxruntime-gpu"):
        OrtEngine(decl, path, "cuda:0", OPTS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_provider_matches_torch(onnx_subgraphs, dtype):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDA provider) is not installed")
    subgraphs = onnx_subgraphs("dream", dtype)
    for name, (decl, path, module) in subgraphs.items():
        engine = OrtEngine(decl, path, "cuda", OPTS)
        ref = TorchEngine(decl, module, "cuda")
        for sizes in SIZES:
            feeds = {k: v.cuda() for k, v in decl.dummy_inputs(sizes, seed=1).items()}
            want = ref.run(feeds)
            out = engine.allocate_outputs(sizes)
            assert engine.run(feeds, out) is out and out[decl.outputs[0].name].is_cuda
            # Side stream: the engine orders itself against the caller's stream without a host sync.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                got = engine.run(feeds)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            assert_close(out, want, dtype, f"cuda {dtype} {name} at {sizes}")
            assert_close(got, want, dtype, f"cuda {dtype} {name} on a side stream")
