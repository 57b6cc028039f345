"""manifest.json: the contract between an engine directory and anything that loads it.

The format is documented in docs/engine-dir.md for C++ consumers; bump
SCHEMA_VERSION on any incompatible change.

Schema versions: 2 (every export now) declares the layers' ``kv_len`` input and records ``max_batch``;
1 (before batching) has layers without ``kv_len`` and serves one sequence at a time (``max_batch`` 1).
Both are read; any other version is refused with a message saying what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from dllm.errors import ConfigError, EngineDirError
from dllm.spec import ModelSpec
from dllm.exporter.subgraphs import DType, SubgraphDecl

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)     # versions this toolkit reads
FORMAT = "dllm-engine-dir"
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: min/opt/max of each dynamic dim."""
    name: str                     # "cached" (small k) or "refresh" (k = N)
    min: dict[str, int]
    opt: dict[str, int]
    max: dict[str, int]


@dataclasses.dataclass(frozen=True)
class SubgraphEntry:
    decl: SubgraphDecl
    onnx: str                     # path relative to the engine dir
    sha256: str                   # of the ONNX file plus its external data
    input_hash: str               # hash of what produced it (weights, spec, export options): resume key


@dataclasses.dataclass(frozen=True)
class Manifest:
    model: ModelSpec
    dtype: str                    # "fp32" | "fp16" | "bf16"
    max_seq_len: int
    subgraphs: tuple[SubgraphEntry, ...]
    profiles: tuple[Profile, ...]
    plans: dict                   # device tag -> {subgraph name -> {"file": rel path, "sha256": ...}}
    source: dict                  # {"checkpoint": abs path, "config_sha256": ...}
    tools: dict                   # tool -> version
    build: dict                   # export/build options
    quantization: dict | None = None  # weight-only quantization (docs/engine-dir.md); None: float weights
    schema_version: int = SCHEMA_VERSION
    # every file the export wrote (relative path -> {"size", "sha256"}): what the exporter owns and
    # what the loader checks; empty in manifests of the first release, which did not record it
    files: dict = dataclasses.field(default_factory=dict)
    generation: dict = dataclasses.field(default_factory=dict)   # decode defaults (dllm.generation); optional
    max_batch: int = 1            # largest batch B the engines serve (schema 2; schema-1 directories: 1)

    @property
    def padded(self) -> bool:
        """Whether the layers take ``kv_len`` (each sequence's length in a padded batch): schema 2 and later."""
        return self.schema_version >= 2

    def subgraph(self, name: str) -> SubgraphEntry:
        for s in self.subgraphs:
            if s.decl.name == name:
                return s
        raise EngineDirError(f"engine directory has no subgraph {name!r}; it has "
                             f"{[s.decl.name for s in self.subgraphs]}. Re-run dllm-export.")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "schema_version": self.schema_version, "model": self.model.to_dict(),
            "dtype": self.dtype, "max_seq_len": self.max_seq_len,
            **({"max_batch": self.max_batch} if self.padded else {}),   # schema 1 has no such key
            "subgraphs": [{**s.decl.to_dict(), "onnx": s.onnx, "sha256": s.sha256, "input_hash": s.input_hash}
                          for s in self.subgraphs],
            "profiles": [dataclasses.asdict(p) for p in self.profiles],
            "plans": self.plans, "source": self.source, "tools": self.tools, "build": self.build,
            **({"files": self.files} if self.files else {}),
            "generation": self.generation,
            "quantization": self.quantization,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        """Parse a manifest; anything malformed is an EngineDirError naming the part, never a KeyError."""
        if not isinstance(d, dict):
            raise _malformed(where, f"expected a JSON object, got a JSON {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise EngineDirError(f"{where} is not a dllm engine manifest (format {d.get('format')!r})")
        version = d.get("schema_version")
        if not _is_size(version) or version not in READABLE_SCHEMAS:
            raise EngineDirError(_unknown_schema(where, version))
        required = ("model", "dtype", "max_seq_len", "subgraphs", "profiles") + (("max_batch",) if version >= 2 else ())
        missing = [k for k in required if k not in d]
        if missing:
            raise _malformed(where, f"it lacks the keys {missing}")
        if not isinstance(d["subgraphs"], list) or not d["subgraphs"]:
            raise _malformed(where, f"'subgraphs' must be a non-empty list, got {_kind(d['subgraphs'])}")
        if not isinstance(d["model"], dict):
            raise _malformed(where, f"'model' must be an object, got {_kind(d['model'])}")
        for key in ("plans", "source", "tools", "build", "files"):
            if not isinstance(d.get(key, {}), dict):
                raise _malformed(where, f"{key!r} must be an object, got {_kind(d[key])}")
        if not isinstance(d["max_seq_len"], int) or isinstance(d["max_seq_len"], bool) or d["max_seq_len"] < 1:
            raise _malformed(where, f"'max_seq_len' must be a positive integer, got {d['max_seq_len']!r}")
        max_batch = d["max_batch"] if version >= 2 else 1        # schema 1: one unpadded sequence
        if not _is_size(max_batch) or max_batch < 1:
            raise _malformed(where, f"'max_batch' must be a positive integer, got {max_batch!r}")
        if d["dtype"] not in [t.value for t in DType]:
            raise _malformed(where, f"'dtype' must be one of {[t.value for t in DType]}, got {d['dtype']!r}")
        try:
            model = ModelSpec.from_dict(d["model"])
        except (ConfigError, TypeError, ValueError) as e:
            raise _malformed(where, f"'model' is not a valid model spec ({e})") from None
        subs = tuple(_subgraph_entry(s, i, where) for i, s in enumerate(d["subgraphs"]))
        try:
            profiles = tuple(Profile(**p) for p in d["profiles"])
        except (TypeError, ValueError) as e:
            raise _malformed(where, f"'profiles' must be a list of {{name, min, opt, max}} objects ({e})") from None
        if not isinstance(d.get("generation") or {}, dict):
            raise _malformed(where, f"'generation' must be an object, got {_kind(d['generation'])}")
        for rel, info in d.get("files", {}).items():
            if not (isinstance(info, dict) and _is_size(info.get("size")) and _is_sha256(info.get("sha256"))):
                raise _malformed(where, f"files[{rel!r}] must be {{\"size\": int, \"sha256\": 64 hex digits}}, "
                                        f"got {info!r}")
        return cls(model=model, dtype=d["dtype"], max_seq_len=d["max_seq_len"],
                   subgraphs=subs, profiles=profiles,
                   plans=d.get("plans", {}), source=d.get("source", {}), tools=d.get("tools", {}),
                   build=d.get("build", {}), schema_version=d["schema_version"], files=d.get("files", {}),
                   generation=d.get("generation") or {}, quantization=d.get("quantization"), max_batch=max_batch)

    def write(self, engine_dir: Path) -> None:
        (Path(engine_dir) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2))


