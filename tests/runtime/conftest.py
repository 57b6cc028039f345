"""Shared tiny models and engine directories for the runtime tests (2 layers, d_model 64)."""

from __future__ import annotations

import pytest
import torch

from dllm.exporter.models import DiffusionLM, tiny_spec
from dllm.exporter.models.writer import init_weights


@pytest.fixture(scope="session")
def tiny_models():
    """{"llada": DiffusionLM, "dream": DiffusionLM}: seeded, peaked (std 0.5), fp32, max_seq_len 128."""
    torch.set_num_threads(1)
    return {arch: init_weights(DiffusionLM(tiny_spec(arch, max_seq_len=128)), seed=1, std=0.5).eval()
            for arch in ("llada", "dream")}


@pytest.fixture(scope="session")
def deep_llada():
    """A tiny LLaDA with 4 layers: DCU's proportional budgets need at least 3 budgeted layers to differ (with
    2 layers the single budgeted layer always takes the whole budget)."""
    torch.set_num_threads(1)
    return init_weights(DiffusionLM(tiny_spec("llada", n_layers=4, max_seq_len=128)), seed=5, std=0.5).eval()


@pytest.fixture(scope="session")
def torch_engines(tiny_models):
    from dllm.engines.engine_set import torch_engine_set

    return {arch: torch_engine_set(m, "fp32") for arch, m in tiny_models.items()}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_models):
    """{"llada": path, "dream": path}: the tiny models written as Hugging Face checkpoints."""
    from dllm.exporter.models.writer import save_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {arch: save_checkpoint(m, root / arch) for arch, m in tiny_models.items()}


@pytest.fixture(scope="session")
def engine_dirs(tmp_path_factory, tiny_checkpoints):
    """{"llada": path, "dream": path}: ONNX engine directories (skips if the exporter or ORT is missing)."""
    pytest.importorskip("onnxruntime")
    try:
        from dllm.exporter.config import ExportConfig
        from dllm.exporter.export import export_checkpoint
    except ImportError as e:
        pytest.skip(f"exporter not available: {e}")
    root = tmp_path_factory.mktemp("engines")
    return {arch: export_checkpoint(ExportConfig(ckpt, root / arch, validate=False))
            for arch, ckpt in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def ort_engines(engine_dirs):
    from dllm.engines.loader import open_engine_dir

    return {arch: open_engine_dir(path, "onnxruntime", "cpu") for arch, path in engine_dirs.items()}
