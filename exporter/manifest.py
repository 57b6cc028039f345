"""manifest.json: the contract between an engine directory and anything that loads it.

The format is documented in docs/engine-dir.md for C++ consumers; bump
SCHEMA_VERSION on any incompatible change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dllm.errors import EngineDirError
from dllm.spec import ModelSpec
from dllm.exporter.subgraphs import SubgraphDecl

SCHEMA_VERSION = 1
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
            "subgraphs": [{**s.decl.to_dict(), "onnx": s.onnx, "sha256": s.sha256, "input_hash": s.input_hash}
                          for s in self.subgraphs],
            "profiles": [dataclasses.asdict(p) for p in self.profiles],
            "plans": self.plans, "source": self.source, "tools": self.tools, "build": self.build,
            "quantization": self.quantization,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        if d.get("format") != FORMAT:
            raise EngineDirError(f"{where} is not a dllm engine manifest (format {d.get('format')!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise EngineDirError(
                f"{where} has schema version {d.get('schema_version')}, this toolkit reads version "
                f"{SCHEMA_VERSION}; re-export the checkpoint with this version's dllm-export")
        subs = tuple(SubgraphEntry(SubgraphDecl.from_dict(s), s["onnx"], s["sha256"], s["input_hash"])
                     for s in d["subgraphs"])
        return cls(model=ModelSpec.from_dict(d["model"]), dtype=d["dtype"], max_seq_len=d["max_seq_len"],
                   subgraphs=subs, profiles=tuple(Profile(**p) for p in d["profiles"]),
                   plans=d.get("plans", {}), source=d.get("source", {}), tools=d.get("tools", {}),
                   build=d.get("build", {}), quantization=d.get("quantization"),
                   schema_version=d["schema_version"])

    def write(self, engine_dir: Path) -> None:
        (Path(engine_dir) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2))


def read_manifest(engine_dir: str | Path) -> Manifest:
    """Read and check an engine directory's manifest (it exists, parses, and is our schema)."""
    path = Path(engine_dir) / MANIFEST
    if not path.exists():
        raise EngineDirError(f"{engine_dir} is not an engine directory (no {MANIFEST}); "
                             "build one with: dllm-export CHECKPOINT_DIR -o OUT_DIR")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineDirError(f"{path} is corrupt ({e}); re-run dllm-export") from None
    return Manifest.from_dict(data, str(path))
