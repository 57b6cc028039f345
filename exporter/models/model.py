"""DiffusionLM: the whole model (embedding, decoder layers, final norm, LM head) for reference use."""

from __future__ import annotations

import torch
from torch import nn

from dllm.spec import ModelSpec
from dllm.exporter.models.layers import DecoderLayer, RMSNorm


class DiffusionLM(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32, n_layers: int | None = None):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model, dtype=dtype)
        n = spec.n_layers if n_layers is None else n_layers
        self.layers = nn.ModuleList(DecoderLayer(spec, dtype) for _ in range(n))
        self.norm = RMSNorm(spec.d_model, spec.norm_eps, dtype)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, V] aligned with the canvas: position i's logits predict token i.

        For Dream the raw logits are shifted right by one (position i uses hidden state i-1,
        position 0 keeps its own), exactly as Dream's generation code does.
        """
        logits = self.lm_head(self.hidden_states(ids))
        if self.spec.logit_shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits
