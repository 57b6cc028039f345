"""The roofline model of a decode step and the memory fit table (tools/roofline.py)."""

import json
from pathlib import Path

import pytest

from dllm.errors import ConfigError
from dllm.tools import roofline as rl
from dllm.tools.random_model import random_spec

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "docs" / "bench-gpu-h100-llada8b-p1024.json"
LLADA = random_spec("llada-8b")


def test_weight_formats_count_integers_and_scales():
    n, i, o = 4096 * 4096, 4096, 4096
    assert rl.Precision.FP16.weight_bytes(n, i, o) == 2 * n
    assert rl.Precision.INT8.weight_bytes(n, i, o) == n + 2 * o                   # one fp16 scale per column
    assert rl.Precision.INT4.weight_bytes(n, i, o, block=128) == n / 2 + 2 * o * 32   # per 128-block
    params = sum(i * o for _, i, o in rl.matrices(LLADA)) * LLADA.n_layers + 2 * LLADA.vocab_size * LLADA.d_model
    assert params == pytest.approx(8.02e9, rel=0.01)                             # LLaDA-8B


def test_step_is_bound_by_bytes_with_few_rows_and_by_flops_with_many():
    dev, a = rl.DEVICES["agx-orin-64gb"], rl.Assumptions()
    bw, peak = dev.bandwidth_gb_s * 1e9 * a.bw_efficiency, dev.tensor_tflops * 1e12 * a.compute_efficiency
    one = rl.step_cost(LLADA, [1] * 32, 1280, 1, dev, rl.Precision.FP16)
    layer_bytes = sum(2 * i * o for _, i, o in rl.matrices(LLADA))
    assert one.parts_ms["matmul"] == pytest.approx(32 * layer_bytes / bw * 1e3, rel=0.01)
    full = rl.step_cost(LLADA, [1280] * 32, 1280, 32, dev, rl.Precision.FP16)
    flops = 32 * sum(2 * 1280 * i * o for _, i, o in rl.matrices(LLADA))
    assert full.parts_ms["matmul"] == pytest.approx(flops / peak * 1e3, rel=0.01)
    assert full.tflop == pytest.approx((flops + 32 * 4 * 1280 * 1280 * 4096 + 2 * 32 * 4096 * 126464) / 1e12)
    # quantization cuts a byte-bound step, not a compute-bound one
    q1 = rl.step_cost(LLADA, [1] * 32, 1280, 1, dev, rl.Precision.INT4)
    assert q1.parts_ms["matmul"] < 0.3 * one.parts_ms["matmul"]
    q_full = rl.step_cost(LLADA, [1280] * 32, 1280, 32, dev, rl.Precision.INT4)
    assert q_full.parts_ms["matmul"] == pytest.approx(full.parts_ms["matmul"], rel=1e-6)
    slower = rl.step_cost(LLADA, [1] * 32, 1280, 1, dev, rl.Precision.FP16, rl.Assumptions(kernel_overhead_us=10))
    # 10 kernels a layer (7 products, attention, row gather/scatter, residual update) + head + embedding
    assert slower.ms == pytest.approx(one.ms + (32 * 10 + 2) * 10e-3, rel=1e-6)


def test_compare_reads_the_bench_json_and_predicts_a_floor():
    report = rl.read_bench(BENCH)
    rows = rl.compare(report, rl.DEVICES["h100-sxm"], rl.Assumptions())
    measured = {name: m["step_ms_mean"] for name, m in report["methods"].items()}
    assert [r["method"] for r in rows] == list(measured)
    for r in rows:
        assert r["measured_ms"] == measured[r["method"]]
        assert 0 < r["predicted_ms"] < r["measured_ms"]            # a roofline is a floor
        assert r["measured_over_predicted"] == pytest.approx(r["measured_ms"] / r["predicted_ms"])
    full = next(r for r in rows if r["method"] == "full")
    dcu = next(r for r in rows if r["method"].startswith("dcu@"))
    assert dcu["predicted_ms"] < full["predicted_ms"] / 2        # DCU recomputes ~70 of 1280 rows in 31 layers


