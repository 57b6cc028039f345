"""Hugging Face repo ids as checkpoints: ``dllm-export GSAI-ML/LLaDA-8B-Instruct -o out``.

``resolve_checkpoint(source)`` returns a local directory: ``source`` itself when it is one, else the
snapshot of the repo id ``source`` that ``huggingface_hub.snapshot_download`` gives: downloaded (only the
files an export reads: config, weights, tokenizer and generation settings), or, with ``HF_HUB_OFFLINE=1``
(or no network), the one already in the local cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub/models--ORG--NAME/snapshots/<revision>``). A ``ORG/NAME@REVISION`` suffix picks
a branch, tag or commit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from dllm.errors import CheckpointError

# What an export reads from a checkpoint repo (modelling code and other weights formats are skipped).
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenization_*.py")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


def looks_like_repo_id(source: str) -> bool:
    """``ORG/NAME`` (optionally ``@REVISION``) and not an existing path."""
    return bool(_REPO_ID.match(source)) and not Path(source).exists() and ".." not in source


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(source: str | os.PathLike, log: Callable[[str], None] | None = None) -> Path:
    """A local checkpoint directory for ``source`` (a directory, or a Hugging Face repo id)."""
    text = str(source)
    if Path(text).exists() or not looks_like_repo_id(text):
        return Path(text)
    repo_id, _, revision = text.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:   # pragma: no cover - a declared dependency
        raise CheckpointError(f"{text} is not a directory; reading it as a Hugging Face repo id needs "
                              f"huggingface_hub ({e}): pip install huggingface_hub") from None
    offline = _offline()
    if log is not None:
        log(f"[export] {text} is not a directory: {'looking it up in the local Hugging Face cache' if offline else 'fetching it from the Hugging Face Hub (or the local cache)'}")
    try:
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=list(ALLOW_PATTERNS),
                                 local_files_only=offline)
    except LocalEntryNotFoundError:
        hint = ("it is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading: unset HF_HUB_OFFLINE "
                "to download it, or point HF_HUB_CACHE at the cache that holds it" if offline else
                "it could not be downloaded and is not in the local cache: check the network, or download it "
                "elsewhere and pass its directory")
        raise CheckpointError(f"{text} is neither a directory nor an available Hugging Face repo: {hint}") from None
    except Exception as e:   # repo not found, gated, no network: huggingface_hub's own error types
        raise CheckpointError(f"{text} is not a directory, and fetching it as a Hugging Face repo id failed "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); pass a checkpoint "
                              "directory, or check the repo id and your access to it (huggingface-cli login)") from None
    return Path(path)
