"""Read a Hugging Face checkpoint directory of LLaDA or Dream, tensor by tensor.

Layout: ``config.json``, ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``, and tokenizer
files. Nothing is downloaded and no remote code runs.

Weights stream: safetensors headers are parsed up front (names, dtypes, shapes, and a
truncation check), then each module is allocated empty and filled one tensor at a time,
so an 8B checkpoint never sits in memory twice and the exporter can load layer by layer.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dllm.errors import CheckpointError, ConfigError
from dllm.spec import Arch, ModelSpec
from dllm.exporter.models.layers import DecoderLayer, RMSNorm
from dllm.exporter.models.model import DiffusionLM

# Known defaults when config.json does not say.
LLADA_MASK_ID, LLADA_EOS_IDS = 126336, (126081, 126348)
DREAM_MASK_ID, DREAM_EOS_IDS = 151666, (151643, 151645)

# internal layer parameter -> HF name suffix, per architecture
_LLADA_LAYER = {
    "attn_norm.weight": "attn_norm.weight", "q_proj.weight": "q_proj.weight",
    "k_proj.weight": "k_proj.weight", "v_proj.weight": "v_proj.weight",
    "o_proj.weight": "attn_out.weight", "mlp_norm.weight": "ff_norm.weight",
    "gate_proj.weight": "ff_proj.weight", "up_proj.weight": "up_proj.weight",
    "down_proj.weight": "ff_out.weight",
}
_DREAM_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight", "q_proj.bias": "self_attn.q_proj.bias",
    "k_proj.weight": "self_attn.k_proj.weight", "k_proj.bias": "self_attn.k_proj.bias",
    "v_proj.weight": "self_attn.v_proj.weight", "v_proj.bias": "self_attn.v_proj.bias",
    "o_proj.weight": "self_attn.o_proj.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "gate_proj.weight": "mlp.gate_proj.weight", "up_proj.weight": "mlp.up_proj.weight",
    "down_proj.weight": "mlp.down_proj.weight",
}

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class HFNames:
    """Where each part of the model lives in the checkpoint."""
    embed: str
    layer_prefix: str        # format with i
    layer_map: dict
    norm: str
    head: str
    tied: bool


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a checkpoint directory needs {what}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or rewrite {what}") from None


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _eos_list(value, default: tuple[int, ...], vocab: int) -> tuple[int, ...]:
    """EOS ids from config.json, plus the family's known end-of-turn ids that fit the vocabulary.

    Real LLaDA configs name only <|endoftext|> (126081), yet Instruct answers end with
    <|eot_id|> (126348); Dream's name 151643 but turns end with <|im_end|> (151645).
    """
    ids = list(default) if value is None else (list(value) if isinstance(value, (list, tuple)) else [int(value)])
    if value is not None and int(ids[0]) in default:
        ids += [e for e in default if e not in ids and e < vocab]
    return tuple(int(e) for e in ids)


def spec_from_config(cfg: dict, config_path: Path) -> tuple[ModelSpec, HFNames]:
    """Map a LLaDA or Dream config.json onto a ModelSpec and the checkpoint's tensor names."""
    model_type = str(cfg.get("model_type", "")).lower()
    try:
        if model_type == "llada":
            if cfg.get("alibi") or cfg.get("rope") is False:
                raise CheckpointError(f"{config_path}: only RoPE LLaDA models are supported (alibi/rope flags)")
            n_heads = int(cfg["n_heads"])
            d_model = int(cfg["d_model"])
            vocab = int(_first(cfg, "embedding_size", "vocab_size"))
            spec = ModelSpec(
                arch=Arch.LLADA, n_layers=int(cfg["n_layers"]), d_model=d_model, n_heads=n_heads,
                n_kv_heads=int(_first(cfg, "n_kv_heads", default=n_heads)), head_dim=d_model // n_heads,
                mlp_hidden=int(cfg["mlp_hidden_size"]), vocab_size=vocab,
                max_seq_len=int(_first(cfg, "max_sequence_length", default=4096)),
                rope_theta=float(_first(cfg, "rope_theta", default=10000.0)),
                norm_eps=float(_first(cfg, "rms_norm_eps", "layer_norm_eps", default=1e-5)),
                qkv_bias=bool(_first(cfg, "include_qkv_bias", default=False) or cfg.get("include_bias", False)),
                mask_id=int(_first(cfg, "mask_token_id", default=LLADA_MASK_ID)),
                eos_ids=_eos_list(cfg.get("eos_token_id"), LLADA_EOS_IDS, vocab),
                logit_shift=False, bos_id=cfg.get("bos_token_id"),
            )
            names = HFNames("model.transformer.wte.weight", "model.transformer.blocks.{i}.", _LLADA_LAYER,
                            "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
                            bool(cfg.get("weight_tying", False)))
        elif model_type == "dream":
            n_heads = int(cfg["num_attention_heads"])
            d_model = int(cfg["hidden_size"])
            spec = ModelSpec(
                arch=Arch.DREAM, n_layers=int(cfg["num_hidden_layers"]), d_model=d_model, n_heads=n_heads,
                n_kv_heads=int(_first(cfg, "num_key_value_heads", default=n_heads)),
                head_dim=int(_first(cfg, "head_dim", default=d_model // n_heads)),
                mlp_hidden=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                max_seq_len=int(_first(cfg, "max_position_embeddings", default=32768)),
                rope_theta=float(_first(cfg, "rope_theta", default=10000.0)),
                norm_eps=float(_first(cfg, "rms_norm_eps", default=1e-6)), qkv_bias=True,
                mask_id=int(_first(cfg, "mask_token_id", default=DREAM_MASK_ID)),
                eos_ids=_eos_list(cfg.get("eos_token_id"), DREAM_EOS_IDS, int(cfg["vocab_size"])),
                logit_shift=True, bos_id=cfg.get("bos_token_id"),
            )
            names = HFNames("model.embed_tokens.weight", "model.layers.{i}.", _DREAM_LAYER,
                            "model.norm.weight", "lm_head.weight", bool(cfg.get("tie_word_embeddings", False)))
        else:
            raise CheckpointError(
                f"{config_path}: model_type {cfg.get('model_type')!r} is not supported; "
                "expected 'llada' (LLaDA-8B-Instruct, LLaDA-1.5) or 'Dream' (Dream-v0-Instruct-7B)")
    except KeyError as e:
        raise CheckpointError(f"{config_path} lacks the key {e.args[0]!r} that a {model_type} config must have") from None
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    return spec, names


def _read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check the file holds every byte it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no header); re-download or re-save this shard")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated (header says {n} bytes, file has {size}); re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header; re-download or re-save it") from None
    out, end = {}, 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        end = max(end, meta["data_offsets"][1])
        out[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]))
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}; re-download it")
    return out


