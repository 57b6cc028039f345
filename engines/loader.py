"""Open an engine directory (docs/engine-dir.md) as an ``EngineSet`` on one backend.

``open_engine_dir(path, backend, device, **options)``:

- reads ``manifest.json`` (format and schema version checked by ``read_manifest``) and checks it against
  itself and the directory, then the size and content of every file the backend reads
  (``dllm.exporter.integrity``: sha256 on a verified stamp by default, every byte with ``verify_hashes``);
- ``onnxruntime``: one ``OrtEngine`` per subgraph from ``onnx/<name>.onnx``;
- ``tensorrt``: one ``TrtEngine`` per subgraph from ``plans/<device tag>/<name>.plan``, where the device tag
  names this GPU and TensorRT version (``dllm.engines.trt_build.device_tag``);
- ``torch``: the PyTorch subgraph modules rebuilt from the checkpoint the directory was exported from
  (``manifest.source["checkpoint"]``, or ``checkpoint=``), for reference runs; its weights must be
  the ones exported (fingerprint recorded in the manifest; every byte with ``verify_hashes``); quantized
  subgraphs take their dequantized weights from the ONNX files, so they compute what those graphs compute;
- ``tokenizer_dir`` is ``path/tokenizer``.

Backend modules are imported only when asked for, so a Jetson install without ONNX Runtime (or a CPU
machine without TensorRT) can still use the others.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

import torch

from dllm.device import parse_device
from dllm.errors import ConfigError, EngineDirError
from dllm.engines.base import Backend
from dllm.engines.engine_set import EngineSet
from dllm.exporter.integrity import check_consistency, onnx_checks, plan_checks, tokenizer_checks, verify_files
from dllm.exporter.manifest import Manifest, read_manifest
from dllm.exporter.subgraphs import DType
from dllm.kernels import KernelPath, make_ops
from dllm.threads import resolve_threads, usable_cores

TOKENIZER_DIR = "tokenizer"
PLANS_DIR = "plans"


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and on which devices."""
    backend: Backend
    available: bool
    module: str | None          # the module that would be used ("tensorrt_rtx_bindings", ...)
    version: str | None
    devices: tuple[str, ...]    # "cpu", "cuda"
    detail: str                 # why not, or how to get more (install hint)


def _backend(backend: Backend | str) -> Backend:
    try:
        return Backend(backend)
    except ValueError:
        raise ConfigError(f"backend {backend!r} is not one of {[b.value for b in Backend]}") from None


def available_backends() -> dict[Backend, BackendStatus]:
    """What is importable here: each backend with its module, version, devices and an install hint."""
    from dllm.engines.ort_backend import ORT_INSTALL_CPU, ORT_INSTALL_GPU
    from dllm.engines.trt_backend import NEED_GPU, TRT_INSTALL

    cuda = torch.cuda.is_available()
    out = {Backend.TORCH: BackendStatus(Backend.TORCH, True, "torch", torch.__version__,
                                        ("cpu", "cuda") if cuda else ("cpu",),
                                        "" if cuda else "this torch build sees no CUDA device")}
    try:
        ort = importlib.import_module("onnxruntime")
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        devices = ("cpu", "cuda") if has_cuda else ("cpu",)
        detail = "" if has_cuda else f"CPU provider only; for NVIDIA GPUs: {ORT_INSTALL_GPU}"
        out[Backend.ONNXRUNTIME] = BackendStatus(Backend.ONNXRUNTIME, True, "onnxruntime", ort.__version__,
                                                 devices, detail)
    except ImportError as e:
        out[Backend.ONNXRUNTIME] = BackendStatus(Backend.ONNXRUNTIME, False, None, None, (),
                                                 f"not importable ({e}); {ORT_INSTALL_CPU} or {ORT_INSTALL_GPU}")
    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            trt = importlib.import_module(name)
        except ImportError:
            continue
        if not hasattr(trt, "Runtime"):
            continue
        out[Backend.TENSORRT] = BackendStatus(Backend.TENSORRT, cuda, name, getattr(trt, "__version__", None),
                                              ("cuda",) if cuda else (),
                                              "" if cuda else f"{NEED_GPU} (plans can still be built here)")
        break
    else:
        out[Backend.TENSORRT] = BackendStatus(Backend.TENSORRT, False, None, None, (),
                                              f"not importable; install with {TRT_INSTALL}")
    return out


