"""Is an engine directory what its manifest says? Consistency, sizes, the verified stamp and full hashes.

Loading checks, in this order, before any engine is created:

1. **consistency** of the manifest with itself: the subgraph list and every declaration follow from
   ``model``, ``dtype`` and ``schema_version`` (an edited layer count or dtype fails here; layers take
   ``kv_len`` from schema 2 on), the profiles' batch range is ``max_batch``, paths stay inside the directory,
   and no subgraph file lies in ``onnx/`` that the manifest does not list;
2. **sizes** of every file the backend reads, against ``files`` in the manifest (a stat each);
3. **content**: each file's sha256 must match the manifest. Hashing 16 GB takes seconds to a minute,
   so by default a *verified stamp* (``.verified.json``) stands in for it: per file, the sha256 that was
   verified and the file's identity at that moment (size, mtime, ctime, inode). A file whose identity is
   unchanged is trusted without reading it; any other file is hashed, and the stamp is refreshed. An edit
   in place changes mtime and ctime, a swap or copy changes the inode, so a changed file is never
   trusted on its stamp; ``full=True`` (``--verify``) hashes every file regardless.

The exporter writes the stamp right after the files (it has just hashed them). Where the directory
is read-only, the stamp is kept in ``$XDG_CACHE_HOME/dllm/verified/`` (default ``~/.cache``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path, PurePosixPath

from dllm.errors import EngineDirError, IntegrityError
from dllm.exporter.manifest import MANIFEST, Manifest
from dllm.exporter.subgraphs import DType, Kind, declare

STAMP = ".verified.json"
STAMP_VERSION = 1
ONNX_NAME = re.compile(r"(embed|head|layer_\d+|vproj_\d+)\.onnx(\.data)?")
CHUNK = 1 << 22


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """Files hashed together (in order) against one sha256 the manifest recorded."""
    paths: tuple[str, ...]           # relative to the engine directory
    sha256: str
    sizes: tuple[int | None, ...]    # recorded sizes (None: the manifest predates size records)

    @property
    def key(self) -> str:
        return "+".join(self.paths)


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    files: int                       # files checked
    bytes: int                       # their total size
    hashed_files: int                # files actually read and hashed (the rest trusted on the stamp)
    hashed_bytes: int
    seconds: float


# -- hashing ----------------------------------------------------------------------------------------
def hash_files(paths) -> tuple[str, list[str]]:
    """(sha256 over all files in order, sha256 of each file), reading every file once."""
    combined, each = hashlib.sha256(), []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)           # hashlib releases the GIL here: files hash in parallel threads
                combined.update(chunk)
        each.append(h.hexdigest())
    return combined.hexdigest(), each


def file_identity(st: os.stat_result) -> list[int]:
    """What changes when a file is edited, replaced, swapped or copied."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


