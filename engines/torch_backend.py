"""The torch backend: runs each subgraph's PyTorch module (the reference backend, CPU or CUDA).

CUDA graphs for this backend are captured one level up, by the runtime's executor
(``EngineSet.cuda_graphs``), so the row selection and cache scatters around each engine call are
replayed together with it. With a fused kernel path the layer and head modules are those of
engines/torch_fused.py.
"""

from __future__ import annotations

import torch
from torch import nn

from dllm.engines.base import Engine
from dllm.exporter.subgraphs import SubgraphDecl


class TorchEngine(Engine):
    partial_out = True

    def __init__(self, decl: SubgraphDecl, module: nn.Module, device: torch.device | str = "cpu"):
        super().__init__(decl, device)
        self.module = module.to(self.device).eval()
        # fused layers (engines/torch_fused.py) write their key/value rows into the caches they are fed
        self.writes_cache = bool(getattr(module, "writes_cache", False))

    @torch.inference_mode()
    def _run(self, feeds, out):
        result = self.module(*(feeds[t.name] for t in self.decl.inputs))
        if isinstance(result, torch.Tensor):
            result = (result,)
        results = {t.name: r for t, r in zip(self.decl.outputs, result)}
        if out is None:
            return results
        for name, buf in out.items():
            buf.copy_(results[name])
        return {**results, **out}
