"""Test-session setup and fixtures shared across test packages.

Triton decides between compiling for the GPU and its CPU interpreter when a kernel module is imported,
so the interpreter is switched on here, before anything imports dllm.kernels, on machines without CUDA.
The fixtures: the shipped model exported once, and a real dllm-serve on it.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def shipped_engine_dir(tmp_path_factory):
    """The shipped tiny-llada model exported to an ONNX engine directory (once per test session)."""
    pytest.importorskip("onnxruntime")
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import export_checkpoint
    from dllm.tools.assets import shipped_model_dir

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("shipped") / "tiny-llada"
    return export_checkpoint(ExportConfig(shipped_model_dir(), out, validate=False))


@pytest.fixture(scope="session")
def served(shipped_engine_dir):
    """dllm-serve on the shipped model: the real app under uvicorn on 127.0.0.1 (a free port), on a
    background thread, for the whole session. Defaults: dcu+apd, block length 32, max_tokens 32."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from dllm.serve.config import ServeConfig
    from dllm.serve.server import BackgroundServer

    server = BackgroundServer(ServeConfig(shipped_engine_dir, port=0, max_tokens=32)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference_pipeline(shipped_engine_dir):
    """A Pipeline of its own on the same engine directory: the answers the server must give."""
    from dllm.runtime import Pipeline

    return Pipeline.from_dir(shipped_engine_dir, backend="onnxruntime", device="cpu", intra_op_threads=1)
