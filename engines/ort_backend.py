"""The ONNX Runtime backend: one ``InferenceSession`` per subgraph, tensors bound by pointer.

Run path (the same on CPU and CUDA, only the device and provider differ):

1. every feed and every output buffer is a torch tensor on the engine's device;
2. ``IOBinding.bind_input`` / ``bind_output`` get its ``data_ptr()``, shape, ONNX element type and
   device, so ONNX Runtime reads and writes torch memory directly (no numpy, no copies);
3. ``run_with_iobinding`` runs the session.

Element types are passed as ONNX ``TensorProto`` enum integers, which the Python binding accepts
next to numpy dtypes; that is how bf16 (which numpy lacks) is bound.

CUDA (``device="cuda"``, needs ``onnxruntime-gpu``): the session is created with
``user_compute_stream`` set to torch's current stream on that device, and every run sets the run
option ``disable_synchronize_execution_providers=1``, so a call enqueues kernels on torch's stream
and returns without waiting: no host synchronisation per call. Calls made while another torch
stream is current are ordered against it with stream waits (device-side, no host sync).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path

import torch

from dllm.errors import BackendError, ConfigError, EngineDirError
from dllm.engines.base import Engine
from dllm.threads import default_threads
from dllm.exporter.subgraphs import SubgraphDecl

ORT_INSTALL_CPU = "pip install onnxruntime"
ORT_INSTALL_GPU = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"

# ONNX TensorProto.DataType values (stable in the ONNX spec), by torch dtype.
ONNX_ELEMENT_TYPES = {
    torch.float32: 1,    # FLOAT
    torch.uint8: 2,      # UINT8
    torch.int8: 3,       # INT8
    torch.int32: 6,      # INT32
    torch.int64: 7,      # INT64
    torch.bool: 9,       # BOOL
    torch.float16: 10,   # FLOAT16
    torch.bfloat16: 16,  # BFLOAT16
}

# Weight-only quantized graphs (DequantizeLinear -> MatMul) are fused by ONNX Runtime into MatMulNBits, which
# on the CPU by default also quantizes the activations to int8 (accuracy level 4); level 1 keeps fp32
# arithmetic, so a graph computes what it says (weight-only, as TensorRT runs it).
MATMULNBITS_ACCURACY = ("session.qdq_matmulnbits_accuracy_level", "1")

# ONNX Runtime's type strings (NodeArg.type), by the declaration's dtype names.
ORT_TYPE_STRINGS = {"fp32": "tensor(float)", "fp16": "tensor(float16)", "bf16": "tensor(bfloat16)",
                    "int32": "tensor(int32)", "int64": "tensor(int64)"}


class GraphOptimization(str, enum.Enum):
    """ONNX Runtime graph optimization levels."""
    DISABLED = "disabled"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"


@dataclasses.dataclass(frozen=True)
class OrtOptions:
    """Session settings of the ONNX Runtime backend.

    intra_op_threads: threads per operator; None: ``dllm.threads.default_threads()``; 0 lets ONNX Runtime
        use every physical core.
    allow_spinning: let idle pool threads busy-wait for the next operator. Off by default: a pipeline
        holds one session per subgraph, and spinning pools of many sessions starve each other (and any
        other process) on a small or loaded CPU; the latency spinning saves is a few microseconds.
    optimized_model_dir: when set, each session's optimized graph is saved there on first load and
        loaded from there (with optimizations off) afterwards; keyed by provider, ORT version and level,
        invalidated when the source ONNX file is newer.
    cuda_provider_options: extra CUDA provider options (e.g. {"arena_extend_strategy": "kSameAsRequested"}).
    use_torch_stream: CUDA only; run on torch's current stream without a host sync per call. When off,
        ORT uses its own stream and each call synchronizes (torch's stream before, ORT's after): slow but simple.
    """
    intra_op_threads: int | None = None
    inter_op_threads: int = 1
    allow_spinning: bool = False
    graph_optimization: GraphOptimization = GraphOptimization.ALL
    optimized_model_dir: Path | None = None
    cuda_provider_options: tuple[tuple[str, str], ...] = ()
    use_torch_stream: bool = True
    log_severity: int = 3          # 0 verbose .. 4 fatal

    def __post_init__(self):
        if self.intra_op_threads is None:
            object.__setattr__(self, "intra_op_threads", default_threads())
        object.__setattr__(self, "graph_optimization", GraphOptimization(self.graph_optimization))
        if self.optimized_model_dir is not None:
            object.__setattr__(self, "optimized_model_dir", Path(self.optimized_model_dir))
        if isinstance(self.cuda_provider_options, dict):
            object.__setattr__(self, "cuda_provider_options",
                               tuple(sorted((str(k), str(v)) for k, v in self.cuda_provider_options.items())))
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError(f"OrtOptions threads must be >= 0 (0 = ONNX Runtime default), got "
                              f"intra_op_threads={self.intra_op_threads}, inter_op_threads={self.inter_op_threads}")
        if not 0 <= self.log_severity <= 4:
            raise ConfigError(f"OrtOptions.log_severity must be 0..4, got {self.log_severity}")
        if "user_compute_stream" in dict(self.cuda_provider_options):
            raise ConfigError("set use_torch_stream instead of cuda_provider_options['user_compute_stream']: "
                              "the backend binds the session to torch's current stream itself")


def import_onnxruntime():
    """``import onnxruntime`` with an install hint instead of an ImportError."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(f"the onnxruntime backend needs the onnxruntime package, which is not importable "
                           f"here ({e}); install it with `{ORT_INSTALL_CPU}` (CPU) or `{ORT_INSTALL_GPU}` "
                           "(NVIDIA GPU)") from None
    return onnxruntime