def _onnx_files(root: Path, manifest: Manifest) -> dict[str, Path]:
    return {entry.decl.name: root / entry.onnx for entry in manifest.subgraphs}


def _plan_files(root: Path, manifest: Manifest, tag: str) -> dict[str, Path]:
    """{subgraph name: plan path} for ``tag``; a clear error listing the tags present when it is missing."""
    present = sorted(set(manifest.plans) | ({p.name for p in (root / PLANS_DIR).iterdir() if p.is_dir()}
                                            if (root / PLANS_DIR).is_dir() else set()))
    if tag not in manifest.plans:
        raise EngineDirError(
            f"{root} has no TensorRT plans for this device (tag {tag!r}); it has plans for "
            f"{present or 'no device'}. Build them here with: dllm-export CHECKPOINT -o {root} --backend tensorrt "
            "(plans are specific to a GPU and TensorRT version), or use --backend onnxruntime")
    entries = manifest.plans[tag]
    paths = {}
    for sub in manifest.subgraphs:
        name = sub.decl.name
        if name not in entries:
            raise EngineDirError(f"{root}: plans for {tag!r} lack subgraph {name!r}; rebuild the plans")
        path = root / entries[name]["file"]
        if not path.exists():
            raise EngineDirError(f"{root}: plan {path} listed in the manifest is missing; rebuild the plans")
        paths[name] = path
    return paths


def _options(cls, options: dict, backend: Backend):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - names
    if unknown:
        raise ConfigError(f"unknown {backend.value} options {sorted(unknown)}; expected a subset of {sorted(names)}")
    return cls(**options)


def _open_onnxruntime(root, manifest, device, verify_hashes, options):
    from dllm.engines.ort_backend import OrtEngine, OrtOptions, import_onnxruntime

    import_onnxruntime()   # the install hint before any file work
    opts = _options(OrtOptions, options, Backend.ONNXRUNTIME)
    verify_files(root, onnx_checks(manifest), full=verify_hashes)
    paths = _onnx_files(root, manifest)
    return {s.decl.name: OrtEngine(s.decl, paths[s.decl.name], device, opts) for s in manifest.subgraphs}


