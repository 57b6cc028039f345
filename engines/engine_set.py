"""EngineSet: every engine of one model on one backend, as the runtime sees them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dllm.spec import ModelSpec
from dllm.engines.base import Backend, Engine
from dllm.exporter.subgraphs import DType, build_module, declare, layer_name, vproj_name


@dataclasses.dataclass
class EngineSet:
    spec: ModelSpec
    dtype: DType
    backend: Backend
    device: torch.device
    engines: dict[str, Engine]
    tokenizer_dir: Path | None = None
    # torch on CUDA: the executor captures each layer's step (selection, engine, scatters) as a
    # CUDA graph per row-count shape and replays it (see runtime/executor.py)
    cuda_graphs: bool = False

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
                     cuda_graphs: bool = False) -> EngineSet:
    """Torch engines straight from a ``DiffusionLM`` or a ``Checkpoint`` (no engine directory needed).

    ``cuda_graphs`` (CUDA only): the executor replays per-layer CUDA graphs; see EngineSet.
    """
    from dllm.engines.torch_backend import TorchEngine

    from dllm.exporter.models.model import DiffusionLM

    from dllm.device import parse_device

    spec = source.spec
    dtype = DType(dtype)
    device = parse_device(device, "device")
    engines = {}
    for decl in declare(spec, dtype, with_vproj=with_vproj):
        module = build_module(decl, source, dtype)
        engines[decl.name] = TorchEngine(decl, module, device)
    if tokenizer_dir is None and not isinstance(source, DiffusionLM):
        tokenizer_dir = source.path
    dev = torch.device(device)
    return EngineSet(spec, dtype, Backend.TORCH, dev, engines, tokenizer_dir,
                     cuda_graphs=cuda_graphs and dev.type == "cuda")