def _providers(ort, device: torch.device, options: OrtOptions) -> list:
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise BackendError(f"the onnxruntime backend runs on 'cpu' or 'cuda', got device {device}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendError(f"device {device} needs ONNX Runtime's CUDA provider, but this onnxruntime "
                           f"({ort.__version__}) only has {ort.get_available_providers()}; install it with "
                           f"`{ORT_INSTALL_GPU}`, or use device='cpu'")
    if not torch.cuda.is_available():
        raise BackendError(f"device {device} needs a CUDA build of torch (the engine's tensors live in torch); "
                           f"this torch {torch.__version__} sees no CUDA device")
    cuda_opts = {"device_id": str(device.index or 0), **dict(options.cuda_provider_options)}
    if options.use_torch_stream:
        # ORT enqueues on this stream; handle 0 is the legacy default stream, which is what torch uses too.
        cuda_opts["user_compute_stream"] = str(torch.cuda.current_stream(device).cuda_stream)
    return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]


def _session_options(ort, options: OrtOptions):
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        GraphOptimization.DISABLED: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        GraphOptimization.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        GraphOptimization.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        GraphOptimization.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.graph_optimization]
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if options.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.log_severity_level = options.log_severity
    so.add_session_config_entry(*MATMULNBITS_ACCURACY)
    return so


def _cached_model_path(onnx_path: Path, device: torch.device, ort, options: OrtOptions) -> Path:
    tag = f"{device.type}-ort{ort.__version__}-{options.graph_optimization.value}"
    return options.optimized_model_dir / f"{onnx_path.stem}.{tag}.onnx"