def _open_tensorrt(root, manifest, device, plan_tag, verify_hashes, options):
    from dllm.engines.trt_backend import DeviceScratch, TrtEngine, import_tensorrt, require_gpu

    if options:
        raise ConfigError(f"unknown tensorrt options {sorted(options)}; the tensorrt backend takes plan_tag only")
    trt = import_tensorrt()
    if plan_tag is None:
        from dllm.engines.trt_build import device_tag
        plan_tag = device_tag()
    paths = _plan_files(root, manifest, plan_tag)
    verify_files(root, plan_checks(manifest, plan_tag), full=verify_hashes)
    require_gpu(device)
    scratch = DeviceScratch(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
    return {s.decl.name: TrtEngine(s.decl, paths[s.decl.name], device, manifest.profiles, scratch, trt)
            for s in manifest.subgraphs}


def _open_torch(root, manifest, device, checkpoint, verify_hashes, options, ops):
    from dllm.engines.engine_set import torch_module
    from dllm.engines.torch_backend import TorchEngine
    from dllm.exporter.models.checkpoint import Checkpoint

    unknown = set(options) - {"cuda_graphs"}
    if unknown:
        raise ConfigError(f"unknown torch options {sorted(unknown)}; the torch backend takes checkpoint, cuda_graphs")
    recorded = manifest.source.get("checkpoint")
    path = Path(checkpoint) if checkpoint is not None else (Path(recorded) if recorded else None)
    if path is None or not (path / "config.json").exists():
        where = "none recorded" if path is None else f"{path}, which is gone"
        raise EngineDirError(
            f"the torch backend rebuilds the subgraph modules from the checkpoint {root} was exported from "
            f"({where}); re-export from the checkpoint's new place, or pass checkpoint=PATH "
            "(the original Hugging Face checkpoint directory)")
    ckpt = Checkpoint(path)
    if ckpt.spec != manifest.model:
        raise EngineDirError(f"checkpoint {path} is a different model than {root} was exported from: "
                             f"{ckpt.spec} vs {manifest.model}; pass the checkpoint it was exported from")
    _check_same_weights(root, manifest, path, verify_hashes)
    verify_files(root, tokenizer_checks(manifest), full=verify_hashes)
    quantized = set((manifest.quantization or {}).get("subgraphs", ()))
    engines = {}
    for s in manifest.subgraphs:
        module = torch_module(s.decl, ckpt, manifest.dtype, ops)
        if s.decl.name in quantized:
            from dllm.exporter.quant import load_quantized_weights

            module = load_quantized_weights(module, root / s.onnx)   # the ONNX file's weights, dequantized
        engines[s.decl.name] = TorchEngine(s.decl, module, device)
    return engines


def _check_same_weights(root: Path, manifest: Manifest, checkpoint: Path, full: bool) -> None:
    """The checkpoint holds the weights the directory was exported from (fingerprint, or every byte)."""
    from dllm.exporter.identity import checkpoint_fingerprint, checkpoint_sha256

    for key, compute in (("weights_fingerprint", checkpoint_fingerprint),) + \
            ((("weights_sha256", checkpoint_sha256),) if full else ()):
        recorded = manifest.source.get(key)
        if recorded is not None and compute(checkpoint) != recorded:
            raise EngineDirError(f"checkpoint {checkpoint} holds other weights than the ones {root} was exported "
                                 f"from ({key} differs); pass the checkpoint it was exported from "
                                 f"(checkpoint=PATH), or re-export this one with dllm-export")


def open_engine_dir(path: str | os.PathLike, backend: Backend | str = Backend.ONNXRUNTIME,
                    device: torch.device | str = "cpu", *, verify_hashes: bool = False,
                    plan_tag: str | None = None, checkpoint: str | os.PathLike | None = None,
                    threads: int | None = None, kernels: KernelPath | str = KernelPath.AUTO,
                    **options) -> EngineSet:
    """Load every subgraph of an engine directory on ``backend`` and ``device``.

    threads: CPU threads of one generation (``dllm.threads``; None: the default): ONNX Runtime's
        intra-op threads on the CPU, or torch's with the torch backend on the CPU.
    verify_hashes: hash every file the backend reads (and, for torch, every checkpoint tensor) against the
        manifest, instead of trusting files the verified stamp vouches for; sizes are always checked.
    plan_tag: tensorrt only; load ``plans/<plan_tag>/`` instead of this device's tag.
    checkpoint: torch only; the checkpoint directory, when it moved since export.
    kernels: how the work around the engines runs (dllm.kernels.KernelPath): ``auto`` (Triton kernels on
        CUDA, their torch twins on the CPU), ``triton``, ``torch`` or ``plain`` (the unfused path).
    options: backend settings: ``OrtOptions`` fields for onnxruntime (``optimized_model_dir``,
        ``allow_spinning``, ...; ``intra_op_threads`` is accepted as another name for ``threads``),
        ``cuda_graphs`` for torch.
    """
    root = Path(path)
    backend = _backend(backend)
    intra = options.pop("intra_op_threads", None)     # the ONNX Runtime spelling of the same setting
    if intra is not None and threads is not None and intra != threads:
        raise ConfigError(f"threads={threads} and intra_op_threads={intra} disagree; pass threads only")
    if threads is None and intra is not None:
        threads = intra if intra > 0 else usable_cores()   # 0: ONNX Runtime's "every core"
    threads = resolve_threads(threads, backend.value)
    if backend == Backend.ONNXRUNTIME:
        options["intra_op_threads"] = threads
    manifest = read_manifest(root)
    check_consistency(root, manifest)
    if backend == Backend.TENSORRT:   # checks the GPU itself, after telling which plans are missing
        device = parse_device(device, "device", check_available=False)
        engines = _open_tensorrt(root, manifest, device, plan_tag, verify_hashes, options)
    elif backend == Backend.ONNXRUNTIME:
        device = parse_device(device, "device")
        engines = _open_onnxruntime(root, manifest, device, verify_hashes, options)
    else:
        device = parse_device(device, "device")
    ops = make_ops(kernels, device)
    if backend == Backend.TORCH:
        engines = _open_torch(root, manifest, device, checkpoint, verify_hashes, options, ops)
    tokenizer = root / TOKENIZER_DIR
    cuda_graphs = backend == Backend.TORCH and bool(options.get("cuda_graphs")) and device.type == "cuda"
    return EngineSet(manifest.model, DType(manifest.dtype), backend, device, engines,
                     tokenizer if tokenizer.is_dir() else None, cuda_graphs=cuda_graphs, threads=threads,
                     ops=ops, max_batch=manifest.max_batch)
