"""Data shipped with dllm.tools: the trained tiny LLaDA-layout checkpoint (see tiny-llada/README.md).

    >>> from dllm.tools.assets import shipped_model_dir
    >>> Checkpoint(shipped_model_dir())

The files sit next to this module (package data ``assets/**`` of ``dllm.tools``), so the same
path works for editable and regular installs.
"""

from __future__ import annotations

from pathlib import Path

from dllm.errors import CheckpointError

SHIPPED_MODEL = "tiny-llada"


def shipped_model_dir() -> Path:
    """Directory of the shipped tiny LLaDA checkpoint (config.json, model.safetensors, tokenizer)."""
    path = Path(__file__).resolve().parent / SHIPPED_MODEL
    if not (path / "config.json").is_file():
        raise CheckpointError(f"the shipped model is missing at {path} (no config.json); reinstall dllm-deploy "
                              "or retrain it with the command in tools/assets/tiny-llada/README.md")
    return path