def _kind(value) -> str:
    return f"a JSON {type(value).__name__}" if not isinstance(value, (list, dict)) or value else "an empty one"


def _unknown_schema(where: str, version) -> str:
    readable = " and ".join(map(str, READABLE_SCHEMAS))
    if _is_size(version) and version > SCHEMA_VERSION:
        fix = ("it was written by a newer dllm-export: upgrade dllm-deploy to read it, or re-export the checkpoint "
               "with this version's dllm-export")
    else:
        fix = "re-export the checkpoint with this version's dllm-export"
    return f"{where} has schema version {version!r}, this toolkit reads versions {readable}; {fix}"


def _malformed(where: str, what: str) -> EngineDirError:
    return EngineDirError(f"{where} is malformed: {what}; it was edited or damaged, re-run dllm-export to rewrite it")


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _subgraph_entry(s, i: int, where: str) -> SubgraphEntry:
    if not isinstance(s, dict):
        raise _malformed(where, f"subgraphs[{i}] must be an object, got {_kind(s)}")
    label = f"subgraphs[{i}] ({s.get('name', 'no name')})"
    missing = [k for k in ("name", "kind", "inputs", "outputs", "onnx", "sha256") if k not in s]
    if missing:
        raise _malformed(where, f"{label} lacks the keys {missing}")
    if not _is_sha256(s["sha256"]):
        raise _malformed(where, f"{label}: 'sha256' must be 64 lowercase hex digits, got {s['sha256']!r}")
    if not isinstance(s["onnx"], str) or not s["onnx"]:
        raise _malformed(where, f"{label}: 'onnx' must be a relative path, got {s['onnx']!r}")
    try:
        decl = SubgraphDecl.from_dict(s)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _malformed(where, f"{label} has a malformed declaration ({type(e).__name__}: {e})") from None
    return SubgraphEntry(decl, s["onnx"], s["sha256"], str(s.get("input_hash", "")))


def read_manifest(engine_dir: str | Path) -> Manifest:
    """Read and check an engine directory's manifest (it exists, parses, and is our schema)."""
    path = Path(engine_dir) / MANIFEST
    if not os.path.lexists(path):
        if Path(engine_dir).is_file():
            raise EngineDirError(f"{engine_dir} is a file, not an engine directory; pass the directory "
                                 "dllm-export wrote")
        raise EngineDirError(f"{engine_dir} is not an engine directory (no {MANIFEST}); "
                             "build one with: dllm-export CHECKPOINT_DIR -o OUT_DIR")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineDirError(f"{path} is corrupt ({e}); re-run dllm-export") from None
    except OSError as e:
        raise EngineDirError(f"cannot read {path} ({e.strerror or e}); check that it is a readable file, "
                             "or re-run dllm-export") from None
    return Manifest.from_dict(data, str(path))