def test_fit_counts_weights_caches_and_workspace():
    f16 = rl.footprint(LLADA, rl.Precision.FP16, 1280, 256)
    assert f16.weights_gb == pytest.approx(16.03, abs=0.05)
    kv_and_deltas = 32 * (2 * 1280 * 4096 + 2 * 1280 * 4096) * 2 / 1e9
    assert kv_and_deltas < f16.caches_gb < kv_and_deltas + 0.3
    rows = {r["precision"]: r for r in rl.fit_table(LLADA, 1280, 256, [rl.DEVICES[d] for d in rl.JETSON],
                                                    rl.Assumptions())}
    assert not rows["fp16"]["fits"]["orin-nx-16gb"] and rows["fp16"]["fits"]["agx-orin-32gb"]
    assert rows["int8"]["fits"]["orin-nx-16gb"] and not rows["int4"]["fits"]["orin-nano-8gb"]
    assert rows["int4 +head/embed"]["fits"]["orin-nano-8gb"]


def test_cli(tmp_path, capsys):
    assert rl.main(["compare", str(BENCH), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "measured/predicted" in out and "assumptions: bandwidth x0.9" in out and (tmp_path / "c.json").exists()
    assert rl.main(["step", "--bench", str(BENCH), "--devices", "orin-nano-8gb,thor-t5000"]) == 0
    table = capsys.readouterr().out
    assert "| orin-nano-8gb | int4 |" in table and "| thor-t5000 | fp16 |" in table
    assert rl.main(["fit", "--canvas", "640"]) == 0
    assert rl.main(["compare", str(BENCH), "--device", "orin-tx2"]) == 2
    assert "unknown device 'orin-tx2'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert rl.main(["compare", str(bad)]) == 2
    with pytest.raises(ConfigError, match="bw-efficiency"):
        rl.Assumptions(bw_efficiency=1.5)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            rl.measure("h100-sxm", LLADA)


H200_BENCH = ROOT / "docs" / "bench-gpu-h200-llada8b-p1024.json"


def figures(tmp_path, **changes):
    """A measured-figures file in the format ``measure --json`` writes."""
    fig = {"device": "NVIDIA H200", "figures": "h200", "copy_gb_s": 4250.0, "bw_efficiency": 0.88,
           "rows": {"1280": {"compute_efficiency": 0.7, "bw_efficiency": 0.2},
                    "70": {"compute_efficiency": 0.15, "bw_efficiency": 0.6}},
           "launch_us": 2.0, **changes}
    path = tmp_path / "fig.json"
    path.write_text(json.dumps(fig))
    return path


def test_measured_figures_set_the_efficiencies_and_charge_every_profiled_kernel(tmp_path):
    dev = rl.DEVICES["h200"]
    a = rl.figures_assumptions(figures(tmp_path), dev, rl.Assumptions())
    assert (a.bw_efficiency, a.skinny_bw_efficiency, a.compute_efficiency) == (0.88, 0.6, 0.7)
    assert a.kernel_overhead_us == 2.0 and a.count_kernels and a.skinny_rows == 140
    report = rl.read_bench(H200_BENCH)
    kernels = {n: m["profile"]["ops"]["per_step"] for n, m in report["methods"].items()}
    rows = {r["method"]: r for r in rl.compare(report, dev, a)}
    for name, r in rows.items():
        assert r["parts_ms"]["launches"] == pytest.approx(kernels[name] * 2e-3)
    # the skinny products of a DCU step stream at 0.6 of the bandwidth, not 0.88: slower than the default model
    plain = {r["method"]: r for r in rl.compare(report, dev, rl.Assumptions())}
    dcu = "dcu@allocation=uniform"
    assert rows[dcu]["parts_ms"]["matmul"] > plain[dcu]["parts_ms"]["matmul"] * 0.88 / 0.6 * 0.95


def test_measured_figures_cli_and_bad_files(tmp_path, capsys):
    assert rl.main(["compare", str(H200_BENCH), "--device", "h200", "--figures", str(figures(tmp_path))]) == 0
    assert "per kernel of the bench's profile" in capsys.readouterr().out
    assert rl.main(["compare", str(H200_BENCH), "--device", "h100-sxm", "--figures", str(figures(tmp_path))]) == 2
    assert "pass --device h200" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": {}}')
    assert rl.main(["compare", str(H200_BENCH), "--device", "h200", "--figures", str(bad)]) == 2
    assert "measure --json" in capsys.readouterr().err
    assert rl.main(["fit", "--figures", str(figures(tmp_path))]) == 2
    assert "--figures applies to compare" in capsys.readouterr().err
