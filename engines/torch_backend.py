"""The torch backend: runs each subgraph's PyTorch module (the reference backend, CPU or CUDA).

CUDA graphs for this backend are captured one level up, per layer by the runtime's executor
(``EngineSet.cuda_graphs``), so the row selection and cache scatters around each engine call are
replayed together with it.
"""

from __future__ import annotations

import torch
from torch import nn

from dllm.engines.base import Engine
from dllm.exporter.subgraphs import SubgraphDecl


class TorchEngine(Engine):
    def __init__(self, decl: SubgraphDecl, module: nn.Module, device: torch.device | str = "cpu"):
        super().__init__(decl, device)
        self.module = module.to(self.device).eval()

    @torch.inference_mode()
    def _run(self, feeds, out):
        result = self.module(*(feeds[t.name] for t in self.decl.inputs))
        if isinstance(result, torch.Tensor):
            result = (result,)
        results = {t.name: r for t, r in zip(self.decl.outputs, result)}
        if out is None:
            return results
        for name, r in results.items():
            out[name].copy_(r)
        return out
