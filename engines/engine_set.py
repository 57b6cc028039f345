"""EngineSet: every engine of one model on one backend, as the runtime sees them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dllm.spec import ModelSpec
from dllm.threads import resolve_threads, torch_threads_for
from dllm.engines.base import Backend, Engine
from dllm.exporter.subgraphs import DType, Kind, UnpaddedLayer, build_module, declare, layer_name, vproj_name
from dllm.kernels import KernelPath, make_ops


@dataclasses.dataclass
class EngineSet:
    spec: ModelSpec
    dtype: DType
    backend: Backend
    device: torch.device
    engines: dict[str, Engine]
    tokenizer_dir: Path | None = None
    # torch on CUDA: the executor captures whole steps (and, where a step's shape is new, single layers)
    # as CUDA graphs and replays them (see runtime/executor.py)
    cuda_graphs: bool = False
    # with cuda_graphs: DCU's layers run bucketed row counts (a budget that moves keeps the graphs' shapes;
    # see runtime/executor.py); False: exact row counts (dllm-bench --no-row-buckets, for comparison)
    row_buckets: bool = True
    # with row_buckets: a step runs one bucket (its largest) in every DCU layer when that costs at most this
    # many times the rows of each layer's own bucket, so the whole step replays as one graph; inf: always
    # (on a GPU a memory-bound layer's padding rows cost little), 1: only when it costs nothing
    step_bucket_slack: float = 1.25
    # CPU threads of one generation (dllm.threads): ONNX Runtime's intra-op threads, or torch's with
    # the torch backend on the CPU; None: the default
    threads: int | None = None
    # the fused work around the engines (dllm.kernels.KernelOps: Triton kernels or their torch twins);
    # None: the plain unfused path
    ops: object | None = None
    # the largest batch B the engines were exported for (the manifest's ``max_batch``; 1 for schema-1
    # directories, whose layers take no padding); None: no limit (torch engines straight from a checkpoint)
    max_batch: int | None = None

    def __post_init__(self):
        layer = self.engines.get(layer_name(0))
        if layer is not None and not layer.decl.takes_kv_len:
            self.max_batch = 1          # layers without kv_len take one sequence whatever the caller says

    @property
    def torch_threads(self) -> int | None:
        """Torch's CPU threads while these engines decode (None: leave torch alone)."""
        threads = resolve_threads(self.threads, self.backend.value)
        return torch_threads_for(self.backend.value, torch.device(self.device).type, threads)

    @property
    def kernel_path(self) -> KernelPath:
        return KernelPath.PLAIN if self.ops is None else self.ops.path

    @property
    def embed(self) -> Engine:
        return self.engines["embed"]

    @property
    def head(self) -> Engine:
        return self.engines["head"]

    def layer(self, i: int) -> Engine:
        return self.engines[layer_name(i)]

    def vproj(self, i: int) -> Engine | None:
        """The value-proxy probe of layer i, or None where the engine directory has none."""
        return self.engines.get(vproj_name(i))

    @property
    def has_vproj(self) -> bool:
        return vproj_name(0) in self.engines


def torch_engine_set(source, dtype: DType | str = "fp32", device: str | torch.device = "cpu",
                     with_vproj: bool = True, tokenizer_dir: Path | None = None,
                     cuda_graphs: bool = False, threads: int | None = None,
                     kernels: KernelPath | str = KernelPath.AUTO) -> EngineSet:
    """Torch engines straight from a ``DiffusionLM`` or a ``Checkpoint`` (no engine directory needed).

    ``cuda_graphs`` (CUDA only): the executor replays CUDA graphs of whole steps; see EngineSet.
    ``threads``: torch's CPU threads while decoding on the CPU (``dllm.threads``; None: the default).
    ``kernels``: ``auto`` (Triton on CUDA, torch twins elsewhere), ``triton``, ``torch`` or ``plain``
    (see dllm.kernels.KernelPath); the fused paths also fuse the layers' own norms, RoPE and MLP gate.
    """
    from dllm.device import parse_device
    from dllm.engines.torch_backend import TorchEngine
    from dllm.exporter.models.model import DiffusionLM

    spec = source.spec
    dtype = DType(dtype)
    dev = parse_device(device, "device")
    ops = make_ops(kernels, dev)
    engines = {decl.name: TorchEngine(decl, torch_module(decl, source, dtype, ops), dev)
               for decl in declare(spec, dtype, with_vproj=with_vproj)}
    if tokenizer_dir is None and not isinstance(source, DiffusionLM):
        tokenizer_dir = source.path
    return EngineSet(spec, dtype, Backend.TORCH, dev, engines, tokenizer_dir,
                     cuda_graphs=cuda_graphs and dev.type == "cuda", threads=resolve_threads(threads, "torch"),
                     ops=ops)


def torch_module(decl, source, dtype: DType | str, ops=None):
    """The torch backend's module for one subgraph: the exported module, or with ``ops`` (KernelOps) its
    fused twin for layers and the head (engines/torch_fused.py). Layers declared without ``kv_len`` (schema-1
    engine directories) run unpadded (``UnpaddedLayer``)."""
    from dllm.engines.torch_fused import FusedHeadModule, FusedLayerModule

    module = build_module(decl, source, dtype)
    if ops is not None and decl.kind == Kind.LAYER:
        fused = FusedLayerModule(module.layer, ops)
        return fused if decl.takes_kv_len else UnpaddedLayer(fused)
    if ops is not None and decl.kind == Kind.HEAD:
        return FusedHeadModule(module.norm, module.lm_head, ops)
    return module
