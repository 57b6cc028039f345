"""Test-session setup and fixtures shared across test packages.

Triton decides between compiling for the GPU and its CPU interpreter when a kernel module is imported,
so the interpreter is switched on here, before anything imports dllm.kernels, on machines without CUDA.
The fixtures: the shipped model exported once, a real dllm-serve on it, and a byte-level tokenizer. ``write_schema_1`` turns an
export into an engine directory of the layout before batching.
"""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A real byte-level BPE tokenizer (as LLaDA's and Dream's are), where one character can span several
    tokens; ``<eos>`` and ``<mask>`` are special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["plain ascii words only"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", mask_token="<mask>")


def write_schema_1(src: Path, dst: Path) -> Path:
    """A schema-1 engine directory (the layout before batching) made from the schema-2 export ``src``.

    Each layer is exported again from the same checkpoint weights, declared without ``kv_len``: the module is
    ``UnpaddedLayer``, the layer with no padding, which is what the first release exported (kv_len = N masks
    no key). The manifest is rewritten as that release wrote it: schema_version 1,
    no ``max_batch``, layers without ``kv_len``, batch-1 profiles (``build.max_batch`` 1), validation records
    without the batched regime, every file's size and sha256. ONNX only: ``src``'s plans are left out.
    """
    import json
    import shutil

    from dllm.exporter.config import ExportConfig
    from dllm.exporter.engine_dir import files_sha256
    from dllm.exporter.export import input_hash
    from dllm.exporter.manifest import MANIFEST, read_manifest
    from dllm.exporter.models.checkpoint import Checkpoint
    from dllm.exporter.onnx_export import export_subgraph
    from dllm.exporter.subgraphs import declare

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("plans", ".verified*"))
    m = read_manifest(dst)
    ckpt = Checkpoint(m.source["checkpoint"])
    old = {d.name: d for d in declare(m.model, m.dtype, with_vproj=True, padded=False)}
    data = json.loads((dst / MANIFEST).read_text())
    for entry in data["subgraphs"]:
        if entry["kind"] == "layer":
            files, _ = export_subgraph(old[entry["name"]], ckpt, m.dtype, dst / entry["onnx"])
            cfg = ExportConfig(ckpt.path, dst, dtype=m.dtype, opset=data["build"]["opset"])
            entry.update(old[entry["name"]].to_dict(), sha256=files_sha256(files.paths),
                         input_hash=input_hash(ckpt, old[entry["name"]], cfg))    # what that export recorded
            for path in files.paths:
                data["files"][path.relative_to(dst).as_posix()] = {"size": path.stat().st_size,
                                                                   "sha256": files_sha256([path])}
    data["files"] = {rel: info for rel, info in data["files"].items() if not rel.startswith("plans/")}
    del data["max_batch"]
    for profile in data["profiles"]:
        profile["max"]["B"] = 1
    for record in data["build"].get("validation", {}).values():
        record.pop("batches", None)                      # validated at batch 1 only then
    data.update(schema_version=1, plans={}, build={**data["build"], "max_batch": 1, "tensorrt": {}})
    (dst / MANIFEST).write_text(json.dumps(data, indent=2))
    return dst
