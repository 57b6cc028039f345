"""Which weights a checkpoint holds: a cheap fingerprint and a full digest, recorded at export.

The torch backend rebuilds its modules from the checkpoint an engine directory was exported from; a
different checkpoint of the same shape (another fine-tune, the base model) would load without a
complaint and produce other tokens. Both identities are computed over the tensors (name, dtype,
shape, bytes in name order), not over the files, so re-sharding or re-saving the same weights keeps them:

- ``fingerprint``: the first, middle and last 4 KiB of every tensor (a few MB read for 16 GB): any
  fine-tune, re-initialisation or dtype change alters it;
- ``sha256``: every byte of every tensor (reads the whole checkpoint; ``--verify``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from dllm.errors import CheckpointError

SAMPLE = 4096


def _tensors(checkpoint: Path) -> list[tuple[str, str, list, Path, int, int]]:
    """(name, dtype, shape, file, begin, end) of every tensor, sorted by name; byte offsets in the file."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is unreadable ({e}); re-download the shard index") from None
    else:
        files = ["model.safetensors"]
    out = []
    for name in files:
        path = checkpoint / name
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"cannot read the safetensors header of {path} ({e}); re-download it") from None
        for key, meta in header.items():
            if key != "__metadata__":
                begin, end = meta["data_offsets"]
                out.append((key, meta["dtype"], meta["shape"], path, 8 + n + begin, 8 + n + end))
    return sorted(out)


def _describe(h, name: str, dtype: str, shape: list) -> None:
    h.update(json.dumps([name, dtype, shape]).encode())


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """sha256 over every tensor's name, dtype, shape and its first, middle and last SAMPLE bytes."""
    h = hashlib.sha256()
    handles = {}
    try:
        for name, dtype, shape, path, begin, end in _tensors(Path(checkpoint)):
            _describe(h, name, dtype, shape)
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            middle = begin + max(0, (end - begin) // 2 - SAMPLE // 2)
            for start in sorted({begin, middle, max(begin, end - SAMPLE)}):
                f.seek(start)
                h.update(f.read(min(SAMPLE, end - start)))
    finally:
        for f in handles.values():
            f.close()
    return h.hexdigest()


def checkpoint_sha256(checkpoint: str | Path) -> str:
    """sha256 over every tensor's name, dtype, shape and all of its bytes."""
    h = hashlib.sha256()
    for name, dtype, shape, path, begin, end in _tensors(Path(checkpoint)):
        _describe(h, name, dtype, shape)
        with open(path, "rb") as f:
            f.seek(begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(left, 1 << 22))
                if not chunk:
                    raise CheckpointError(f"{path} is truncated inside tensor {name!r}; re-download it")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def checkpoint_identity(checkpoint: str | Path) -> dict:
    """The manifest's ``source`` entries that name the exported weights."""
    return {"weights_fingerprint": checkpoint_fingerprint(checkpoint), "weights_sha256": checkpoint_sha256(checkpoint)}
