"""Model shapes without weights: benchmark LLaDA-8B or Dream-7B shapes on random weights.

Random weights commit about one token per step (flat distributions), so step latency is
the fair figure; accuracy means nothing here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dllm.errors import ConfigError
from dllm.spec import Arch, ModelSpec

# Public model shapes.
SHAPES: dict[str, dict] = {
    "llada-8b": dict(arch=Arch.LLADA, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, head_dim=128,
                     mlp_hidden=12288, vocab_size=126464, max_seq_len=4096, rope_theta=500000.0,
                     norm_eps=1e-5, qkv_bias=False, mask_id=126336, eos_ids=(126081, 126348),
                     logit_shift=False, bos_id=126080),
    "dream-7b": dict(arch=Arch.DREAM, n_layers=28, d_model=3584, n_heads=28, n_kv_heads=4, head_dim=128,
                     mlp_hidden=18944, vocab_size=152064, max_seq_len=32768, rope_theta=1e6,
                     norm_eps=1e-6, qkv_bias=True, mask_id=151666, eos_ids=(151643, 151645),
                     logit_shift=True, bos_id=None),
}


def random_spec(name_or_path: str, **overrides) -> ModelSpec:
    """A named shape ("llada-8b", "dream-7b") or a ModelSpec JSON file, with optional overrides."""
    if name_or_path in SHAPES:
        fields = dict(SHAPES[name_or_path])
    elif Path(name_or_path).is_file():
        try:
            fields = json.loads(Path(name_or_path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--random-weights {name_or_path}: not valid JSON ({e}); write ModelSpec fields "
                              "as one JSON object, e.g. from ModelSpec.to_dict()") from None
        if not isinstance(fields, dict):
            raise ConfigError(f"--random-weights {name_or_path}: expected a JSON object of ModelSpec fields, "
                              f"got {type(fields).__name__}")
    else:
        raise ConfigError(f"--random-weights {name_or_path!r}: expected one of {sorted(SHAPES)} "
                          "or a JSON file of ModelSpec fields")
    fields.update(overrides)
    return ModelSpec.from_dict(fields)


def random_model(spec: ModelSpec, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """A DiffusionLM with random weights made directly on ``device`` (no host copy of 16 GB)."""
    from dllm.exporter.models.model import DiffusionLM

    with torch.device("meta"):
        model = DiffusionLM(spec, dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                # std 1/sqrt(fan_in) keeps activations O(1) through 32 layers
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.normal_(0.0, fan_in ** -0.5, generator=g)
    return model.eval().requires_grad_(False)
