"""Subgraphs: the per-layer pieces an engine directory holds, with their I/O declared once as data.

docs/engine-dir.md documents them. Every consumer derives from ``SubgraphDecl``:
ONNX input/output names and dynamic axes, dummy inputs, TensorRT optimization profiles,
runtime feed checks and output allocation.

| subgraph  | inputs                                            | outputs                                  |
|-----------|---------------------------------------------------|------------------------------------------|
| embed     | ids [B,k] int32                                   | h [B,k,D]                                |
| layer_{i} | h_rows [B,k,D], pos [B,k] int32, kv_len [B] int32,| k_rows, v_rows [B,k,Hkv,hd] (k after RoPE)|
|           | k_cache, v_cache [B,N,Hkv,hd]                     | attn_rows, mlp_rows [B,k,D] (deltas)      |
| head      | h_rows [B,k,D]                                    | logits [B,k,V] (final norm + LM head)     |
| vproj_{i} | h_rows [B,k,D]                                    | v_rows [B,k,Hkv,hd] (value-proxy probe)   |

Dims named by strings are dynamic: ``B`` batch, ``k`` rows recomputed, ``N`` canvas length.

``kv_len`` is each sequence's length: sequences of different prompt lengths share a batch as canvases
``[prompt, generation, padding rows]`` of one length N (right padding); a layer never attends to keys
at canvas rows ``>= kv_len[b]``, and RoPE stays at ``pos`` (each sequence starts at row 0, exactly where
it sits alone). Engine directories of manifest schema 1 declare layers without ``kv_len``
(``declare(..., padded=False)``): one unpadded sequence.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
from torch import nn

from dllm.spec import ModelSpec

DYNAMIC_DIMS = ("B", "k", "N")
MODEL_DTYPE = "model"   # placeholder resolved to the export dtype


class DType(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


TORCH_DTYPES = {"int32": torch.int32, "int64": torch.int64, "fp32": torch.float32,
                "fp16": torch.float16, "bf16": torch.bfloat16}


class Kind(str, enum.Enum):
    EMBED = "embed"
    LAYER = "layer"
    HEAD = "head"
    VPROJ = "vproj"


@dataclasses.dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str                       # "int32" or a DType value ("fp32", "fp16", "bf16")
    dims: tuple[str | int, ...]      # strings are dynamic dims

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given dynamic sizes, e.g. {"B": 1, "k": 8, "N": 64}."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorDecl":
        return cls(d["name"], d["dtype"], tuple(d["dims"]))


@dataclasses.dataclass(frozen=True)
class SubgraphDecl:
    name: str                        # "embed", "layer_00", "head", "vproj_00"
    kind: Kind
    layer: int | None
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]

    @property
    def takes_kv_len(self) -> bool:
        """Whether the subgraph has the ``kv_len`` input (layers, except those of schema-1 engine directories)."""
        return any(t.name == "kv_len" for t in self.inputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export style dynamic axes, derived from the declaration."""
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in self.inputs + self.outputs}

    def dummy_inputs(self, sizes: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        """Random feeds of the declared dtypes; ``pos`` gets distinct positions < N, ids stay small, ``kv_len``
        mixes sequence lengths (``dummy_kv_len``)."""
        g = torch.Generator().manual_seed(seed)
        feeds = {}
        for t in self.inputs:
            shape = t.shape(sizes)
            if t.name == "pos":
                n = sizes["N"]
                rows = [torch.randperm(n, generator=g)[: shape[1]].sort().values for _ in range(shape[0])]
                feeds[t.name] = torch.stack(rows).to(torch.int32)
            elif t.name == "ids":
                feeds[t.name] = torch.randint(0, 16, shape, generator=g, dtype=torch.int32)
            elif t.name != "kv_len":
                feeds[t.name] = torch.randn(shape, generator=g).to(t.torch_dtype)
        if self.takes_kv_len:         # drawn last, so the other feeds are the same as without a kv_len input
            feeds["kv_len"] = dummy_kv_len(sizes["B"], sizes["N"], g)
        return {t.name: feeds[t.name] for t in self.inputs}

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind.value, "layer": self.layer,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "SubgraphDecl":
        return cls(d["name"], Kind(d["kind"]), d.get("layer"),
                   tuple(TensorDecl.from_dict(t) for t in d["inputs"]),
                   tuple(TensorDecl.from_dict(t) for t in d["outputs"]))


def dummy_kv_len(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """[B] int32 sequence lengths for test feeds: the whole canvas at batch 1 (the common case, which must
    stay exact); mixed in a batch: the first sequence unpadded, the last with the most padding (when the
    canvas allows), the rest drawn. At most half the canvas is padding, so every sequence keeps real keys."""
    if batch == 1:
        return torch.full((1,), n, dtype=torch.int32)
    most = (n - 1) // 2
    kv_len = n - torch.randint(0, most + 1, (batch,), generator=g, dtype=torch.int32)
    kv_len[0], kv_len[-1] = n, n - most
    return kv_len


def layer_name(i: int) -> str:
    return f"layer_{i:02d}"


def vproj_name(i: int) -> str:
    return f"vproj_{i:02d}"


def declare(spec: ModelSpec, dtype: DType | str, with_vproj: bool = False, padded: bool = True
            ) -> list[SubgraphDecl]:
    """All subgraphs of a model, in execution order: embed, layer_00.., head, [vproj_00..].

    ``padded``: layers take ``kv_len`` (what every export writes); False declares the layers of schema-1
    engine directories, which have no ``kv_len`` input and serve one unpadded sequence.
    """
    dt = DType(dtype).value
    D, Hkv, hd, V = spec.d_model, spec.n_kv_heads, spec.head_dim, spec.vocab_size
    rows = TensorDecl("h_rows", dt, ("B", "k", D))
    kv_rows = lambda n: TensorDecl(n, dt, ("B", "k", Hkv, hd))  # noqa: E731
    kv_len = (TensorDecl("kv_len", "int32", ("B",)),) if padded else ()
    out = [SubgraphDecl("embed", Kind.EMBED, None, (TensorDecl("ids", "int32", ("B", "k")),),
                        (TensorDecl("h", dt, ("B", "k", D)),))]
    for i in range(spec.n_layers):
        out.append(SubgraphDecl(
            layer_name(i), Kind.LAYER, i,
            (rows, TensorDecl("pos", "int32", ("B", "k")), *kv_len,
             TensorDecl("k_cache", dt, ("B", "N", Hkv, hd)), TensorDecl("v_cache", dt, ("B", "N", Hkv, hd))),
            (kv_rows("k_rows"), kv_rows("v_rows"),
             TensorDecl("attn_rows", dt, ("B", "k", D)), TensorDecl("mlp_rows", dt, ("B", "k", D)))))
    out.append(SubgraphDecl("head", Kind.HEAD, None, (rows,), (TensorDecl("logits", dt, ("B", "k", V)),)))
    if with_vproj:
        out += [SubgraphDecl(vproj_name(i), Kind.VPROJ, i, (rows,), (kv_rows("v_rows"),))
                for i in range(spec.n_layers)]
    return out


# -- the PyTorch modules behind each subgraph (what gets exported, and the torch backend) --------

class EmbedModule(nn.Module):
    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids.long())                                   # [B, k, D]


class LayerModule(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, h_rows, pos, kv_len, k_cache, v_cache):
        return self.layer.forward_rows(h_rows, pos, kv_len, k_cache, v_cache)


class UnpaddedLayer(nn.Module):
    """A layer module as schema-1 engine directories declare it: no ``kv_len`` input, i.e. no padding
    (kv_len = N masks nothing, so this is exactly the layer of that schema)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.writes_cache = bool(getattr(inner, "writes_cache", False))

    @property
    def layer(self) -> nn.Module:
        """The decoder layer inside (as ``LayerModule.layer``)."""
        return self.inner.layer

    def forward(self, h_rows, pos, k_cache, v_cache):
        kv_len = torch.full((h_rows.shape[0],), k_cache.shape[1], dtype=torch.int32, device=h_rows.device)  # [B]
        return self.inner(h_rows, pos, kv_len, k_cache, v_cache)


class HeadModule(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, h_rows: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_rows))                          # [B, k, V]


class VProjModule(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, h_rows: torch.Tensor) -> torch.Tensor:
        return self.layer.value_rows(h_rows)                            # [B, k, Hkv, hd]


def build_module(decl: SubgraphDecl, source, dtype: DType | str) -> nn.Module:
    """The PyTorch module of one subgraph (a layer declared without ``kv_len`` gets ``UnpaddedLayer``).

    ``source`` is a ``Checkpoint`` (loads only this subgraph's weights: bounded memory)
    or a loaded ``DiffusionLM``.
    """
    tdt = DType(dtype).torch
    from dllm.exporter.models.model import DiffusionLM

    if isinstance(source, DiffusionLM):
        model = source.to(tdt)
        get_layer, embed, norm, head = (lambda i: model.layers[i]), model.embed, model.norm, model.lm_head
        if decl.kind == Kind.EMBED:
            return EmbedModule(embed).eval()
        if decl.kind == Kind.HEAD:
            return HeadModule(norm, head).eval()
        layer = get_layer(decl.layer)
    else:
        if decl.kind == Kind.EMBED:
            return EmbedModule(source.load_embed(tdt)).eval()
        if decl.kind == Kind.HEAD:
            return HeadModule(source.load_norm(tdt), source.load_head(tdt)).eval()
        layer = source.load_layer(decl.layer, tdt)
    if decl.kind == Kind.VPROJ:
        return VProjModule(layer).eval()
    return (LayerModule(layer) if decl.takes_kv_len else UnpaddedLayer(LayerModule(layer))).eval()