class Checkpoint:
    """A LLaDA or Dream checkpoint directory, opened lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory; pass a Hugging Face checkpoint directory "
                                  "(config.json + *.safetensors + tokenizer files)")
        self.config = _read_json(self.path / "config.json", "config.json (the model config)")
        self.spec, self.names = spec_from_config(self.config, self.path / "config.json")
        self.tensors = self._index_tensors()
        self._handles: dict[Path, object] = {}

    # -- indexing ---------------------------------------------------------
    def _index_tensors(self) -> dict[str, TensorInfo]:
        index_path = self.path / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = _read_json(index_path, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no 'weight_map' object (tensor name -> shard file); "
                                      "rewrite the index or re-download it")
            files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(
                f"{self.path} has no model.safetensors and no model.safetensors.index.json; "
                "convert .bin weights with safetensors or point at the right directory")
        tensors: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.exists():
                raise CheckpointError(f"shard {fpath} listed in the index is missing; download it again")
            tensors.update(_read_safetensors_header(fpath))
        return tensors

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name the model needs, with its shape."""
        s, n = self.spec, self.names
        with torch.device("meta"):
            layer = DecoderLayer(s)
        shapes = {n.embed: (s.vocab_size, s.d_model), n.norm: (s.d_model,)}
        if not n.tied:
            shapes[n.head] = (s.vocab_size, s.d_model)
        for i in range(s.n_layers):
            prefix = n.layer_prefix.format(i=i)
            for ours, theirs in n.layer_map.items():
                if ours.endswith(".bias") and not s.qkv_bias:
                    continue
                shapes[prefix + theirs] = tuple(layer.get_parameter(ours).shape)
        return shapes

    def check(self) -> None:
        """Raise on any missing or misshaped tensor, before anything is loaded."""
        for name, shape in self.expected_shapes().items():
            self._info(name, shape)

    def _info(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the safetensors files; "
                                  "the checkpoint is incomplete or not in the LLaDA/Dream Hugging Face layout")
        if info.shape != tuple(shape):
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                  f"{list(shape)} from config.json; the config and weights do not match")
        if info.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} has unsupported dtype {info.dtype}")
        return info

    # -- loading ----------------------------------------------------------
    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        info = self._info(name, shape)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle.get_tensor(name).to(dtype)

    def _fill(self, module: nn.Module, names: dict[str, str], dtype: torch.dtype) -> nn.Module:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for ours, theirs in names.items():
                p = module.get_parameter(ours)
                p.copy_(self.tensor(theirs, tuple(p.shape), dtype))
        self.close()   # unmap the files: mapped pages would otherwise pile up to the whole checkpoint's size
        return module.eval().requires_grad_(False)

    def close(self) -> None:
        """Drop the open safetensors handles (they are reopened on the next load)."""
        self._handles.clear()

    def load_layer(self, i: int, dtype: torch.dtype = torch.float32) -> DecoderLayer:
        if not 0 <= i < self.spec.n_layers:
            raise IndexError(f"layer {i} out of range [0, {self.spec.n_layers})")
        with torch.device("meta"):
            layer = DecoderLayer(self.spec, dtype)
        prefix = self.names.layer_prefix.format(i=i)
        names = {ours: prefix + theirs for ours, theirs in self.names.layer_map.items()
                 if self.spec.qkv_bias or not ours.endswith(".bias")}
        return self._fill(layer, names, dtype)

    def load_embed(self, dtype: torch.dtype = torch.float32) -> nn.Embedding:
        with torch.device("meta"):
            emb = nn.Embedding(self.spec.vocab_size, self.spec.d_model, dtype=dtype)
        return self._fill(emb, {"weight": self.names.embed}, dtype)

    def load_norm(self, dtype: torch.dtype = torch.float32) -> RMSNorm:
        with torch.device("meta"):
            norm = RMSNorm(self.spec.d_model, self.spec.norm_eps, dtype)
        return self._fill(norm, {"weight": self.names.norm}, dtype)

    def load_head(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        with torch.device("meta"):
            head = nn.Linear(self.spec.d_model, self.spec.vocab_size, bias=False, dtype=dtype)
        name = self.names.embed if self.names.tied else self.names.head
        return self._fill(head, {"weight": name}, dtype)

    def load_model(self, dtype: torch.dtype = torch.float32) -> DiffusionLM:
        """The whole model, filled tensor by tensor (peak memory: the model plus one tensor)."""
        self.check()
        with torch.device("meta"):
            model = DiffusionLM(self.spec, dtype, n_layers=0)
        model.embed = self.load_embed(dtype)
        model.layers = nn.ModuleList(self.load_layer(i, dtype) for i in range(self.spec.n_layers))
        model.norm = self.load_norm(dtype)
        model.lm_head = self.load_head(dtype)
        return model.eval().requires_grad_(False)

    def tokenizer(self):
        """The checkpoint's tokenizer through transformers.AutoTokenizer (local files only)."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        # transformers warns "model of type llada to instantiate a model of type ..." because it reads
        # config.json of a model class it does not know; harmless for a tokenizer, so hush it here only.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(self.path), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises many types here
            raise CheckpointError(f"{self.path}: could not load the tokenizer ({type(e).__name__}: {e}); "
                                  "the directory needs tokenizer.json and tokenizer_config.json") from None
        finally:
            hf_logging.set_verbosity(verbosity)


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[ModelSpec, DiffusionLM]:
    ckpt = Checkpoint(path)
    return ckpt.spec, ckpt.load_model(dtype)
