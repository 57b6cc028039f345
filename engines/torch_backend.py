"""The torch backend: runs each subgraph's PyTorch module (the reference backend, CPU or CUDA).

On CUDA it can capture one CUDA graph per input shape signature (``cuda_graphs=True``): the
runtime pads row counts to a few buckets, so a run compiles a handful of graphs per layer and
each later call is one input copy plus one graph replay instead of dozens of kernel launches.
"""

from __future__ import annotations

import torch
from torch import nn

from dllm.engines.base import Engine
from dllm.exporter.subgraphs import SubgraphDecl


class _Graph:
    """One captured CUDA graph with its static input and output tensors."""

    def __init__(self, module: nn.Module, decl: SubgraphDecl, feeds: dict[str, torch.Tensor]):
        self.inputs = {name: t.clone() for name, t in feeds.items()}
        args = [self.inputs[t.name] for t in decl.inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):     # warm-up outside capture (lazy inits, cuBLAS handles)
            module(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            result = module(*args)
        self.outputs = (result,) if isinstance(result, torch.Tensor) else tuple(result)

    def replay(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for name, t in feeds.items():
            static = self.inputs[name]
            if static.data_ptr() != t.data_ptr():
                static.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.outputs


class TorchEngine(Engine):
    def __init__(self, decl: SubgraphDecl, module: nn.Module, device: torch.device | str = "cpu",
                 cuda_graphs: bool = False):
        super().__init__(decl, device)
        self.module = module.to(self.device).eval()
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple, _Graph] = {}

    @torch.inference_mode()
    def _run(self, feeds, out):
        if self.cuda_graphs:
            key = tuple((name, tuple(t.shape)) for name, t in sorted(feeds.items()))
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = _Graph(self.module, self.decl, feeds)
            # Outputs alias the graph's static buffers: valid until this engine runs this shape again.
            result = graph.replay(feeds)
        else:
            result = self.module(*(feeds[t.name] for t in self.decl.inputs))
            if isinstance(result, torch.Tensor):
                result = (result,)
        results = {t.name: r for t, r in zip(self.decl.outputs, result)}
        if out is None:
            return results
        for name, r in results.items():
            out[name].copy_(r)
        return out

    @property
    def graphs_captured(self) -> int:
        return len(self._graphs)
