"""ONNX Runtime vs PyTorch parity of every subgraph, per dtype, on shapes other than the export shapes."""

import pytest
import torch

from dllm.errors import ValidationError
from dllm.exporter.models import Checkpoint, write_tiny_checkpoint
from dllm.exporter.onnx_export import EXPORT_SIZES, export_module, export_subgraph
from dllm.exporter.subgraphs import DType, build_module, declare
from dllm.exporter.validate import Batching, Check, raise_for_failures, validate_subgraph, validation_sizes

torch.set_num_threads(1)
MAX_SEQ_LEN = 64


@pytest.fixture(scope="module", params=["llada", "dream"])
def ckpt(request, tmp_path_factory):
    return Checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", request.param))


def test_validation_shapes_differ_from_export_shapes_and_cover_edges():
    sizes = validation_sizes(MAX_SEQ_LEN)
    assert EXPORT_SIZES not in sizes
    assert any(s["k"] == 1 for s in sizes) and any(s["k"] == s["N"] for s in sizes)
    assert any(s["B"] > 1 for s in sizes) and any(s["N"] == MAX_SEQ_LEN for s in sizes)
    assert any(s["B"] > 1 and s["k"] == s["N"] for s in sizes)       # a batched full recompute (prefill)
    assert all(s["k"] <= s["N"] <= 8 for s in validation_sizes(8))


@pytest.mark.parametrize("dtype", list(DType))
def test_every_subgraph_matches_pytorch(ckpt, dtype, tmp_path):
    reports = []
    for decl in declare(ckpt.spec, dtype, with_vproj=True):
        files, module = export_subgraph(decl, ckpt, dtype, tmp_path / f"{decl.name}.onnx")
        report = validate_subgraph(decl, module, files.model, dtype, MAX_SEQ_LEN)
        assert report.check == (Check.ORT_CPU_BF16_UPCAST if dtype == "bf16" else Check.ORT_CPU)
        # every output, reported apart at batch 1 and batched
        assert [(r.batching, r.output) for r in report.results] == \
            [(b, t.name) for b in Batching for t in decl.outputs]
        assert report.passed, report.format()
        record = report.to_dict()
        assert set(record["batches"]) == {"single", "batched"}
        assert set(record["outputs"]) == set(record["batches"]["single"]) == set(record["batches"]["batched"])
        if decl.takes_kv_len:   # layers: the whole canvas alone, mixed sequence lengths in a batch
            for r in report.results:
                lengths, n = r.sizes["kv_len"], r.sizes["N"]
                assert (lengths == [n]) if r.batching == Batching.SINGLE else \
                    (len(set(lengths)) > 1 and n in lengths), r
        reports.append(report)
    raise_for_failures(reports)   # nothing to raise


class IgnoresLength(torch.nn.Module):
    """A layer that drops its kv_len input: right for one unpadded sequence, wrong for a padded batch."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, h_rows, pos, kv_len, k_cache, v_cache):
        return self.inner(h_rows, pos, torch.full_like(kv_len, k_cache.shape[1]), k_cache, v_cache)


def test_a_graph_that_ignores_padding_fails_only_batched(ckpt, tmp_path):
    decl = declare(ckpt.spec, "fp32")[1]                         # layer_00
    module = build_module(decl, ckpt, "fp32")
    files = export_module(decl, IgnoresLength(module), tmp_path / "layer_00.onnx")
    report = validate_subgraph(decl, module, files.model, "fp32", MAX_SEQ_LEN)
    # padding keys are masked: attention (and the MLP after it) is off in a padded batch; k and v are not
    assert {(r.batching, r.output) for r in report.failures} == \
        {(Batching.BATCHED, name) for name in ("attn_rows", "mlp_rows")}, report.format()
    assert "[batched]" in report.format() and "kv_len=[" in report.format()


def test_wrong_weights_fail_with_one_error_listing_every_output(ckpt, tmp_path):
    decl = declare(ckpt.spec, "fp32")[1]                         # layer_00
    module = build_module(decl, ckpt, "fp32")
    files = export_module(decl, module, tmp_path / "layer_00.onnx")
    with torch.no_grad():
        module.layer.o_proj.weight.mul_(1.5)                     # PyTorch now disagrees on attn and mlp rows
        module.layer.k_proj.weight.add_(0.1)
    report = validate_subgraph(decl, module, files.model, "fp32", MAX_SEQ_LEN)
    assert {r.output for r in report.failures} == {"k_rows", "attn_rows", "mlp_rows"}
    assert {r.batching for r in report.failures} == set(Batching)          # wrong at batch 1 and batched
    with pytest.raises(ValidationError) as e:
        raise_for_failures([report])
    msg = str(e.value)
    assert "3 output(s)" in msg and "layer_00.k_rows" in msg and "layer_00.mlp_rows" in msg
    assert "tolerance" in msg and "ort-cpu" in msg
