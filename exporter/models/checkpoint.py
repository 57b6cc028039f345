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
import math
import os
import re
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

_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")   # what weights may be stored as (they are cast to the export dtype)
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
    """A JSON object from ``path``; every way of failing is a CheckpointError that names the file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a checkpoint directory needs {what}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not text (not UTF-8); re-download or rewrite {what}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or rewrite {what}") from None
    except OSError as e:      # a directory, a symlink loop, no permission
        raise CheckpointError(f"cannot read {path} ({e.strerror or e}); it must be a readable file with "
                              f"{what}") from None
    if not isinstance(data, dict):
        kind = {"list": "an array", "str": "a string", "int": "a number", "float": "a number", "bool": "a boolean",
                "NoneType": "null"}[type(data).__name__]
        raise CheckpointError(f"{path} holds {kind}, not a JSON object; re-download or rewrite {what}")
    return data


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


class _Reader:
    """Typed reads of config.json values, each failure naming the key, what it holds and what it needs."""

    def __init__(self, cfg: dict, path: Path):
        self.cfg, self.path = cfg, path

    def _value(self, keys, default):
        for k in keys:
            if self.cfg.get(k) is not None:
                return k, self.cfg[k]
        if default is None:
            raise CheckpointError(f"{self.path} lacks the key {keys[0]!r} that a {self.cfg.get('model_type')} "
                                  "config must have")
        return keys[0], default

    def int(self, *keys, default=None, positive=True) -> int:
        key, v = self._value(keys, default)
        if isinstance(v, float) and v % 1 == 0:              # a whole float (inf and nan are not)
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or (positive and v <= 0):
            raise CheckpointError(f"{self.path}: {key!r} must be a {'positive ' if positive else ''}integer, got "
                                  f"{v!r}; fix config.json")
        return v

    def float(self, *keys, default=None) -> float:
        key, v = self._value(keys, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise CheckpointError(f"{self.path}: {key!r} must be a positive number, got {v!r}; fix config.json")
        return float(v)

    def bool(self, *keys, default=False) -> bool:
        key, v = self._value(keys, default)
        if not isinstance(v, bool):
            raise CheckpointError(f"{self.path}: {key!r} must be true or false, got {v!r}; fix config.json")
        return v


def _eos_list(r: _Reader, default: tuple[int, ...], vocab: int) -> tuple[int, ...]:
    """EOS ids from config.json, plus the family's known end-of-turn ids that fit the vocabulary.

    Real LLaDA configs name only <|endoftext|> (126081), yet Instruct answers end with
    <|eot_id|> (126348); Dream's name 151643 but turns end with <|im_end|> (151645).
    """
    value = r.cfg.get("eos_token_id")
    if value is None:
        return tuple(default)
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    if not ids or any(isinstance(e, bool) or not isinstance(e, int) for e in ids):
        raise CheckpointError(f"{r.path}: 'eos_token_id' must be an integer or a list of integers, got {value!r}; "
                              "fix config.json")
    if ids[0] in default:
        ids += [e for e in default if e not in ids and e < vocab]
    return tuple(ids)


def spec_from_config(cfg: dict, config_path: Path) -> tuple[ModelSpec, HFNames]:
    """Map a LLaDA or Dream config.json onto a ModelSpec and the checkpoint's tensor names."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config_path} holds a JSON {type(cfg).__name__}, expected an object")
    model_type = str(cfg.get("model_type", "")).lower()
    r = _Reader(cfg, config_path)
    try:
        if model_type == "llada":
            if cfg.get("alibi") or cfg.get("rope") is False:
                raise CheckpointError(f"{config_path}: only RoPE LLaDA models are supported (alibi/rope flags)")
            n_heads, d_model = r.int("n_heads"), r.int("d_model")
            _check_heads(config_path, d_model, n_heads, "d_model", "n_heads")
            vocab = r.int("embedding_size", "vocab_size")
            spec = ModelSpec(
                arch=Arch.LLADA, n_layers=r.int("n_layers"), d_model=d_model, n_heads=n_heads,
                n_kv_heads=r.int("n_kv_heads", default=n_heads), head_dim=d_model // n_heads,
                mlp_hidden=r.int("mlp_hidden_size"), vocab_size=vocab,
                max_seq_len=r.int("max_sequence_length", default=4096),
                rope_theta=r.float("rope_theta", default=10000.0),
                norm_eps=r.float("rms_norm_eps", "layer_norm_eps", default=1e-5),
                qkv_bias=r.bool("include_qkv_bias") or r.bool("include_bias"),
                mask_id=r.int("mask_token_id", default=LLADA_MASK_ID, positive=False),
                eos_ids=_eos_list(r, LLADA_EOS_IDS, vocab),
                logit_shift=False, bos_id=_optional_id(r, "bos_token_id"),
            )
            names = HFNames("model.transformer.wte.weight", "model.transformer.blocks.{i}.", _LLADA_LAYER,
                            "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
                            r.bool("weight_tying"))
        elif model_type == "dream":
            n_heads, d_model = r.int("num_attention_heads"), r.int("hidden_size")
            _check_heads(config_path, d_model, n_heads, "hidden_size", "num_attention_heads")
            vocab = r.int("vocab_size")
            spec = ModelSpec(
                arch=Arch.DREAM, n_layers=r.int("num_hidden_layers"), d_model=d_model, n_heads=n_heads,
                n_kv_heads=r.int("num_key_value_heads", default=n_heads),
                head_dim=r.int("head_dim", default=d_model // n_heads),
                mlp_hidden=r.int("intermediate_size"), vocab_size=vocab,
                max_seq_len=r.int("max_position_embeddings", default=32768),
                rope_theta=r.float("rope_theta", default=10000.0),
                norm_eps=r.float("rms_norm_eps", default=1e-6), qkv_bias=True,
                mask_id=r.int("mask_token_id", default=DREAM_MASK_ID, positive=False),
                eos_ids=_eos_list(r, DREAM_EOS_IDS, vocab),
                logit_shift=True, bos_id=_optional_id(r, "bos_token_id"),
            )
            names = HFNames("model.embed_tokens.weight", "model.layers.{i}.", _DREAM_LAYER,
                            "model.norm.weight", "lm_head.weight", r.bool("tie_word_embeddings"))
        else:
            raise CheckpointError(
                f"{config_path}: model_type {cfg.get('model_type')!r} is not supported; "
                "expected 'llada' (LLaDA-8B-Instruct, LLaDA-1.5) or 'Dream' (Dream-v0-Instruct-7B)")
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}; fix config.json") from None
    return spec, names


