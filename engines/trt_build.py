"""Build TensorRT plans from exported ONNX subgraphs.

One code path for ``tensorrt`` (TensorRT 10.x, e.g. 10.3 on JetPack 6) and
``tensorrt_rtx_bindings`` (TensorRT-RTX, which also builds on a machine without a GPU):
the builder, network, ONNX parser, profile and serialization APIs are the same names.
Only TensorRT 10 APIs are used. Networks are strongly typed (precision comes from the ONNX
graph), so the plan computes in the dtype that was exported.

Every subgraph gets the same optimization profiles (``BuildConfig.profiles``, recorded in
the manifest): profile 0 "cached" for small k, profile 1 "refresh" for k = N, both for any batch
B in 1..max_batch (a layer's ``kv_len`` input has shape [B]). One timing
cache is shared by all subgraphs of a build (the layers are identical, so later layers reuse
the first one's timings) and saved in the engine directory.
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from pathlib import Path
from types import ModuleType

from dllm.errors import BackendError, ConfigError
from dllm.exporter.config import BuildConfig
from dllm.exporter.manifest import Profile
from dllm.exporter.subgraphs import DType, SubgraphDecl

# bf16 tensor cores arrived with Ampere (compute capability 8.0).
MIN_CC = {DType.FP32: (5, 3), DType.FP16: (5, 3), DType.BF16: (8, 0)}


@dataclasses.dataclass(frozen=True)
class TrtModule:
    """The TensorRT Python module in use."""
    trt: ModuleType
    name: str            # "tensorrt" or "tensorrt_rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"


def load_trt() -> TrtModule:
    """``import tensorrt``, falling back to ``tensorrt_rtx_bindings``; BackendError if neither is installed."""
    try:
        import tensorrt as trt  # noqa: F401
        return TrtModule(trt, "tensorrt", str(trt.__version__))
    except ImportError:
        pass
    try:
        import tensorrt_rtx_bindings as trt
        return TrtModule(trt, "tensorrt_rtx", str(trt.__version__))
    except ImportError:
        raise BackendError(
            "--backend tensorrt needs a TensorRT Python module and none is installed: install TensorRT 10 "
            "(JetPack ships it; elsewhere `pip install tensorrt`) or TensorRT-RTX (`pip install "
            "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`), or export with --backend onnx") from None


def gpu_info() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of CUDA device 0, or None without a usable GPU."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))
    except Exception:  # a broken CUDA install means "no GPU" for tagging purposes
        pass
    return None


def device_tag(mod: TrtModule | None = None) -> str:
    """Where a plan is valid: GPU, compute capability and TensorRT module/version.

    e.g. ``orin-sm87-trt-10.3.0.30`` or ``cpu-rtx-1.7.1.116`` (TensorRT-RTX built without a GPU).
    """
    mod = mod or load_trt()
    kind = "rtx" if mod.is_rtx else "trt"
    gpu = gpu_info()
    if gpu is None:
        if not mod.is_rtx:
            raise BackendError("TensorRT (not -RTX) needs a CUDA GPU to build plans and none is visible; "
                               "run on the target GPU or export with --backend onnx")
        return f"cpu-{kind}-{mod.version}"
    name, (major, minor) = gpu
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return f"{slug}-sm{major}{minor}-{kind}-{mod.version}"


def check_dtype_supported(dtype: DType | str, compute_capability: tuple[int, int] | None) -> None:
    """ConfigError when the GPU cannot run ``dtype`` plans (no GPU: nothing to check)."""
    dtype = DType(dtype)
    if compute_capability is None:
        return
    need = MIN_CC[dtype]
    if tuple(compute_capability) < need:
        cc = ".".join(map(str, compute_capability))
        raise ConfigError(f"--dtype {dtype.value} needs a GPU of compute capability {need[0]}.{need[1]} or newer "
                          f"for TensorRT; this GPU is {cc}. Use --dtype fp16 (or --backend onnx)")


def profile_shapes(decl: SubgraphDecl, profile: Profile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input of ``decl`` under ``profile``."""
    return {t.name: (t.shape(profile.min), t.shape(profile.opt), t.shape(profile.max)) for t in decl.inputs}


@dataclasses.dataclass(frozen=True)
class PlanResult:
    name: str
    path: Path
    seconds: float
    size: int


class PlanBuilder:
    """Builds one plan per subgraph with shared profiles and a shared timing cache."""

    def __init__(self, build: BuildConfig, mod: TrtModule | None = None):
        self.build_config = build
        self.mod = mod or load_trt()
        trt = self.mod.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self._cache = None
        self._cache_config = self.builder.create_builder_config()
        blob = b""
        if build.timing_cache is not None and build.timing_cache.exists():
            blob = build.timing_cache.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TensorRT-RTX: timing cache is a no-op
            self._cache = self._cache_config.create_timing_cache(blob)

    def _network(self):
        trt = self.mod.trt
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        flags = 0 if strongly_typed is None else 1 << int(strongly_typed)
        return self.builder.create_network(flags), strongly_typed is not None

    def build(self, decl: SubgraphDecl, onnx_path: str | Path, plan_path: str | Path) -> PlanResult:
        """Parse ``onnx_path`` (external data is read relative to it), build, write ``plan_path``."""
        trt = self.mod.trt
        t0 = time.perf_counter()
        network, strongly_typed = self._network()
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"{decl.name}: {self.mod.name} {self.mod.version} could not parse {onnx_path}: "
                               f"{errors}. Re-export with this toolkit's dllm-export or report the error")
        config = self.builder.create_builder_config()
        if not strongly_typed:   # older TensorRT: allow the exported precision explicitly
            flag = {"fp16": "FP16", "bf16": "BF16"}.get(decl.outputs[0].dtype)
            if flag and hasattr(trt.BuilderFlag, flag):
                config.set_flag(getattr(trt.BuilderFlag, flag))
        if self.build_config.optimization_level is not None:
            config.builder_optimization_level = self.build_config.optimization_level
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            config.set_timing_cache(self._cache, False)
        for profile in self.build_config.profiles:
            p = self.builder.create_optimization_profile()
            for name, (lo, mid, hi) in profile_shapes(decl, profile).items():
                p.set_shape(name, lo, mid, hi)
            if config.add_optimization_profile(p) < 0:
                raise BackendError(f"{decl.name}: TensorRT rejected optimization profile {profile.name!r} "
                                   f"{profile_shapes(decl, profile)}")
        serialized = self.builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"{decl.name}: {self.mod.name} {self.mod.version} failed to build a plan from "
                               f"{onnx_path}; the TensorRT log above says why")
        plan_path = Path(plan_path)
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        with open(plan_path, "wb") as f:
            f.write(memoryview(serialized))
        return PlanResult(decl.name, plan_path, time.perf_counter() - t0, plan_path.stat().st_size)

    def save_timing_cache(self, path: str | Path | None = None) -> Path | None:
        """Write the shared timing cache (to ``path`` or BuildConfig.timing_cache); returns where."""
        path = Path(path) if path is not None else self.build_config.timing_cache
        if path is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            blob = self._cache.serialize()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(memoryview(blob))
        return path
