"""The engine directory on disk (docs/engine-dir.md): atomic swaps, what an export owns, the export lock,
resumable work, tokenizer files.

An export builds everything in ``.<out>.partial`` beside the output and swaps it onto the output at
the very end, after writing ``manifest.json`` last. Until then the output is either absent or the
previous complete export, and the partial directory has no manifest, so ``read_manifest`` fails on
anything an interrupted export leaves behind. On Linux the swap is one atomic ``renameat2``
exchange, so a kill at any moment leaves the old directory or the new one; elsewhere it is two
renames, and the next export puts the old directory back if a kill fell between them.

**Ownership.** An export owns exactly the files its manifest lists (``files``), the manifest, the
verified stamp, and its own lock and partial directories. Anything else in the output (notes, bench
reports, a checkpoint) is carried into the new directory untouched (hard-linked, or copied where the
filesystem has no hard links); where such a file sits exactly where the new export writes one, the
export refuses with a message naming it, before the swap.

**Lock.** ``.<out>.lock`` beside the output is held (``flock``) for the whole export, so a second
export into the same path stops at once with a message instead of mixing files with the first.

Finished work is recorded in ``.<out>.partial/.state/`` (one JSON per ONNX subgraph or plan,
written after its files are complete). A re-run reuses a subgraph whose input hash is
unchanged from those records or from the previous complete output's manifest, after
checking the files' sha256; files are hard-linked, not copied, where the filesystem allows.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from dllm.errors import CheckpointError, DllmWarning, EngineDirError, ExportError
from dllm.exporter.integrity import STAMP, hash_files, stamp_entries, write_stamp
from dllm.exporter.manifest import MANIFEST, Manifest, read_manifest

ONNX_DIR, PLANS_DIR, TOKENIZER_DIR, STATE_DIR = "onnx", "plans", "tokenizer", ".state"

# Files a Hugging Face tokenizer may consist of (copied when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")


# Paths an export may write (relative, posix): what an unreadable old manifest is assumed to own.
_EXPORTER_PATHS = re.compile(r"onnx/(embed|head|layer_\d+|vproj_\d+)\.onnx(\.data)?"
                             r"|plans/[^/]+/((embed|head|layer_\d+|vproj_\d+)\.plan|timing\.cache)"
                             r"|tokenizer/[^/]+|\.verified[^/]*")


def files_sha256(paths) -> str:
    """sha256 over the bytes of ``paths`` in order (an ONNX file, then its external data)."""
    return hash_files(paths)[0]


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


# -- ownership ------------------------------------------------------------------------------------
def owned_files(out: Path) -> set[str]:
    """Relative paths the export that wrote ``out`` owns: its manifest, stamp and listed files."""
    present = _walk(out)
    owned = {MANIFEST} | {r for r in present if r.startswith(".verified")}      # the stamp and its temp files
    try:
        m = read_manifest(out)
    except EngineDirError:                            # unreadable: assume what an export could have written
        return owned | {r for r in present if _EXPORTER_PATHS.fullmatch(r)}
    if m.files:
        return owned | set(m.files)
    # a manifest of the first release: subgraph files, plans, and the exporter's files in tokenizer/ and plans/
    owned |= {r for s in m.subgraphs for r in (s.onnx, s.onnx + ".data")}
    owned |= {e["file"] for plans in m.plans.values() for e in plans.values() if isinstance(e, dict) and "file" in e}
    return owned | {r for r in present if r.startswith((f"{TOKENIZER_DIR}/", f"{PLANS_DIR}/"))
                    and _EXPORTER_PATHS.fullmatch(r)}


def _walk(root: Path) -> list[str]:
    """Every file, symlink and empty directory under ``root``, as relative posix paths (dirs end in /)."""
    out = []
    for base, dirs, files in os.walk(root):
        rel = Path(base).relative_to(root)
        for d in list(dirs):
            if os.path.islink(os.path.join(base, d)):       # a link to a folder: carried as a link
                files.append(d)
                dirs.remove(d)
        out += [(rel / f).as_posix() for f in files]
        if not dirs and not files and base != str(root):
            out.append(rel.as_posix() + "/")
    return out


def foreign_files(out: Path) -> list[str]:
    """What ``out`` holds that its export does not own: to carry over, never to delete."""
    if not out.is_dir():
        return []
    owned = owned_files(out)
    return sorted(r for r in _walk(out) if r not in owned and not (r.endswith("/") and _is_ours_dir(r)))


def _is_ours_dir(rel: str) -> bool:
    """The folders an export creates (an empty one is not worth carrying)."""
    return rel.rstrip("/") in (ONNX_DIR, PLANS_DIR, TOKENIZER_DIR) or re.fullmatch(rf"{PLANS_DIR}/[^/]+/", rel)


def _clashes(foreign: list[str], new_paths: set[str]) -> list[str]:
    """Foreign entries that sit where the new export puts a file, or where it needs a folder."""
    folders = {p.as_posix() for r in new_paths for p in Path(r).parents}
    return [r for r in foreign if r.rstrip("/") in new_paths or (not r.endswith("/") and r in folders)]


def _refuse_clash(out: Path, clashes: list[str]) -> ExportError:
    return ExportError(f"output {out} holds files this export would overwrite but did not write: {clashes[:6]}"
                       f"{' ...' if len(clashes) > 6 else ''}; move them out of {out} or choose another -o")


def prepare_output(out: Path) -> Path:
    """Check ``out`` can be written and return the partial directory to build in (kept if it exists)."""
    if out.is_symlink():
        raise ExportError(f"output {out} is a symbolic link; pass the directory it points to "
                          f"({os.path.realpath(out)}) with -o, so the link itself is left alone")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is a file; pass a directory path with -o")
    _restore_interrupted_swap(out)
    if out.is_dir() and not os.path.lexists(out / MANIFEST):
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise ExportError(f"output {out} exists, is not empty ({entries[:6]}{' ...' if len(entries) > 6 else ''}) "
                              f"and is not an engine directory (no {MANIFEST}); refusing to replace it: choose "
                              "another -o, or an empty or new directory")
    clashes = [r for r in foreign_files(out) if _EXPORTER_PATHS.fullmatch(r.rstrip("/"))]
    if clashes:
        raise _refuse_clash(out, clashes)
    _check_parents(out)
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


def _check_parents(out: Path) -> None:
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"cannot write the output {out}: {parent} is a file, not a directory; "
                                  "choose a writable -o directory")
            return


def _restore_interrupted_swap(out: Path) -> None:
    """Without an atomic exchange, a kill between the two renames leaves the old output in ``.<out>.old``."""
    old = _old_dir(out)
    if not os.path.lexists(out) and (old / MANIFEST).is_file():
        os.rename(old, out)


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
        self.digests: dict[tuple, str] = {}      # file identity -> sha256 of the files hashed so far
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
            except (ValueError, OSError):             # a record half-written by a kill, or damaged
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

    def _intact(self, root: Path, record: dict) -> bool:
        rels = record.get("files")
        if not isinstance(rels, list) or not rels or not all(isinstance(r, str) for r in rels):
            return False
        paths = [root / rel for rel in rels]
        if not all(p.is_file() for p in paths):
            return False
        combined, each = hash_files(paths)
        for p, sha in zip(paths, each):
            self.digests[_digest_key(p)] = sha
        return combined == record.get("sha256")

    def file_digest(self, path: Path) -> str:
        """sha256 of one file, from the hashes this run already computed when its identity is unchanged."""
        key = _digest_key(path)
        if key not in self.digests:
            self.digests[key] = hash_files([path])[1][0]
        return self.digests[key]


def _digest_key(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


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
    check_tokenizer(tmp, checkpoint)
    return [f"{TOKENIZER_DIR}/{f}" for f in present]


def check_tokenizer(tmp: Path, checkpoint: Path) -> None:
    """The copied tokenizer files parse: every JSON file as JSON, tokenizer.json as a ``tokenizers``
    tokenizer. (Not through AutoTokenizer: a model whose tokenizer class lives in remote code would
    fail there for a reason that has nothing to do with damaged files.)"""
    from tokenizers import Tokenizer

    for path in sorted((tmp / TOKENIZER_DIR).glob("*.json")):
        try:
            json.loads(path.read_bytes().decode("utf-8"))
            if path.name == "tokenizer.json":
                Tokenizer.from_file(str(path))
        except Exception as e:   # JSON, UTF-8 and the tokenizers library's own parse errors
            raise CheckpointError(f"the tokenizer file {checkpoint / path.name} is damaged ({type(e).__name__}: "
                                  f"{str(e)[:160]}); re-download it from the model's repository") from None


def finalize(tmp: Path, out: Path, manifest: Manifest, keep: set[str], records: WorkRecords | None = None) -> Path:
    """Prune the partial directory to ``keep``, record every file in the manifest, carry over what the
    output holds that the export does not own, write the manifest, and swap the directory onto ``out``."""
    _prune(tmp, keep)
    digest = records.file_digest if records is not None else (lambda p: hash_files([p])[1][0])
    files = {rel: {"size": (tmp / rel).stat().st_size, "sha256": digest(tmp / rel)} for rel in sorted(keep)}
    manifest = dataclasses.replace(manifest, files=files)
    carried = _carry_over(out, tmp, set(files))
    manifest.write(tmp)                               # the last file: only now can the directory load
    if out.exists():
        if _exchange(tmp, out):                       # atomic: ``out`` is the old or the new directory
            _remove_old(tmp, out, carried)
        else:
            old = _old_dir(out)
            if old.exists():                          # left by an earlier kill during its cleanup
                _remove_old(old, out, carried)
            os.rename(out, old)
            os.rename(tmp, out)
            _remove_old(old, out, carried)
    else:
        os.rename(tmp, out)
    write_stamp(out, stamp_entries(out, {rel: f["sha256"] for rel, f in files.items()}))
    return out


def _prune(tmp: Path, keep: set[str]) -> None:
    """Delete everything in the partial directory (ours) that the new export does not list."""
    for base, dirs, names in os.walk(tmp, topdown=False):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(base, d))]:
            path = Path(base) / name
            if path.relative_to(tmp).as_posix() not in keep:
                path.unlink()
        for d in dirs:
            path = Path(base) / d
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()


def _carry_over(out: Path, tmp: Path, new_files: set[str]) -> list[str]:
    """Link (or copy) every entry of ``out`` the export does not own into ``tmp``; refuse on a clash."""
    foreign = foreign_files(out)
    clashes = _clashes(foreign, new_files | {MANIFEST, STAMP})
    if clashes:
        raise _refuse_clash(out, clashes)
    for rel in foreign:
        src, dst = out / rel, tmp / rel
        if rel.endswith("/"):
            dst.mkdir(parents=True, exist_ok=True)
        elif src.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dst)
        else:
            link_or_copy(src, dst)
    return foreign


def _remove_old(old: Path, out: Path, carried: list[str]) -> None:
    """Delete the previous directory after the swap: its manifest first (so it never loads), then the files it
    owned and those carried into ``out``. Anything else (written there during the export) is kept aside."""
    removable = owned_files(old) | {r for r in carried if os.path.lexists(out / r.rstrip("/"))}
    (old / MANIFEST).unlink(missing_ok=True)
    left = []
    for rel in _walk(old):
        path = old / rel.rstrip("/")
        if rel.endswith("/"):
            path.rmdir()
        elif rel in removable:
            path.unlink()
        else:
            left.append(rel)
    if left:
        aside = old.with_name(f"{old.name}-kept-{os.getpid()}")
        os.rename(old, aside)
        warnings.warn(f"{out}: files {left[:6]} appeared during the export and are not in the new directory; "
                      f"they were kept in {aside}", DllmWarning)
        return
    shutil.rmtree(old)                                # only empty folders are left


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):                 # glibc < 2.28, or no libc symbol table
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):   # a filesystem without the exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


# -- the lock -------------------------------------------------------------------------------------
class ExportLock:
    """Held for a whole export into ``out``; a second export into the same path fails at once.

    ``flock`` is released by the kernel when the process dies, so a killed export never leaves a
    stale lock; the lock file is removed on the way out.
    """

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, lock_path(out), None
        self.created: list[Path] = []             # folders made for the output, removed again if left empty

    def __enter__(self) -> "ExportLock":
        try:
            import fcntl
        except ImportError:                           # no flock (Windows): no lock
            return self
        _check_parents(self.out)
        self.created = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"cannot write the output {self.out} ({e.strerror or e}: {e.filename}); choose a "
                              "writable -o directory") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ExportError(f"cannot write the output {self.out} ({e.strerror or e}: {self.path}); choose a "
                                  "writable -o directory") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ExportError(f"another dllm-export (pid {holder}) is writing {self.out} right now; wait for it "
                                  "to finish, or choose another -o") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:                                  # else the holder removed the file meanwhile: lock anew
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)                      # while still held: nobody can lock the old file
        except OSError:
            pass
        os.close(self.fd)                             # releases the flock
        self.fd = None
        for folder in self.created:                   # deepest first; a failed export leaves no empty folders
            try:
                folder.rmdir()
            except OSError:
                break
