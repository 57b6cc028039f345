"""The one engine interface every backend implements.

An ``Engine`` runs one compiled subgraph. Feeds and outputs are torch tensors on the
backend's device. The base class checks feeds against the subgraph's declaration the
first time each shape signature is seen, with messages that say what arrived and what
was expected; backends implement ``_run``.
"""

from __future__ import annotations

import abc
import enum

import torch

from dllm.errors import BackendError
from dllm.exporter.subgraphs import SubgraphDecl


class Backend(str, enum.Enum):
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Engine(abc.ABC):
    # True when a layer engine also writes its k/v rows into the k_cache/v_cache it is fed (the torch
    # backend's fused layers); the executor then skips its own scatter of them
    writes_cache = False
    # True when ``run`` accepts buffers for some outputs only (the rest come back freshly allocated)
    partial_out = False

    def __init__(self, decl: SubgraphDecl, device: torch.device | str = "cpu"):
        self.decl = decl
        self.device = torch.device(device)
        self._checked: set[tuple] = set()

    @property
    def inputs(self):
        return self.decl.inputs

    @property
    def outputs(self):
        return self.decl.outputs

    def check_feeds(self, feeds: dict[str, torch.Tensor]) -> dict[str, int]:
        """Validate names, dtypes, ranks, static dims and dynamic-dim consistency; returns the dim sizes."""
        expected = {t.name for t in self.decl.inputs}
        if set(feeds) != expected:
            raise BackendError(f"{self.decl.name}: feeds {sorted(feeds)} do not match the declared inputs "
                               f"{sorted(expected)}")
        sizes: dict[str, int] = {}
        for t in self.decl.inputs:
            x = feeds[t.name]
            if not isinstance(x, torch.Tensor):
                raise BackendError(f"{self.decl.name}.{t.name}: expected a torch.Tensor, got {type(x).__name__}")
            if x.dtype != t.torch_dtype:
                raise BackendError(f"{self.decl.name}.{t.name}: dtype {x.dtype}, expected {t.torch_dtype}")
            if x.dim() != len(t.dims):
                raise BackendError(f"{self.decl.name}.{t.name}: shape {list(x.shape)}, expected rank "
                                   f"{len(t.dims)} {list(t.dims)}")
            if x.device != self.device and not (x.device.type == self.device.type and self.device.index is None):
                raise BackendError(f"{self.decl.name}.{t.name}: on {x.device}, the engine runs on {self.device}")
            for d, n in zip(t.dims, x.shape):
                if isinstance(d, int) and d != n:
                    raise BackendError(f"{self.decl.name}.{t.name}: shape {list(x.shape)}, expected {list(t.dims)}")
                if isinstance(d, str) and sizes.setdefault(d, n) != n:
                    raise BackendError(f"{self.decl.name}.{t.name}: dim {d}={n} disagrees with {d}={sizes[d]} "
                                       "of an earlier input")
        return sizes

    def dim_sizes(self, feeds: dict[str, torch.Tensor]) -> dict[str, int]:
        """The dynamic dim sizes of already-checked feeds (no validation; cheap enough per call)."""
        sizes: dict[str, int] = {}
        for t in self.decl.inputs:
            for d, n in zip(t.dims, feeds[t.name].shape):
                if isinstance(d, str):
                    sizes[d] = n
        return sizes

    def check_outputs(self, out: dict[str, torch.Tensor], sizes: dict[str, int]) -> None:
        """Validate preallocated output buffers: every declared name (a subset where the backend allows
        it, see ``partial_out``), shape, dtype, device, contiguous."""
        declared = {o.name for o in self.decl.outputs}
        unknown = sorted(set(out) - declared)
        if unknown:
            raise BackendError(f"{self.decl.name}: output buffers {unknown} are not outputs of this subgraph; "
                               f"expected {sorted(declared)}")
        for t in self.decl.outputs:
            shape = t.shape(sizes)
            if t.name not in out:
                if self.partial_out:
                    continue
                raise BackendError(f"{self.decl.name}: output buffers {sorted(out)} lack {t.name!r}; "
                                   f"expected {sorted(o.name for o in self.decl.outputs)}")
            x = out[t.name]
            if tuple(x.shape) != shape:
                raise BackendError(f"{self.decl.name}: output buffer {t.name!r} has shape {list(x.shape)}, "
                                   f"expected {list(shape)}")
            if x.dtype != t.torch_dtype:
                raise BackendError(f"{self.decl.name}: output buffer {t.name!r} has dtype {x.dtype}, "
                                   f"expected {t.torch_dtype}")
            if x.device.type != self.device.type or (self.device.index is not None and x.device != self.device):
                raise BackendError(f"{self.decl.name}: output buffer {t.name!r} is on {x.device}, "
                                   f"the engine runs on {self.device}")
            if not x.is_contiguous():
                raise BackendError(f"{self.decl.name}: output buffer {t.name!r} is not contiguous; "
                                   "backends write through its data pointer, pass a contiguous tensor")

    def output_shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(sizes) for t in self.decl.outputs}

    def contiguous_inputs(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every declared input as a contiguous tensor, for backends that bind by data pointer. Strided
        feeds are copied; keep the returned dict alive until the run has finished reading them."""
        return {t.name: feeds[t.name].contiguous() for t in self.decl.inputs}

    def allocate_outputs(self, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        return {t.name: torch.empty(t.shape(sizes), dtype=t.torch_dtype, device=self.device)
                for t in self.decl.outputs}

    def run(self, feeds: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None
            ) -> dict[str, torch.Tensor]:
        """Run the subgraph. ``out`` (optional) holds preallocated output tensors to write into."""
        signature = tuple((k, v.dtype, tuple(v.shape), v.device) if isinstance(v, torch.Tensor) else (k, type(v))
                          for k, v in sorted(feeds.items()))
        if out is not None:
            signature += tuple((k, v.dtype, tuple(v.shape), v.device, v.is_contiguous())
                               for k, v in sorted(out.items()))
        if signature not in self._checked:
            sizes = self.check_feeds(feeds)
            if out is not None:
                self.check_outputs(out, sizes)
            self._checked.add(signature)
        return self._run(feeds, out)

    @abc.abstractmethod
    def _run(self, feeds: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        ...