def _check_heads(path: Path, d_model: int, n_heads: int, d_key: str, h_key: str) -> None:
    if d_model % n_heads:
        raise CheckpointError(f"{path}: {d_key} {d_model} is not a multiple of {h_key} {n_heads}; fix config.json")


def _optional_id(r: _Reader, key: str) -> int | None:
    return None if r.cfg.get(key) is None else r.int(key, positive=False)


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
    try:
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            end = max(end, int(meta["data_offsets"][1]))
            out[name] = TensorInfo(path, str(meta["dtype"]), tuple(int(d) for d in meta["shape"]))
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path} has a malformed safetensors header; re-download or re-save it") from None
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
        """Raise on any missing, misshaped or non-float tensor, and on layers beyond config.json's count,
        before anything is loaded."""
        for name, shape in self.expected_shapes().items():
            self._info(name, shape)
        pattern = re.compile(re.escape(self.names.layer_prefix).replace(r"\{i\}", r"(\d+)"))
        layers = {int(m.group(1)) for name in self.tensors if (m := pattern.match(name))}
        extra = sorted(i for i in layers if i >= self.spec.n_layers)
        if extra:
            raise CheckpointError(f"{self.path}: config.json says {self.spec.n_layers} layers, but the safetensors "
                                  f"files hold layers up to {extra[-1]} ({max(layers) + 1} in all); set the layer "
                                  "count in config.json to match the weights")

    def _info(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the safetensors files; "
                                  "the checkpoint is incomplete or not in the LLaDA/Dream Hugging Face layout")
        if info.shape != tuple(shape):
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                  f"{list(shape)} from config.json; the config and weights do not match")
        if info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} is stored as {info.dtype}; weights must be floating "
                                  f"point ({', '.join(_FLOAT_DTYPES)}): quantized checkpoints are not read, export "
                                  "from the original fp16/bf16/fp32 checkpoint")
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