# -- the stamp --------------------------------------------------------------------------------------
def _cache_stamp(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return base / "dllm" / "verified" / f"{key}.json"


def read_stamp(root: Path) -> dict:
    """{check key: {"sha256", "identity"}} from the directory's stamp, else the cache's, else {}."""
    for path in (root / STAMP, _cache_stamp(root)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("version") == STAMP_VERSION and isinstance(data.get("files"), dict):
            return data["files"]
    return {}


def write_stamp(root: Path, entries: dict) -> Path | None:
    """Write the stamp into the directory, or the user's cache where the directory is read-only."""
    text = json.dumps({"version": STAMP_VERSION, "files": entries}, sort_keys=True)
    for path in (root / STAMP, _cache_stamp(root)):
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".verified-", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            return path
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return None      # nowhere writable: every load hashes, which is slow but still correct


def stamp_entries(root: Path, digests: dict[str, str]) -> dict:
    """Stamp entries for single files whose sha256 is known (the exporter, right after writing them)."""
    return {rel: {"sha256": sha, "identity": [file_identity(os.stat(root / rel))]} for rel, sha in digests.items()}


# -- what to check ----------------------------------------------------------------------------------
def _safe_rel(rel: str, where: str) -> str:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise EngineDirError(f"{where}: path {rel!r} is not inside the engine directory; the manifest was "
                             "edited or damaged, re-run dllm-export")
    return rel


def _check(manifest: Manifest, rels: list[str], sha256: str) -> list[FileCheck]:
    """Per-file checks where the manifest records each file, else one check over the group."""
    files = manifest.files
    if files and all(r in files for r in rels):
        return [FileCheck((r,), files[r]["sha256"], (files[r]["size"],)) for r in rels]
    return [FileCheck(tuple(rels), sha256, tuple(None for _ in rels))]


def onnx_checks(manifest: Manifest) -> list[FileCheck]:
    out = []
    for s in manifest.subgraphs:
        out += _check(manifest, [s.onnx, s.onnx + ".data"], s.sha256)
    return out + tokenizer_checks(manifest)


def plan_checks(manifest: Manifest, tag: str) -> list[FileCheck]:
    out = []
    for name, entry in manifest.plans.get(tag, {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str):
            out += _check(manifest, [entry["file"]], entry["sha256"])
    return out + tokenizer_checks(manifest)


def tokenizer_checks(manifest: Manifest) -> list[FileCheck]:
    return [FileCheck((r,), i["sha256"], (i["size"],)) for r, i in sorted(manifest.files.items())
            if r.startswith("tokenizer/")]


# -- consistency ------------------------------------------------------------------------------------
def check_consistency(root: Path, manifest: Manifest) -> None:
    """The manifest agrees with itself and with the directory (see the module docstring, step 1)."""
    where = str(root / MANIFEST)
    fix = "the manifest was edited or damaged; re-run dllm-export"
    spec, got = manifest.model, manifest.subgraphs
    with_vproj = any(s.decl.kind == Kind.VPROJ for s in got)
    want = declare(spec, DType(manifest.dtype), with_vproj=with_vproj, padded=manifest.padded)
    layers = sum(s.decl.kind == Kind.LAYER for s in got)
    if layers != spec.n_layers:
        raise EngineDirError(f"{where}: model.n_layers is {spec.n_layers} but the manifest lists {layers} layer "
                             f"subgraphs; {fix}")
    if [s.decl.name for s in got] != [d.name for d in want]:
        raise EngineDirError(f"{where}: subgraphs {[s.decl.name for s in got]} are not those model and dtype "
                             f"imply ({[d.name for d in want]}); {fix}")
    for s, d in zip(got, want):
        if s.decl == d:
            continue
        names = [t.name for t in s.decl.inputs]
        if names != [t.name for t in d.inputs]:
            raise EngineDirError(f"{where}: subgraph {d.name} has inputs {names}, but schema version "
                                 f"{manifest.schema_version} implies {[t.name for t in d.inputs]}; {fix}")
        for kind, mine, theirs in (("input", s.decl.inputs, d.inputs), ("output", s.decl.outputs, d.outputs)):
            for a, b in zip(mine, theirs):
                if a.dtype != b.dtype:
                    raise EngineDirError(f"{where}: subgraph {d.name} declares {kind} {a.name!r} as {a.dtype}, "
                                         f"but the manifest's dtype {manifest.dtype!r} implies {b.dtype}; {fix}")
                if a != b:
                    raise EngineDirError(f"{where}: subgraph {d.name} declares {kind} {a.name!r} with dims "
                                         f"{list(a.dims)}, but the model spec implies {list(b.dims)}; {fix}")
        raise EngineDirError(f"{where}: subgraph {d.name}'s declaration differs from what model and dtype imply; "
                             f"{fix}")
    batches = sorted({p.max["B"] for p in manifest.profiles if "B" in p.max})
    if manifest.padded and batches and batches != [manifest.max_batch]:
        raise EngineDirError(f"{where}: max_batch is {manifest.max_batch} but the profiles admit batches up to "
                             f"{batches}; {fix}")
    if manifest.max_seq_len > spec.max_seq_len:
        raise EngineDirError(f"{where}: max_seq_len {manifest.max_seq_len} exceeds the model's limit "
                             f"{spec.max_seq_len}; {fix}")
    for s in got:
        _safe_rel(s.onnx, where)
    for rel in manifest.files:
        _safe_rel(rel, where)
    if manifest.files:
        unlisted = [r for s in got for r in (s.onnx, s.onnx + ".data") if r not in manifest.files]
        if unlisted:
            raise EngineDirError(f"{where}: 'files' lacks {unlisted[:4]} that 'subgraphs' names; {fix}")
    listed = {PurePosixPath(s.onnx).name for s in got} | {PurePosixPath(s.onnx).name + ".data" for s in got}
    onnx_dir = root / "onnx"
    stray = sorted(p.name for p in onnx_dir.iterdir() if ONNX_NAME.fullmatch(p.name) and p.name not in listed) \
        if onnx_dir.is_dir() else []
    if stray:
        raise EngineDirError(f"{where} does not list {stray[:4]} found in {onnx_dir}: subgraphs were removed from "
                             f"the manifest; {fix}")


# -- sizes and content ------------------------------------------------------------------------------
def verify_files(root: Path, checks: list[FileCheck], full: bool = False, workers: int | None = None) -> VerifyReport:
    """Sizes of every file, then content: hashed where ``full`` or where the stamp does not vouch for it.

    Raises EngineDirError for missing files, IntegrityError for a wrong size or sha256.
    """
    t0 = time.perf_counter()
    missing = [p for c in checks for p in c.paths if not (root / p).is_file()]
    if missing:
        raise EngineDirError(f"{root} lacks files {missing[:6]}{' ...' if len(missing) > 6 else ''}, listed in its "
                             f"{MANIFEST}; the directory is incomplete, re-run dllm-export")
    identities = {}
    for c in checks:
        stats = [os.stat(root / p) for p in c.paths]
        for p, st, size in zip(c.paths, stats, c.sizes):
            if size is not None and st.st_size != size:
                raise IntegrityError(f"{root / p} is {st.st_size} bytes, the manifest recorded {size}: it was "
                                     "truncated or replaced after export; re-run dllm-export")
        identities[c.key] = [file_identity(st) for st in stats]
    stamp = read_stamp(root)
    todo = [c for c in checks if full or stamp.get(c.key, {}).get("sha256") != c.sha256
            or stamp[c.key].get("identity") != identities[c.key]]
    bad = []
    if todo:
        n = workers or min(8, os.cpu_count() or 1, len(todo))
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            results = list(pool.map(lambda c: hash_files([root / p for p in c.paths])[0], todo))
        for c, got in zip(todo, results):
            if got != c.sha256:
                bad.append(c.key)
            elif [file_identity(os.stat(root / p)) for p in c.paths] == identities[c.key]:
                stamp[c.key] = {"sha256": c.sha256, "identity": identities[c.key]}   # unchanged while hashed
    if bad:
        raise IntegrityError(f"{root}: {bad[:4]}{' ...' if len(bad) > 4 else ''} differ from the sha256 recorded in "
                             f"{MANIFEST} (changed after export: a damaged or edited file, or files swapped); "
                             "re-run dllm-export to rewrite them")
    if todo:
        write_stamp(root, stamp)
    sizes = [s[0] for c in checks for s in identities[c.key]]
    hashed = [s[0] for c in todo for s in identities[c.key]]
    return VerifyReport(len(sizes), sum(sizes), len(hashed), sum(hashed), time.perf_counter() - t0)