class OrtEngine(Engine):
    """One subgraph in an ONNX Runtime session (CPU provider, or CUDA with ``onnxruntime-gpu``)."""

    def __init__(self, decl: SubgraphDecl, onnx_path: str | os.PathLike, device: torch.device | str = "cpu",
                 options: OrtOptions | None = None):
        super().__init__(decl, device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.onnx_path = Path(onnx_path)
        self.options = options or OrtOptions()
        ort = import_onnxruntime()
        if not self.onnx_path.exists():
            raise EngineDirError(f"{decl.name}: ONNX file {self.onnx_path} is missing; re-run dllm-export")
        self.session = self._create_session(ort)
        self._check_session_io()
        self._binding = self.session.io_binding()
        self._bound: dict[str, tuple] = {}
        self._run_options = ort.RunOptions()
        self._stream = None
        if self.device.type == "cuda" and self.options.use_torch_stream:
            self._stream = torch.cuda.current_stream(self.device)
            # Return from run() as soon as the kernels are enqueued (the default waits on the stream).
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._device_type = self.device.type
        self._device_id = self.device.index or 0

    # -- setup ------------------------------------------------------------
    def _create_session(self, ort):
        opts = self.options
        so = _session_options(ort, opts)
        providers = _providers(ort, self.device, opts)
        model_path = self.onnx_path
        if opts.optimized_model_dir is not None:
            cached = _cached_model_path(self.onnx_path, self.device, ort, opts)
            if cached.exists() and cached.stat().st_mtime >= self.onnx_path.stat().st_mtime:
                model_path = cached   # already optimized for this provider and level
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            else:
                cached.parent.mkdir(parents=True, exist_ok=True)
                so.optimized_model_filepath = str(cached)
                # Weights go to a side file so graphs over 2 GB can be saved too.
                so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                            cached.name + ".data")
                so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                            "1024")
        try:
            session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as e:   # ORT raises its own pybind exception types (Fail, NotImplemented, ...)
            hint = "re-export the subgraph with dllm-export"
            if self.device.type == "cpu" and "bf16" in {t.dtype for t in self.decl.inputs + self.decl.outputs}:
                hint = ("ONNX Runtime's CPU provider has no bf16 kernels (e.g. MatMul); export fp32 or fp16 "
                        "for CPU (dllm-export --dtype fp32), or run bf16 on device='cuda' with onnxruntime-gpu")
            raise BackendError(f"{self.decl.name}: ONNX Runtime could not load {model_path} on {self.device} "
                               f"({type(e).__name__}: {str(e).strip()[:500]}); {hint}") from None
        if self.device.type == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendError(f"{self.decl.name}: ONNX Runtime fell back to {session.get_providers()} instead of "
                               "the CUDA provider (CUDA or cuDNN libraries not found?); check `nvidia-smi` and the "
                               f"onnxruntime-gpu install (`{ORT_INSTALL_GPU}`)")
        return session

    def _check_session_io(self) -> None:
        for kind, declared, actual in (("inputs", self.decl.inputs, self.session.get_inputs()),
                                       ("outputs", self.decl.outputs, self.session.get_outputs())):
            got = {a.name: a.type for a in actual}
            want = {t.name: ORT_TYPE_STRINGS[t.dtype] for t in declared}
            if got != want:
                raise EngineDirError(f"{self.decl.name}: {self.onnx_path} has {kind} {got}, the manifest declares "
                                     f"{want}; the ONNX file and manifest.json disagree, re-run dllm-export")

    # -- run --------------------------------------------------------------
    def _bind(self, bind, name: str, t: torch.Tensor) -> None:
        # an IOBinding keeps its bindings between runs: re-bind only what moved or changed shape
        # (the executor's persistent caches and buffers mostly do not; this is ~40% of a small call)
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        slot = (bind.__name__, name)
        if self._bound.get(slot) == key:
            return
        bind(name, self._device_type, self._device_id, ONNX_ELEMENT_TYPES[t.dtype], key[1], key[0])
        self._bound[slot] = key

    def _run(self, feeds, out):
        if out is None:
            out = self.allocate_outputs(self.dim_sizes(feeds))
        binding = self._binding
        inputs = self.contiguous_inputs(feeds)   # holds any copies until the run has read them
        for name, x in inputs.items():
            self._bind(binding.bind_input, name, x)
        for t in self.decl.outputs:
            self._bind(binding.bind_output, t.name, out[t.name])
        if self._stream is None:
            if self._device_type == "cuda":
                # ORT runs on its own stream here: the feeds' pending writes on torch's stream must land first.
                torch.cuda.current_stream(self.device).synchronize()
            self.session.run_with_iobinding(binding, self._run_options)   # returns after ORT synced its stream
            return out
        current = torch.cuda.current_stream(self.device)
        if current == self._stream:
            self.session.run_with_iobinding(binding, self._run_options)
        else:
            # Order ORT's stream after the caller's work and the caller's stream after ORT's (device-side waits).
            self._stream.wait_stream(current)
            self.session.run_with_iobinding(binding, self._run_options)
            current.wait_stream(self._stream)
        return out
