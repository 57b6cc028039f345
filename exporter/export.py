"""``export_checkpoint``: a checkpoint directory in, an engine directory out (docs/engine-dir.md).

Per subgraph, in execution order: load only its weights from the checkpoint, export it to
ONNX, validate it against its PyTorch module in ONNX Runtime, drop it. Memory stays at about
one subgraph's weights (times a small factor for the exporter), whatever the model size.
Then, for ``--backend tensorrt``, one plan per subgraph with the shared profiles and timing cache.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import hashlib
import json
import os
import platform
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

from dllm.errors import CheckpointError, DllmWarning
from dllm.generation import GenerationDefaults, generation_defaults_from_checkpoint
from dllm.exporter.config import BuildConfig, ExportBackend, ExportConfig
from dllm.exporter.engine_dir import (ONNX_DIR, PLANS_DIR, ExportLock, WorkRecords, copy_tokenizer, files_sha256,
                                      finalize, link_or_copy, prepare_output)
from dllm.exporter.identity import checkpoint_identity
from dllm.exporter.manifest import Manifest, SubgraphEntry
from dllm.exporter.onnx_export import EXPORT_SIZES, data_path, export_subgraph
from dllm.exporter.subgraphs import Kind, SubgraphDecl, build_module, declare
from dllm.exporter.validate import raise_for_failures, validate_subgraph

# Bump when the exported graphs change for the same weights (invalidates every resume record).
EXPORTER_VERSION = 1


class Stage(str, enum.Enum):
    EXPORT = "export"        # ONNX export (+ validation when on)
    BUILD = "build"          # TensorRT plan


class Status(str, enum.Enum):
    START = "start"
    DONE = "done"
    SKIPPED = "skipped"      # unchanged since a previous run: reused


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    stage: Stage
    name: str                # subgraph name
    index: int               # 0-based position in the stage
    total: int
    status: Status
    seconds: float = 0.0     # for DONE: time the subgraph took


Progress = Callable[[ProgressEvent], None]


def open_checkpoint(path: Path):
    """The checkpoint at ``path`` with every tensor present and shaped as config.json says."""
    from dllm.exporter.models.checkpoint import Checkpoint

    if path.is_dir() and not os.path.lexists(path / "config.json"):     # a broken or looping link: read it and say so
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json); pass the directory that "
                              "holds config.json, *.safetensors and the tokenizer files")
    ckpt = Checkpoint(path)
    ckpt.check()
    return ckpt


def subgraph_tensors(ckpt, decl: SubgraphDecl) -> list[str]:
    """Checkpoint tensor names a subgraph's weights come from."""
    names, spec = ckpt.names, ckpt.spec
    if decl.kind == Kind.EMBED:
        return [names.embed]
    if decl.kind == Kind.HEAD:
        return [names.norm, names.embed if names.tied else names.head]
    wanted = names.layer_map if decl.kind == Kind.LAYER else \
        {k: v for k, v in names.layer_map.items() if k.startswith(("attn_norm.", "v_proj."))}
    prefix = names.layer_prefix.format(i=decl.layer)
    return [prefix + theirs for ours, theirs in wanted.items() if spec.qkv_bias or not ours.endswith(".bias")]


