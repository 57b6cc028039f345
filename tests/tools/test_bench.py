"""dllm-bench on real tiny engines: an exported ONNX directory and random-weight shapes (torch and ORT)."""

from __future__ import annotations

import json

import pytest
import torch

from dllm.tools import bench
from dllm.tools.bench_report import format_table, percentile
from dllm.tools.bench_sources import weight_bytes_per_step

METHOD_KEYS = {"tokens_per_s", "canvas_tokens_per_s", "latency_ms_mean", "latency_ms_p50", "latency_ms_p90",
               "latency_ms_round_std", "first_token_ms_mean", "answer_tokens_mean", "speedup_per_round", "speedup", "steps_mean", "nfe_mean", "step_ms_mean", "step_ms_p50", "step_ms_p90",
               "engine_ms_per_step", "orchestration_ms_per_step", "rows_per_layer", "rows_per_layer_mean",
               "token_agreement", "peak_rss_mb", "speedup_median_per_round", "config", "deterministic"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from dllm.exporter.models.writer import write_tiny_checkpoint

    torch.set_num_threads(1)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llada", "llada", seed=3, n_layers=2,
                                 d_model=64, max_seq_len=256)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, tiny_checkpoint):
    pytest.importorskip("onnxruntime")
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import export_checkpoint

    return export_checkpoint(ExportConfig(tiny_checkpoint, tmp_path_factory.mktemp("eng") / "llada", validate=False))


@pytest.fixture(scope="module")
def spec_json(tmp_path_factory):
    from dllm.exporter.models.writer import tiny_spec

    path = tmp_path_factory.mktemp("spec") / "spec.json"
    path.write_text(json.dumps(tiny_spec("dream", n_layers=3, d_model=64, max_seq_len=256).to_dict()))
    return path


