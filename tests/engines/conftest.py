"""Fixtures for the engine tests: tiny LLaDA and Dream checkpoints and their subgraphs as real ONNX files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dllm.exporter.models.checkpoint import Checkpoint
from dllm.exporter.models.writer import write_tiny_checkpoint
from dllm.exporter.subgraphs import declare

ARCHS = ("llada", "dream")


def gpu_available() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{arch: checkpoint dir}, 2 layers, d_model 64."""
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: write_tiny_checkpoint(root / arch, arch, seed=i, n_layers=2, d_model=64)
            for i, arch in enumerate(ARCHS)}


def export_onnx(ckpt_dir: Path, dtype: str, out: Path) -> dict:
    """Every subgraph of a checkpoint as ``out/<name>.onnx``; returns {name: (decl, path, torch module)}."""
    from dllm.exporter.onnx_export import export_subgraph

    ckpt = Checkpoint(ckpt_dir)
    result = {}
    for decl in declare(ckpt.spec, dtype, with_vproj=True):
        files, module = export_subgraph(decl, ckpt, dtype, out / f"{decl.name}.onnx")
        result[decl.name] = (decl, files.model, module)
    return result


@pytest.fixture(scope="session")
def onnx_subgraphs(tiny_checkpoints, tmp_path_factory):
    """{(arch, dtype): {name: (decl, onnx path, torch module)}}, exported lazily and cached per session."""
    root = tmp_path_factory.mktemp("onnx")
    cache: dict = {}

    def get(arch: str, dtype: str) -> dict:
        if (arch, dtype) not in cache:
            cache[(arch, dtype)] = export_onnx(tiny_checkpoints[arch], dtype, root / f"{arch}-{dtype}")
        return cache[(arch, dtype)]

    return get


def trt_module_importable() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx_bindings"))


@pytest.fixture(scope="session")
def engine_dirs(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """{arch: engine dir} written by the real exporter (fp32; validation is the exporter tests' job).

    The LLaDA directory also holds TensorRT plans where a TensorRT module is importable
    (TensorRT-RTX builds them without a GPU).
    """
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import export_checkpoint

    root = tmp_path_factory.mktemp("engines")
    dirs = {}
    for arch, ckpt in tiny_checkpoints.items():
        backend = "tensorrt" if arch == "llada" and trt_module_importable() else "onnx"
        dirs[arch] = export_checkpoint(ExportConfig(ckpt, root / arch, dtype="fp32", max_seq_len=64,
                                                    validate=False, backend=backend))
    return dirs