def input_hash(ckpt, decl: SubgraphDecl, cfg: ExportConfig, quant: dict | None = None) -> str:
    """What an exported subgraph depends on: its weights' bytes, the spec, its declaration, export options
    (and, when quantized, the quantization settings and calibration data: ``Quantizer.fingerprint``)."""
    import onnx
    import torch
    from safetensors import safe_open

    h = hashlib.sha256(json.dumps({
        "exporter": EXPORTER_VERSION, "spec": ckpt.spec.to_dict(), "decl": decl.to_dict(),
        "dtype": cfg.dtype.value, "opset": cfg.opset, "export_sizes": EXPORT_SIZES,
        "torch": torch.__version__, "onnx": onnx.__version__, **({"quant": quant} if quant else {})},
        sort_keys=True).encode())
    for name in subgraph_tensors(ckpt, decl):
        info = ckpt.tensors[name]
        with safe_open(str(info.file), framework="pt") as f:
            t = f.get_tensor(name)
        h.update(name.encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        del t
    return h.hexdigest()


def tool_versions(trt_mod=None) -> dict:
    import onnx
    import onnxruntime
    import torch

    import dllm

    tools = {"dllm": dllm.__version__, "python": platform.python_version(), "torch": torch.__version__,
             "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if trt_mod is not None:
        tools[trt_mod.name] = trt_mod.version
    return tools


class DeferredInterrupt:
    """Ctrl-C during an export stops it at the next subgraph boundary (``check``), not wherever it lands: a
    KeyboardInterrupt raised inside torch's ONNX exporter can come out as an unrelated torch error. A second
    Ctrl-C stops at once. Only the main thread can take signals; elsewhere this does nothing."""

    def __enter__(self) -> "DeferredInterrupt":
        self.pending, self._old = False, None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def export_checkpoint(cfg: ExportConfig, progress: Progress | None = None) -> Path:
    """Write the engine directory for ``cfg`` and return its path.

    Raises CheckpointError, ConfigError, ExportError, ValidationError or BackendError (all DllmError)
    with a message that says what to change. Unchanged subgraphs of a previous run are reused.
    A second export into the same ``out_dir`` at the same time fails at once (ExportError).
    """
    with ExportLock(cfg.out_dir), DeferredInterrupt() as interrupt:
        return _export(cfg, progress, interrupt)


def _export(cfg: ExportConfig, progress: Progress | None, interrupt: DeferredInterrupt) -> Path:
    progress = progress or (lambda event: None)
    ckpt = open_checkpoint(cfg.checkpoint)
    spec = ckpt.spec
    max_seq_len = cfg.resolve_max_seq_len(spec.max_seq_len)
    generation = generation_defaults_from_checkpoint(cfg.checkpoint)
    _warn_if_no_room(max_seq_len, generation)
    trt_mod = tag = None
    if cfg.backend == ExportBackend.TENSORRT:
        from dllm.engines.trt_build import check_dtype_supported, device_tag, gpu_info, load_trt

        trt_mod = load_trt()
        gpu = gpu_info()
        check_dtype_supported(cfg.dtype, gpu[1] if gpu else None)
        tag = device_tag(trt_mod)
    decls = declare(spec, cfg.dtype, cfg.with_vproj)
    quant = None
    if cfg.quant is not None:
        from dllm.exporter.quant import Quantizer

        quant = Quantizer(cfg.quant, ckpt, cfg.dtype, max_seq_len)
    tmp = prepare_output(cfg.out_dir)
    build = BuildConfig.for_export(cfg, max_seq_len, decls,
                                   timing_cache=tmp / PLANS_DIR / tag / "timing.cache" if tag else None)
    keep = set(copy_tokenizer(cfg.checkpoint, tmp))
    records = WorkRecords(cfg.out_dir, tmp)

    entries, reports, validation, export_seconds = [], [], {}, {}
    for i, decl in enumerate(decls):
        interrupt.check()
        progress(ProgressEvent(Stage.EXPORT, decl.name, i, len(decls), Status.START))
        t0 = time.perf_counter()
        rel = f"{ONNX_DIR}/{decl.name}.onnx"
        key = f"{ONNX_DIR}/{decl.name}"
        ih = input_hash(ckpt, decl, cfg, quant.fingerprint(decl) if quant else None)
        record = records.find(key, ih)
        checked = (record or {}).get("validation") or {}
        needs_validation = cfg.validate and not (checked.get("passed") and checked.get("max_seq_len") == max_seq_len
                                                 and "batches" in checked)   # validated at B = 1 and B > 1
        if record is None or needs_validation:
            if record is None:
                files, module = export_subgraph(decl, ckpt, cfg.dtype, tmp / rel, cfg.opset)
                if quant is not None:
                    quant.quantize(decl, tmp / rel)
                record = {"input_hash": ih, "sha256": files_sha256(files.paths),
                          "files": [rel, data_path(Path(rel)).as_posix()], "seconds": files.seconds}
            else:
                module = build_module(decl, ckpt, cfg.dtype)
            if cfg.validate:
                report = quant.validate(decl, module, tmp / rel, max_seq_len) if quant else \
                    validate_subgraph(decl, module, tmp / rel, cfg.dtype, max_seq_len)
                record["validation"] = {**report.to_dict(), "max_seq_len": max_seq_len}
                reports.append(report)
            del module
            gc.collect()
            records.save(key, record)
            status = Status.DONE
        else:
            status = Status.SKIPPED
        if record.get("validation"):
            validation[decl.name] = record["validation"]
        export_seconds[decl.name] = record.get("seconds")
        keep.update(record["files"])
        entries.append(SubgraphEntry(decl, rel, record["sha256"], ih))
        progress(ProgressEvent(Stage.EXPORT, decl.name, i, len(decls), status, time.perf_counter() - t0))
    raise_for_failures(reports)
    interrupt.check()

    plans, build_info = {}, {}
    if trt_mod is not None:
        plans[tag], build_info = _build_plans(entries, build, trt_mod, tag, tmp, records, keep, progress)

    manifest = Manifest(
        model=spec, dtype=cfg.dtype.value, max_seq_len=max_seq_len, max_batch=cfg.max_batch, subgraphs=tuple(entries),
        profiles=build.profiles, plans=plans,
        source={"checkpoint": str(cfg.checkpoint), "config_sha256": files_sha256([cfg.checkpoint / "config.json"]),
                **checkpoint_identity(cfg.checkpoint)},
        tools=tool_versions(trt_mod),
        build={"backend": cfg.backend.value, "exporter": "torch.onnx.export(dynamo=False)", "opset": cfg.opset,
               "export_sizes": EXPORT_SIZES, "with_vproj": cfg.with_vproj, "opt_rows": cfg.opt_rows,
               "max_rows": cfg.max_rows, "validate": cfg.validate,
               "validation": validation if cfg.validate else {}, "export_seconds": export_seconds,
               "external_data": "<onnx file>.data", "tensorrt": build_info},
        generation=generation.to_dict(),
        quantization=quant.record(tmp, [(e.decl, e.onnx) for e in entries]) if quant else None)
    return finalize(tmp, cfg.out_dir, manifest, keep, records)


def _warn_if_no_room(max_seq_len: int, generation: GenerationDefaults) -> None:
    """A canvas no longer than the checkpoint's default generation fits no prompt: every run with the
    defaults would fail, so say it before the export's minutes rather than at the first run."""
    gen = generation.gen_length
    if gen is not None and max_seq_len <= gen:
        warnings.warn(f"--max-seq-len {max_seq_len} leaves no room for a prompt before the default generation of "
                      f"{gen} tokens ({generation.source}): every run will need a --gen-length below {max_seq_len}; "
                      f"export with --max-seq-len of {gen} plus the longest prompt expected to run the defaults",
                      DllmWarning, stacklevel=3)


def _build_plans(entries: list[SubgraphEntry], build: BuildConfig, trt_mod, tag: str, tmp: Path,
                 records: WorkRecords, keep: set[str], progress: Progress) -> tuple[dict, dict]:
    """One plan per subgraph into plans/<tag>/, reusing plans whose ONNX and build options are unchanged."""
    from dllm.engines.trt_build import PlanBuilder

    builder = None
    plans = {}
    options = json.dumps({"profiles": [dataclasses.asdict(p) for p in build.profiles],
                          "optimization_level": build.optimization_level, "tag": tag,
                          "module": trt_mod.name, "version": trt_mod.version}, sort_keys=True)
    for i, entry in enumerate(entries):
        name = entry.decl.name
        progress(ProgressEvent(Stage.BUILD, name, i, len(entries), Status.START))
        t0 = time.perf_counter()
        rel = f"{PLANS_DIR}/{tag}/{name}.plan"
        key = f"{PLANS_DIR}/{tag}/{name}"
        ih = hashlib.sha256((entry.sha256 + options).encode()).hexdigest()
        record = records.find(key, ih)
        status = Status.SKIPPED
        if record is None:
            builder = builder or PlanBuilder(build, trt_mod)
            result = builder.build(entry.decl, tmp / entry.onnx, tmp / rel)
            record = {"input_hash": ih, "sha256": files_sha256([result.path]), "files": [rel],
                      "build_s": round(result.seconds, 3)}
            records.save(key, record)
            status = Status.DONE
        plans[name] = {"file": rel, "sha256": record["sha256"], "input_hash": ih, "build_s": record.get("build_s")}
        keep.add(rel)
        progress(ProgressEvent(Stage.BUILD, name, i, len(entries), status, time.perf_counter() - t0))
    cache_rel = f"{PLANS_DIR}/{tag}/timing.cache"
    if builder is not None:
        builder.save_timing_cache(tmp / cache_rel)
    elif not (tmp / cache_rel).exists() and (records.out / cache_rel).is_file():
        link_or_copy(records.out / cache_rel, tmp / cache_rel)
    if (tmp / cache_rel).exists():
        keep.add(cache_rel)
    info = {tag: {"module": trt_mod.name, "version": trt_mod.version,
                  "timing_cache": cache_rel if (tmp / cache_rel).exists() else None,
                  "strongly_typed": hasattr(trt_mod.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")}}
    return plans, info
