"""The TensorRT backend: a serialized plan per subgraph, run on torch tensors by address.

TensorRT 10 runtime API only (JetPack 6 ships 10.3), the same code for ``tensorrt`` and for
``tensorrt_rtx_bindings`` (TensorRT-RTX has the same runtime names). Per call, step by step:

1. pick the optimization profile whose ranges (the manifest's ``Profile`` entries, in build order)
   contain the call's ``B``/``k``/``N``; the tightest one wins (``cached`` for small k, ``refresh`` for k = N);
2. use that profile's execution context (one per profile, created on first use and switched to its
   profile once, so no profile switch happens per call);
3. give it the shared scratch memory (``set_device_memory``: every engine of a set runs in stream
   order, so one scratch buffer sized for the largest engine serves them all);
4. ``set_input_shape`` + ``set_tensor_address(name, tensor.data_ptr())`` for each input, and
   ``set_tensor_address`` for each preallocated output;
5. ``execute_async_v3(torch.cuda.current_stream().cuda_stream)``: enqueue on torch's stream, no host sync.

Needs an NVIDIA GPU. TensorRT-RTX plans do not deserialize on compute capability 9.0 (H100/H200).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dllm.errors import BackendError, EngineDirError
from dllm.engines.base import Engine
from dllm.exporter.manifest import Profile
from dllm.exporter.subgraphs import SubgraphDecl

TRT_INSTALL = ("pip install 'dllm-deploy[tensorrt]' (TensorRT 10; on Jetson use the JetPack TensorRT), or "
               "TensorRT-RTX: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
NEED_GPU = "TensorRT engines need an NVIDIA GPU; use --backend onnxruntime"


def import_tensorrt():
    """``tensorrt`` if importable, else ``tensorrt_rtx_bindings``; BackendError with install hints if neither."""
    errors = []
    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            module = __import__(name)
        except ImportError as e:   # the PyPI "tensorrt" stub can also fail deeper inside
            errors.append(f"{name}: {e}")
            continue
        if hasattr(module, "Runtime"):
            return module
        errors.append(f"{name}: no Runtime (an incomplete install)")
    raise BackendError(f"the tensorrt backend needs TensorRT, which is not importable here ({'; '.join(errors)}); "
                       f"install it with {TRT_INSTALL}")


def require_gpu(device: torch.device) -> None:
    if device.type != "cuda":
        raise BackendError(f"{NEED_GPU} (asked for device {device!s})")
    if not torch.cuda.is_available():
        raise BackendError(f"{NEED_GPU} (torch sees no CUDA device here; torch {torch.__version__})")


def _trt_dtypes(trt) -> dict:
    return {trt.DataType.FLOAT: "fp32", trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16",
            trt.DataType.INT32: "int32", trt.DataType.INT64: "int64"}


class DeviceScratch:
    """One device buffer shared by every TensorRT context of an engine set (they run in stream order)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = torch.empty(0, dtype=torch.uint8, device=device)

    def get(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            # Freed on the current stream: the caching allocator only reuses it after queued work.
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.buffer


def fits(profile: Profile, sizes: dict[str, int]) -> bool:
    return all(profile.min[d] <= n <= profile.max[d] for d, n in sizes.items() if d in profile.min)


def choose_profile(profiles: tuple[Profile, ...], sizes: dict[str, int]) -> int | None:
    """Index of the tightest profile (smallest max k, then N, then B) containing ``sizes``; None if none does."""
    order = sorted(range(len(profiles)), key=lambda i: tuple(profiles[i].max.get(d, 0) for d in ("k", "N", "B")))
    return next((i for i in order if fits(profiles[i], sizes)), None)


def describe(profiles: tuple[Profile, ...]) -> str:
    return "; ".join(f"{p.name}: " + ", ".join(f"{d} {p.min[d]}..{p.max[d]}" for d in p.min) for p in profiles)


class TrtEngine(Engine):
    """One subgraph as a TensorRT plan on a CUDA device."""

    def __init__(self, decl: SubgraphDecl, plan_path: str | os.PathLike, device: torch.device | str = "cuda",
                 profiles: tuple[Profile, ...] = (), scratch: DeviceScratch | None = None, trt=None):
        super().__init__(decl, device)
        require_gpu(self.device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.trt = trt or import_tensorrt()
        self.plan_path = Path(plan_path)
        if not self.plan_path.exists():
            raise EngineDirError(f"{decl.name}: plan {self.plan_path} is missing; rebuild with "
                                 "dllm-export --backend tensorrt on this machine")
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            major, minor = torch.cuda.get_device_capability(self.device)
            rtx = self.trt.__name__ == "tensorrt_rtx_bindings"
            hint = (" TensorRT-RTX plans do not deserialize on compute capability 9.0 (H100/H200); use "
                    "--backend onnxruntime there." if rtx and (major, minor) == (9, 0) else
                    " The plan was built for another GPU or TensorRT version; rebuild it on this machine.")
            raise BackendError(f"{decl.name}: {self.trt.__name__} could not deserialize {self.plan_path} on "
                               f"{torch.cuda.get_device_name(self.device)} (compute capability {major}.{minor}) "
                               f"(see the TensorRT log above).{hint}")
        self._check_io()
        n = self.engine.num_optimization_profiles
        if len(profiles) != n:
            raise EngineDirError(f"{decl.name}: plan {self.plan_path} has {n} optimization profiles, the manifest "
                                 f"lists {len(profiles)} ({[p.name for p in profiles]}); rebuild the plans")
        self.profiles = tuple(profiles)
        self._scratch = scratch or DeviceScratch(self.device)
        self._contexts: dict[int, object] = {}
        self._choice: dict[tuple, int] = {}

    def _check_io(self) -> None:
        trt, eng = self.trt, self.engine
        dtypes = _trt_dtypes(trt)
        got = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            mode = "input" if eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            got[name] = (mode, dtypes.get(eng.get_tensor_dtype(name), str(eng.get_tensor_dtype(name))))
        want = {t.name: ("input", t.dtype) for t in self.decl.inputs}
        want.update({t.name: ("output", t.dtype) for t in self.decl.outputs})
        if got != want:
            raise EngineDirError(f"{self.decl.name}: plan {self.plan_path} has I/O {got}, the manifest declares "
                                 f"{want}; the plan is stale, rebuild with dllm-export --backend tensorrt")

    # -- profiles and contexts -----------------------------------------------
    def _profile_for(self, sizes: dict[str, int]) -> int:
        key = tuple(sorted(sizes.items()))
        idx = self._choice.get(key)
        if idx is None:
            # Tightest range first: small-k calls land in "cached", k = N calls beyond it in "refresh".
            idx = choose_profile(self.profiles, sizes)
            if idx is None:
                raise BackendError(f"{self.decl.name}: sizes {sizes} are outside every optimization profile of "
                                   f"{self.plan_path.name} ({describe(self.profiles)}); re-export with a larger "
                                   "--max-seq-len or --max-batch (or ExportConfig.max_rows)")
            self._choice[key] = idx
        return idx

    def _context(self, idx: int, stream: int):
        ctx = self._contexts.get(idx)
        if ctx is None:
            trt = self.trt
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise BackendError(f"{self.decl.name}: TensorRT could not create an execution context "
                                   "(out of GPU memory?)")
            if not ctx.set_optimization_profile_async(idx, stream):
                raise BackendError(f"{self.decl.name}: TensorRT refused optimization profile {idx}")
            self._contexts[idx] = ctx
        return ctx

    def _scratch_size(self, idx: int) -> int:
        eng = self.engine
        if hasattr(eng, "get_device_memory_size_for_profile_v2"):     # TensorRT >= 10.1
            return eng.get_device_memory_size_for_profile_v2(idx)
        return eng.device_memory_size                                  # TensorRT 10.0 (all profiles)

    # -- run --------------------------------------------------------------
    def _run(self, feeds, out):
        sizes = self.dim_sizes(feeds)
        if out is None:
            out = self.allocate_outputs(sizes)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        idx = self._profile_for(sizes)
        ctx = self._context(idx, stream)
        nbytes = self._scratch_size(idx)
        scratch = self._scratch.get(nbytes)
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(scratch.data_ptr(), scratch.numel())
        else:
            ctx.device_memory = scratch.data_ptr()
        inputs = self.contiguous_inputs(feeds)   # holds any copies until the enqueued work has read them
        for name, x in inputs.items():
            ctx.set_input_shape(name, tuple(x.shape))
            ctx.set_tensor_address(name, x.data_ptr())
        for t in self.decl.outputs:
            ctx.set_tensor_address(t.name, out[t.name].data_ptr())
        if not ctx.execute_async_v3(stream):
            raise BackendError(f"{self.decl.name}: TensorRT execute_async_v3 failed for sizes {sizes} "
                               "(see the TensorRT log above)")
        return out