def run_bench(args, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main([*args, "--json", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "speedup" in printed
    return json.loads(out.read_text())


def test_engine_dir_two_methods(engine_dir, tmp_path, capsys):
    png = tmp_path / "plot.png"
    rep = run_bench([str(engine_dir), "--methods", "full,dcu+apd", "--repeat", "1", "--warmup", "1",
                     "--num-prompts", "2", "--gen-length", "32", "--block-length", "16", "--plot", str(png)],
                    tmp_path, capsys)
    assert rep["schema"] == "dllm-bench/1"
    assert rep["command"].startswith("dllm-bench ")
    assert {"cpu", "cores", "torch", "onnxruntime"} <= set(rep["machine"])
    assert rep["settings"]["backend"] == "onnxruntime" and rep["settings"]["prompt_kind"] == "task"
    assert list(rep["methods"]) == ["full", "dcu+apd"]
    full, fast = rep["methods"]["full"], rep["methods"]["dcu+apd"]
    for m in (full, fast):
        assert METHOD_KEYS <= set(m)
        assert m["generations"] == 2 and m["canvas_tokens_per_s"] > 0 and m["tokens_per_s"] >= 0
        # honest numbers: answer tokens stop at EOS, the first answer token comes no later than the whole answer
        assert 0 <= m["answer_tokens_mean"] <= 32
        assert m["tokens_per_s"] == pytest.approx(m["answer_tokens_mean"] / m["latency_ms_mean"] * 1e3)
        assert m["canvas_tokens_per_s"] == pytest.approx(32 / m["latency_ms_mean"] * 1e3)
        assert 0 < m["first_token_ms_mean"] <= m["latency_ms_mean"]
        assert 0 < m["step_ms_p50"] <= m["step_ms_p90"]
        assert len(m["rows_per_layer"]) == 2
        assert 0 <= m["exact_match"] <= 1 and len(m["answers"]) == 2
        assert m["deterministic"]
    # the reference: one token per step, every row of every layer, agrees with itself
    assert full["speedup"] == pytest.approx(1.0) and full["token_agreement"] == 1.0
    assert full["steps_mean"] == 32 and full["nfe_mean"] == 32
    assert full["rows_per_layer"] == [full["canvas_len_mean"]] * 2
    # dcu recomputes layer 0 fully (A: always) and fewer rows elsewhere
    assert fast["rows_per_layer"][1] < fast["rows_per_layer"][0]
    assert fast["config"]["cache"] == "dcu" and fast["config"]["commit"] == "apd"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000


def test_random_weights_torch_cpu(spec_json, tmp_path, capsys):
    rep = run_bench(["--random-weights", str(spec_json), "--backend", "torch", "--methods", "dcu",
                     "--prompt-len", "24", "--num-prompts", "2", "--repeat", "2", "--warmup", "0",
                     "--gen-length", "16", "--block-length", "8"], tmp_path, capsys)
    assert list(rep["methods"]) == ["full", "dcu"]                  # the reference is always measured
    assert rep["engine"]["random_weights"] == str(spec_json) and rep["engine"]["dtype"] == "fp32"
    assert rep["settings"]["prompt_kind"] == "random" and rep["settings"]["prompt_lengths"] == [24, 24]
    assert "exact_match" not in rep["methods"]["dcu"]
    assert rep["methods"]["dcu"]["generations"] == 4
    assert len(rep["methods"]["full"]["rows_per_layer"]) == 3
    assert "weight_read_floor" not in rep                           # CPU: no GPU floor


def test_random_weights_ort_shared_layer(spec_json, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    rep = run_bench(["--random-weights", str(spec_json), "--backend", "onnxruntime", "--share-layer-onnx",
                     "--layers", "2", "--methods", "full,dcu-reference", "--prompt-len", "16", "--num-prompts", "1",
                     "--repeat", "1", "--gen-length", "16", "--block-length", "16"], tmp_path, capsys)
    assert rep["engine"]["model"]["n_layers"] == 2
    assert rep["engine"]["onnx_layers"].startswith("shared")
    assert any("exported once" in n for n in rep["notes"])
    assert rep["methods"]["dcu-reference"]["config"]["proxy"] == "value"   # needed the vproj engines


def test_split_kv_attention_on_the_triton_path(spec_json, tmp_path, capsys):
    from dllm.kernels._triton import HAVE_TRITON

    if not HAVE_TRITON:
        pytest.skip("needs triton")
    rep = run_bench(["--random-weights", str(spec_json), "--backend", "torch", "--kernels", "triton",
                     "--attention", "split-kv", "--methods", "dcu", "--prompt-len", "12", "--num-prompts", "1",
                     "--repeat", "1", "--warmup", "0", "--gen-length", "8", "--block-length", "8"], tmp_path, capsys)
    assert rep["engine"]["attention"] == "split-kv" and rep["methods"]["dcu"]["generations"] == 1


@pytest.mark.parametrize("args, message", [
    (["--attention", "split-kv"], "--attention split-kv is a Triton kernel of the torch backend"),
    (["--methods", "full,nope"], "unknown cache policy"),
    (["--methods", "dcu,dcu"], "twice"),
    (["--repeat", "0"], "--repeat"),
])
def test_bad_flags_exit_2(engine_dir, capsys, args, message):
    assert bench.main([str(engine_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_needs_engine_dir_or_random(capsys):
    assert bench.main(["--methods", "full"]) == 2
    assert "exactly one" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [("", "not valid JSON"), ("[1, 2]", "JSON object"),
                                           ('{"d_modell": 64}', "unknown ModelSpec keys")])
def test_bad_spec_json_exit_2(tmp_path, capsys, text, message):
    spec = tmp_path / "spec.json"
    spec.write_text(text)
    assert bench.main(["--random-weights", str(spec), "--backend", "torch"]) == 2
    assert message in capsys.readouterr().err


def test_weight_bytes_match_the_model(spec_json):
    from dllm.exporter.subgraphs import DType
    from dllm.tools.random_model import random_model, random_spec

    spec = random_spec(str(spec_json))
    model = random_model(spec, torch.float32, "cpu")
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed"))
    assert weight_bytes_per_step(spec, DType.FP32) == 4 * params
    assert weight_bytes_per_step(random_spec("llada-8b"), DType.BF16) == pytest.approx(15.0e9, rel=0.01)


def test_method_overrides():
    base = bench.BenchConfig().decode
    assert bench.split_methods("full, dcu+apd@budget=8,window=8 ,dual+threshold") == \
        ("full", "dcu+apd@budget=8,window=8", "dual+threshold")
    cfg = bench.parse_method("dcu+apd@budget=8,window=8,proxy=value,tau_min=none", base)
    assert (cfg.cache.value, cfg.commit.value, cfg.budget, cfg.window, cfg.proxy.value, cfg.tau_min) == \
        ("dcu", "apd", 8, 8, "value", None)
    for bad in ("dcu@budget", "dcu@gen_length=32", "dcu@budget=x"):
        with pytest.raises(bench.ConfigError):
            bench.parse_method(bad, base)
    assert bench.BenchConfig(methods=("dcu", "dcu@budget=4")).methods == ("full", "dcu", "dcu@budget=4")
    assert bench.BenchConfig(methods=("dcu", "FULL")).methods == ("dcu", "full")


def test_percentile_and_table():
    assert percentile([3.0], 90) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    table = format_table({"full": {"tokens_per_s": 10.0, "speedup": 1.0, "peak_rss_mb": 5.0}})
    assert "full" in table and "1.00x" in table and "-" in table


BATCH_KEYS = {"batch", "sequences", "tokens_per_s", "canvas_tokens_per_s", "wall_ms_per_pass", "wall_ms_per_round",
              "batched_steps_per_pass", "step_ms_mean", "latency_ms_mean", "identical_to_batch1",
              "throughput_vs_batch1", "canvas_throughput_vs_batch1"}


def test_batch_sizes_side_by_side(engine_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main([str(engine_dir), "--batch", "3", "--methods", "full,dcu+apd", "--repeat", "2", "--warmup", "1",
                       "--gen-length", "16", "--block-length", "8", "--json", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "x batch 1" in printed and "same tokens" in printed
    rep = json.loads(out.read_text())
    assert "methods" not in rep and rep["settings"]["batch_sizes"] == [1, 3]    # batch 1 is always measured
    assert list(rep["batch"]) == ["full", "dcu+apd"]        # ratios are to batch 1: full is not added
    for method, by_batch in rep["batch"].items():
        assert list(by_batch) == ["1", "3"]
        one, three = by_batch["1"], by_batch["3"]
        for s in (one, three):
            assert BATCH_KEYS <= set(s) and s["sequences"] == 3             # --num-prompts defaults to the largest batch
            assert s["identical_to_batch1"], method                        # batching changes no token
            assert s["canvas_tokens_per_s"] == pytest.approx(2 * 3 * 16 / (s["wall_ms_per_pass"] * 2) * 1e3)
        assert one["throughput_vs_batch1"] == pytest.approx(1.0)
        # three slots run the three prompts in the steps one of them needs, not three times as many
        assert three["batched_steps_per_pass"] < one["batched_steps_per_pass"]
    assert rep["batch"]["full"]["1"]["batched_steps_per_pass"] == 3 * 16    # full: one token per step


@pytest.mark.parametrize("args, message", [
    (["--batch", "2,x"], "not a positive integer"),
    (["--batch", "0"], "not a positive integer"),
    (["--batch", "2,2"], "twice"),
    (["--batch", "9"], "--max-batch 9"),                                   # the engines were exported for 8
    (["--batch", "2", "--plot", "p.png"], "drop it with --batch"),
])
def test_bad_batch_flags_exit_2(engine_dir, capsys, args, message):
    assert bench.main([str(engine_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_batch_measures_only_the_methods_named(engine_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main([str(engine_dir), "--batch", "2", "--methods", "dcu", "--num-prompts", "2", "--repeat", "1",
                       "--gen-length", "8", "--block-length", "8", "--json", str(out), "--threads", "1"]) == 0
    assert list(json.loads(out.read_text())["batch"]) == ["dcu"]
