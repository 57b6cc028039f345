"""The engine directory on disk: atomic writes, resumable work, tokenizer files (docs/engine-dir.md).

An export builds everything in ``.<out>.partial`` beside the output and renames it onto
the output at the very end, after writing ``manifest.json`` last. Until then the output is
either absent or the previous complete export, and the partial directory has no manifest,
so ``read_manifest`` fails on anything an interrupted export leaves behind.

Finished work is recorded in ``.<out>.partial/.state/`` (one JSON per ONNX subgraph or plan,
written after its files are complete). A re-run reuses a subgraph whose input hash is
unchanged from those records or from the previous complete output's manifest, after
checking the files' sha256; files are hard-linked, not copied, where the filesystem allows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dllm.errors import CheckpointError, EngineDirError, ExportError
from dllm.exporter.manifest import MANIFEST, Manifest, read_manifest

ONNX_DIR, PLANS_DIR, TOKENIZER_DIR, STATE_DIR = "onnx", "plans", "tokenizer", ".state"

# Files a Hugging Face tokenizer may consist of (copied when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")


def files_sha256(paths) -> str:
    """sha256 over the bytes of ``paths`` in order (an ONNX file, then its external data)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def prepare_output(out: Path) -> Path:
    """Check ``out`` can be written and return the partial directory to build in (kept if it exists)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is a file; pass a directory path with -o")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ExportError(f"output {out} exists, is not empty and is not an engine directory (no {MANIFEST}); "
                          "refusing to replace it: choose another -o or remove it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"cannot write the output {out}: {parent} is a file, not a directory; "
                                  "choose a writable -o directory")
            break
    tmp = partial_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(exist_ok=True)
        (tmp / MANIFEST).unlink(missing_ok=True)     # a partial directory never carries a manifest
        probe = tmp / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ExportError(f"cannot write the output {out} ({e.strerror or e}: {e.filename or out.parent}); "
                          "choose a writable -o directory") from None
    return tmp


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class WorkRecords:
    """Finished subgraphs and plans, from this partial directory or the previous complete output.

    A record is a dict with at least ``input_hash``, ``sha256`` and ``files`` (paths relative to
    the engine directory). ``find`` returns a record whose files are in the partial directory and
    hash as recorded, or None (then the caller redoes the work and calls ``save``).
    """

    def __init__(self, out: Path, tmp: Path):
        self.out, self.tmp = out, tmp
        self.previous: Manifest | None = None
        if (out / MANIFEST).exists():
            try:
                self.previous = read_manifest(out)
            except EngineDirError:
                self.previous = None   # an old schema or a corrupt manifest: redo everything

    def _state(self, key: str) -> Path:
        return self.tmp / STATE_DIR / f"{key}.json"

    def save(self, key: str, record: dict) -> None:
        write_json_atomic(self._state(key), record)

    def _previous_record(self, key: str) -> dict | None:
        m = self.previous
        if m is None:
            return None
        kind, _, name = key.partition("/")
        if kind == ONNX_DIR:
            for s in m.subgraphs:
                if s.decl.name == name:
                    data = s.onnx + ".data"
                    return {"input_hash": s.input_hash, "sha256": s.sha256, "files": [s.onnx, data],
                            "validation": m.build.get("validation", {}).get(name),
                            "seconds": m.build.get("export_seconds", {}).get(name)}
            return None
        tag, _, name = name.partition("/")          # "plans/<tag>/<name>"
        entry = m.plans.get(tag, {}).get(name)
        if entry is None:
            return None
        return {"input_hash": entry.get("input_hash"), "sha256": entry.get("sha256"), "files": [entry["file"]],
                "build_s": entry.get("build_s")}

    def find(self, key: str, input_hash: str) -> dict | None:
        """A reusable record for ``key`` ("onnx/<name>" or "plans/<tag>/<name>") with this input hash."""
        state = self._state(key)
        if state.exists():
            try:
                record = json.loads(state.read_text())
            except json.JSONDecodeError:
                record = None
            if record and record.get("input_hash") == input_hash and self._intact(self.tmp, record):
                return record
        record = self._previous_record(key)
        if record and record.get("input_hash") == input_hash and self._intact(self.out, record):
            for rel in record["files"]:
                link_or_copy(self.out / rel, self.tmp / rel)
            self.save(key, record)
            return record
        return None

    @staticmethod
    def _intact(root: Path, record: dict) -> bool:
        paths = [root / rel for rel in record.get("files", [])]
        return bool(paths) and all(p.is_file() for p in paths) and files_sha256(paths) == record.get("sha256")


def copy_tokenizer(checkpoint: Path, tmp: Path) -> list[str]:
    """Copy the checkpoint's tokenizer files into ``tokenizer/``; CheckpointError if it has none."""
    present = [f for f in TOKENIZER_FILES if (checkpoint / f).is_file()]
    present += sorted(p.name for p in checkpoint.glob("tokenization_*.py"))
    if not any(f in present for f in TOKENIZER_CORE):
        raise CheckpointError(f"{checkpoint} has no tokenizer (none of {list(TOKENIZER_CORE)}); an engine "
                              "directory ships its tokenizer, so copy the model's tokenizer files next to config.json")
    dst = tmp / TOKENIZER_DIR
    dst.mkdir(exist_ok=True)
    for f in present:
        shutil.copy2(checkpoint / f, dst / f)
    return [f"{TOKENIZER_DIR}/{f}" for f in present]


def finalize(tmp: Path, out: Path, manifest: Manifest, keep: set[str]) -> Path:
    """Prune files the manifest does not reference, write the manifest, and swap ``tmp`` onto ``out``."""
    shutil.rmtree(tmp / STATE_DIR, ignore_errors=True)
    for sub in (ONNX_DIR, PLANS_DIR, TOKENIZER_DIR):
        for p in sorted((tmp / sub).rglob("*"), reverse=True) if (tmp / sub).exists() else []:
            rel = p.relative_to(tmp).as_posix()
            if p.is_file() and rel not in keep:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    manifest.write(tmp)                               # the last file: only now can the directory load
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return out
