"""ONNX export of every subgraph: files, names, declared dtypes and symbolic dynamic dims."""

import onnx
import pytest
import torch

from dllm.errors import ExportError
from dllm.exporter.models import Checkpoint, write_tiny_checkpoint
from dllm.exporter.onnx_export import EXPORT_SIZES, check_onnx_io, data_path, export_subgraph
from dllm.exporter.subgraphs import DType, Kind, declare

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["llada", "dream"])
def ckpt(request, tmp_path_factory):
    return Checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", request.param))


@pytest.mark.parametrize("dtype", list(DType))
def test_every_subgraph_exports_with_dynamic_rows(ckpt, dtype, tmp_path):
    decls = declare(ckpt.spec, dtype, with_vproj=True)
    assert [d.kind for d in decls].count(Kind.LAYER) == ckpt.spec.n_layers
    for decl in decls:
        files, _ = export_subgraph(decl, ckpt, dtype, tmp_path / f"{decl.name}.onnx")
        assert files.data == data_path(files.model) and files.data.stat().st_size > 0
        assert files.model.stat().st_size < files.data.stat().st_size    # weights live in the .data file
        check_onnx_io(files.model, decl)
        graph = onnx.load(str(files.model), load_external_data=False).graph
        inputs = {v.name: v for v in graph.input}
        for t in decl.inputs:
            dims = inputs[t.name].type.tensor_type.shape.dim
            for d, got in zip(t.dims, dims):
                if isinstance(d, str):
                    assert got.dim_param == d and not got.HasField("dim_value"), (decl.name, t.name)
        if decl.kind == Kind.LAYER:
            assert [v.name for v in graph.input] == ["h_rows", "pos", "kv_len", "k_cache", "v_cache"]
            assert inputs["pos"].type.tensor_type.elem_type == onnx.TensorProto.INT32
            assert inputs["kv_len"].type.tensor_type.elem_type == onnx.TensorProto.INT32
            assert [d.dim_param for d in inputs["kv_len"].type.tensor_type.shape.dim] == ["B"]
            assert [d.dim_param for d in inputs["k_cache"].type.tensor_type.shape.dim][:2] == ["B", "N"]


def test_exported_layer_runs_at_other_shapes_in_onnx_model_checker(ckpt, tmp_path):
    decl = declare(ckpt.spec, "fp32")[1]
    files, _ = export_subgraph(decl, ckpt, "fp32", tmp_path / "layer.onnx")
    onnx.checker.check_model(str(files.model))   # path form: reads the external data too
    assert EXPORT_SIZES["k"] != EXPORT_SIZES["N"]


def test_check_onnx_io_rejects_a_graph_of_another_declaration(ckpt, tmp_path):
    decls = declare(ckpt.spec, "fp32")
    files, _ = export_subgraph(decls[0], ckpt, "fp32", tmp_path / "embed.onnx")
    with pytest.raises(ExportError, match="declared"):
        check_onnx_io(files.model, decls[-1])
