"""ModelSpec: everything the exporter, engines and runtime need to know about a model.

The decode loop never sees a model class, only this spec and engines.
"""

from __future__ import annotations

import dataclasses
import enum

from dllm.errors import ConfigError


class Arch(str, enum.Enum):
    LLADA = "llada"   # LLaMA-style, MHA, no logit shift
    DREAM = "dream"   # Qwen2-style, GQA, q/k/v bias, logits shifted by one


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    arch: Arch
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    vocab_size: int          # rows of the embedding and of the logits
    max_seq_len: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    mask_id: int
    eos_ids: tuple[int, ...]
    logit_shift: bool        # Dream: logits of position i come from hidden state i-1
    bos_id: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "arch", Arch(self.arch))
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden",
                     "vocab_size", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"ModelSpec.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ConfigError(
                f"mask id {self.mask_id} is outside the vocabulary [0, {self.vocab_size}); "
                "set mask_token_id in config.json to a token of the vocabulary")
        for e in self.eos_ids:
            if not 0 <= e < self.vocab_size:
                raise ConfigError(f"eos id {e} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def n_params(self) -> int:
        """Parameter count (weights only), for sizing messages and memory reports."""
        D, F, V = self.d_model, self.mlp_hidden, self.vocab_size
        attn = D * self.n_heads * self.head_dim * 2 + D * self.kv_dim * 2
        if self.qkv_bias:
            attn += self.n_heads * self.head_dim + 2 * self.kv_dim
        layer = attn + 3 * D * F + 2 * D
        return self.n_layers * layer + 2 * V * D + D

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["arch"] = self.arch.value
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelSpec keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)
