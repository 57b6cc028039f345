"""Weight-only int8/int4 export: the graph form TensorRT takes, ONNX Runtime runs, the manifest record and
the reported error against fp32 (NVIDIA Model Optimizer does the quantization, on the CPU)."""

import json

import numpy as np
import onnx
import pytest
import torch

from dllm.errors import ConfigError
from dllm.exporter.calibration import (CalibrationSet, file_samples, is_shipped_model, load_calibration,
                                       make_canvases, task_samples)
from dllm.exporter.config import ExportConfig
from dllm.exporter.export import export_checkpoint
from dllm.exporter.manifest import read_manifest
from dllm.exporter.models import Checkpoint
from dllm.exporter.quant import load_quantized_weights
from dllm.exporter.quant_config import QuantConfig
from dllm.exporter.quant_graph import dequantized_weights, weight_nodes
from dllm.exporter.subgraphs import build_module

torch.set_num_threads(1)
MAX = 64
# d_model 64, MLP 128: int4 block 32 divides every input dim (2 and 4 blocks per column)
SPEC = dict(n_layers=2, d_model=64, mlp_hidden=128)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny LLaDA checkpoint whose norm weights are not 1 (a norm's Mul then differs from an AWQ scale)."""
    from dllm.exporter.models.model import DiffusionLM
    from dllm.exporter.models.writer import init_weights, save_checkpoint, tiny_spec

    model = init_weights(DiffusionLM(tiny_spec("llada", **SPEC)), seed=3, std=0.1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "llada")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "prompts.txt"
    path.write_text("\n".join(f"Sort: {i} {3 * i % 7} {i + 5}. What is {i}+{2 * i}?" for i in range(10)) + "\n")
    return path


def _export(ckpt, out, quant, **kw):
    return export_checkpoint(ExportConfig(ckpt, out, max_seq_len=MAX, quant=quant, **kw))


@pytest.fixture(scope="module")
def int8_export(ckpt, tmp_path_factory):
    """An int8 round-to-nearest export with the embedding quantized too, through the CLI: (dir, stdout)."""
    import contextlib
    import io

    from dllm.exporter.cli import main

    out, log = tmp_path_factory.mktemp("int8") / "e", io.StringIO()
    with contextlib.redirect_stdout(log):
        rc = main([str(ckpt), "-o", str(out), "--max-seq-len", str(MAX), "--quant", "int8",
                   "--quant-method", "rtn", "--quant-embed"])
    assert rc == 0
    return out, log.getvalue()


@pytest.fixture(scope="module")
def int8_dir(int8_export):
    return int8_export[0]


@pytest.fixture(scope="module")
def int4_dir(ckpt, calib_file, tmp_path_factory):
    cfg = QuantConfig("int4", method="awq", block_size=32, calib=str(calib_file), calib_samples=6)
    return _export(ckpt, tmp_path_factory.mktemp("int4") / "e", cfg)


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _quantized_matmuls(path):
    """{module token: (DequantizeLinear node, its weight initializer)} of a quantized ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    producers = _producers(model)
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear":
            dq = producers[n.input[1]]
            out[n.name.strip("/").split("/")[-2]] = (dq, inits[dq.input[0]])
    return model, out


LAYER_MATMULS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_int8_graphs_are_per_channel_dequantize_into_matmul(int8_dir):
    m = read_manifest(int8_dir)
    model, mm = _quantized_matmuls(int8_dir / "onnx/layer_00.onnx")
    assert set(mm) == LAYER_MATMULS
    assert model.opset_import[0].version == 17            # per-axis DequantizeLinear: opset 13+
    for dq, w in mm.values():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        assert w.data_type == onnx.TensorProto.INT8 and attrs == {"axis": 1}   # one scale per output channel
    assert not weight_nodes(model, "MatMul")                # no float weight left in a layer
    head = onnx.load(str(int8_dir / "onnx/head.onnx"), load_external_data=False)
    assert not any(n.op_type == "DequantizeLinear" for n in head.graph.node)   # the head only with --quant-head
    embed = onnx.load(str(int8_dir / "onnx/embed.onnx"), load_external_data=False)
    dq = next(n for n in embed.graph.node if n.op_type == "DequantizeLinear")  # --quant-embed: one scale per row
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0}
    assert not weight_nodes(embed, "Gather")
    q = m.quantization
    assert (q["format"], q["bits"], q["method"], q["block_size"]) == ("int8", 8, "rtn", None)
    assert q["subgraphs"] == ["embed", "layer_00", "layer_01", "vproj_00", "vproj_01"]
    assert 0.25 < q["weight_bytes"]["layer"]["ratio"] < 0.3   # 1 byte + fp32 scales vs 4 bytes
    err = m.build["validation"]["embed"]["quantization_error"]["outputs"]["h"]
    assert 0 < err["rel_rms"] < 0.01


def test_int4_graphs_are_blockwise_dequantize_into_matmul_at_opset_21(int4_dir):
    m = read_manifest(int4_dir)
    for name in ("embed", "head"):                          # stay in the model dtype without a flag
        g = onnx.load(str(int4_dir / f"onnx/{name}.onnx"), load_external_data=False)
        assert not any(n.op_type == "DequantizeLinear" for n in g.graph.node)
    model, mm = _quantized_matmuls(int4_dir / "onnx/layer_01.onnx")
    assert set(mm) == LAYER_MATMULS and model.opset_import[0].version == 21
    for dq, w in mm.values():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        assert w.data_type == onnx.TensorProto.INT4 and attrs == {"axis": 0, "block_size": 32}
    q = m.quantization
    assert (q["format"], q["method"], q["block_size"], q["opset"]) == ("int4", "awq", 32, 21)
    assert q["calibration"]["samples"] == 6 and q["calibration"]["held_out"] == 2
    assert len(q["calibration"]["sha256"]) == 64 and q["calibration"]["used_for"] == ["awq", "error"]
    # the target of the format: int4 layer weights at most 0.35x the unquantized (fp32) bytes
    assert q["weight_bytes"]["layer"]["ratio"] <= 0.35
    fp32_bytes = sum(p.numel() * 4 for p in Checkpoint(m.source["checkpoint"]).load_layer(0).parameters())
    assert q["weight_bytes"]["layer"]["unquantized_bytes"] == pytest.approx(2 * fp32_bytes, rel=0.02)


def test_vproj_probes_take_their_layers_quantized_v_proj_verbatim(int4_dir):
    for i in range(2):
        _, probe = _quantized_matmuls(int4_dir / f"onnx/vproj_{i:02d}.onnx")
        assert set(probe) == {"v_proj"}
        base = int4_dir / "onnx"
        w_layer, w_probe = (dequantized_weights(onnx.load(str(base / f"{name}_{i:02d}.onnx"), load_external_data=False),
                                                str(base)) for name in ("layer", "vproj"))
        np.testing.assert_array_equal(w_layer["v_proj"], w_probe["v_proj"])    # AWQ scale included


def test_validation_checks_the_graph_and_reports_the_error_against_fp32(int4_dir, int8_dir):
    for d in (int8_dir, int4_dir):
        validation = read_manifest(d).build["validation"]
        for name in ("layer_00", "layer_01", "vproj_00"):
            v = validation[name]
            assert v["passed"] and v["check"] == "ort-cpu"
            # the graph check is exact (same dequantized weights), at the fp32 tolerances
            assert all(o["max_abs_err"] <= o["tolerance"] for o in v["outputs"].values())
            err = v["quantization_error"]
            assert err["against"] == "fp32"
            for o in err["outputs"].values():
                assert 0 < o["rel_rms"] < 0.5 and o["max_abs_err"] > 0
        assert "quantization_error" not in validation["head"]
    held = read_manifest(int4_dir).build["validation"]["layer_00"]["quantization_error"]["inputs"]
    assert held == "held-out calibration canvases"
    int8 = read_manifest(int8_dir).build["validation"]["layer_00"]["quantization_error"]
    assert int8["inputs"] == "random inputs"                 # rtn on a model without calibration data
    worst8 = max(o["rel_rms"] for o in int8["outputs"].values())
    assert worst8 < 0.05                                     # int8 per-channel: a few percent at most


def test_quantized_engines_run_and_torch_backend_uses_the_same_weights(int4_dir):
    from dllm.engines.loader import open_engine_dir

    ort_set = open_engine_dir(int4_dir, "onnxruntime", "cpu")
    torch_set = open_engine_dir(int4_dir, "torch", "cpu")
    decl = read_manifest(int4_dir).subgraph("layer_01").decl
    feeds = decl.dummy_inputs({"B": 1, "k": 5, "N": 11}, seed=7)
    a = ort_set.layer(1).run(feeds)
    b = torch_set.layer(1).run(feeds)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)


def test_quantized_engine_directory_generates_and_resumes(int4_dir, ckpt, calib_file):
    from dllm.runtime import DecodeConfig, Pipeline, method_config

    pipe = Pipeline.from_dir(int4_dir, backend="onnxruntime", device="cpu")
    for method in ("full", "dcu+apd"):
        res = pipe.generate("Sort: 3 1 2", method_config(method, DecodeConfig(gen_length=16, block_length=16)))
        assert res.steps >= 1 and len(res.ids) == 16
    events = []
    cfg = QuantConfig("int4", method="awq", block_size=32, calib=str(calib_file), calib_samples=6)
    export_checkpoint(ExportConfig(ckpt, int4_dir, max_seq_len=MAX, quant=cfg), progress=events.append)
    assert {e.status.value for e in events if e.status.value != "start"} == {"skipped"}


def test_fp16_export_with_head_and_embedding_quantized(ckpt, tmp_path):
    out = _export(ckpt, tmp_path / "e", QuantConfig("int4", method="rtn", block_size=32, head=True, embed=True),
                  dtype="fp16", with_vproj=False)
    m = read_manifest(out)
    assert m.quantization["subgraphs"] == ["embed", "layer_00", "layer_01", "head"]
    assert all(v["passed"] for v in m.build["validation"].values())
    assert m.quantization["weight_bytes"]["layer"]["ratio"] <= 0.35          # against fp16 here
    head = onnx.load(str(out / "onnx/head.onnx"), load_external_data=False)
    embed = onnx.load(str(out / "onnx/embed.onnx"), load_external_data=False)
    assert not weight_nodes(head, "MatMul") and not weight_nodes(embed, "Gather")
    gather = next(n for n in embed.graph.node if n.op_type == "Gather")
    assert _producers(embed)[gather.input[0]].op_type == "DequantizeLinear"
    model, mm = _quantized_matmuls(out / "onnx/layer_00.onnx")
    scale = {t.name: t for t in model.graph.initializer}[next(iter(mm.values()))[0].input[1]]
    assert scale.data_type == onnx.TensorProto.FLOAT16                       # scales in the model dtype
    # the torch module with the file's weights computes what the file does
    module = load_quantized_weights(build_module(m.subgraph("embed").decl, Checkpoint(ckpt), "fp16"),
                                    out / "onnx/embed.onnx")
    assert not torch.equal(module.embed.weight, Checkpoint(ckpt).load_embed(torch.float16).weight)


# -- configuration and calibration --------------------------------------------------------------------
def test_quant_config_rejects_what_cannot_work(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="power of two"):
        QuantConfig("int4", block_size=48)
    with pytest.raises(ConfigError, match="does not exist"):
        QuantConfig("int4", calib=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="not supported"):
        QuantConfig("int3")
    with pytest.raises(ConfigError, match="--dtype fp16 or fp32"):
        ExportConfig(ckpt, tmp_path / "o", dtype="bf16", quant=QuantConfig("int8"))
    with pytest.raises(ConfigError, match="--quant-block-size 64"):
        QuantConfig("int4", block_size=128).check_dims({"d_model": 64, "mlp_hidden": 128})
    with pytest.raises(ConfigError, match="pass --calib"):              # AWQ without data on a foreign model
        _export(ckpt, tmp_path / "o", QuantConfig("int8", method="awq"))
    assert not (tmp_path / "o").exists()


def test_shipped_model_calibrates_on_its_own_tasks(tmp_path):
    from dllm.tools.assets import shipped_model_dir

    assert is_shipped_model(shipped_model_dir()) and not is_shipped_model(tmp_path)
    ckpt = Checkpoint(shipped_model_dir())
    cal = load_calibration("tasks", ckpt.tokenizer(), ckpt.spec, 512, samples=6)
    again = load_calibration("tasks", ckpt.tokenizer(), ckpt.spec, 512, samples=6)
    assert cal.sha256 == again.sha256 and "train split" in cal.source
    assert len(cal.calib) == 6 and len(cal.holdout) == 4 and not cal.holdout_is_calib
    assert len({len(c) for c in cal.calib + cal.holdout}) == 1          # one canvas length
    for canvas in cal.calib:
        assert ckpt.spec.mask_id in canvas                              # a decode-time canvas: partly masked
    assert not set(cal.calib) & set(cal.holdout)
    prompts = [s.messages[0][1] for s in task_samples(10, 0)]
    assert len(set(prompts)) == 10 and any(p.startswith("Sort:") for p in prompts) \
        and any(p.startswith("What is") for p in prompts)


def test_calibration_files_text_and_jsonl(tmp_path):
    rows = [{"text": "plain words"}, {"prompt": "What is 1+1?", "answer": "2"},
            {"question": "Why?", "answer": "Because #### 1"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = file_samples(jl)
    assert samples[0].text == "plain words" and samples[1].answer == "2"
    assert samples[2].messages == (("user", "Why?"),) and samples[3].answer == "hello"
    txt = tmp_path / "c.txt"
    txt.write_text("one line\n\nanother line\n")
    assert [s.text for s in file_samples(txt)] == ["one line", "another line"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1 needs a 'text'"):
        file_samples(bad)
    from dllm.tools.assets import shipped_model_dir

    ckpt = Checkpoint(shipped_model_dir())
    canvases = make_canvases(samples, ckpt.tokenizer(), mask_id=2, eos_id=1, max_len=48, seed=0)
    assert len({len(c) for c in canvases}) == 1 and len(canvases[0]) <= 48
    one = tmp_path / "one.txt"
    one.write_text("only one sample\n")
    cal = load_calibration(str(one), ckpt.tokenizer(), ckpt.spec, 64, samples=4)
    assert isinstance(cal, CalibrationSet) and cal.holdout_is_calib and len(cal.calib) == 1


def test_cli_quant_flags(int8_export, ckpt, tmp_path, capsys):
    from dllm.exporter.cli import main

    out = int8_export[1]
    assert "quantization: int8 rtn, 5 subgraphs" in out and "quantization error vs fp32" in out
    rc = main([str(ckpt), "-o", str(tmp_path / "f"), "--dtype", "bf16", "--quant", "int8"])
    assert rc == 2 and "--dtype fp16 or fp32" in capsys.readouterr().err


@pytest.mark.tensorrt
def test_every_quantized_subgraph_builds_with_tensorrt(int8_dir, int4_dir):
    """TensorRT-RTX (a real parser and builder, on the CPU) takes both forms, with the export's profiles,
    through the on-device plan builder (python -m dllm.engines.build_plans)."""
    trt_build = pytest.importorskip("dllm.engines.trt_build")
    try:
        trt_build.load_trt()
    except Exception as e:  # noqa: BLE001 - skip by capability
        pytest.skip(f"no TensorRT module: {e}")
    from dllm.engines.build_plans import build_plans

    for d in (int8_dir, int4_dir):
        tag = build_plans(d, log=lambda s: None)
        m = read_manifest(d)
        assert set(m.plans[tag]) == {s.decl.name for s in m.subgraphs}
        for name in m.quantization["subgraphs"]:
            assert (d / m.plans[tag][name]["file"]).stat().st_size > 0, name
