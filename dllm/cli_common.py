"""What every command-line tool shares: one-line errors, exit codes, the debug switch and output checks.

Every ``dllm-*`` command runs its body through ``run_cli`` and parses flags with ``Parser``, so that

- a bad flag value, a bad file or a missing package ends in ONE line on stderr, ``PROG: error: ...``,
  that names the problem and the fix, and exit code 2 (no traceback);
- Ctrl-C ends in one line and exit code 130 (128 + SIGINT, the shell convention);
- an unexpected failure (a bug, or the system refusing: disk full, out of memory) ends in one line
  and exit code 1;
- ``DLLM_DEBUG=1`` in the environment adds the Python traceback to any of these, for bug reports;
- warnings of the toolkit (``DllmWarning``) print as one line, ``PROG: warning: ...``.

Output files named by flags (``--json``, ``--plot``, ``--out``) are checked before any work starts,
so a typo in a path does not throw away an hour of measurements.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Callable

from dllm.errors import ConfigError, DllmError, DllmWarning

DEBUG_ENV = "DLLM_DEBUG"
EXIT_OK = 0
EXIT_FAILURE = 1        # unexpected: a bug, or the system refused (disk full, out of memory)
EXIT_BAD_INPUT = 2      # a flag, file or environment the user can fix (argparse uses 2 as well)
EXIT_INTERRUPTED = 130  # Ctrl-C


def debug_enabled() -> bool:
    """Whether ``DLLM_DEBUG`` asks for tracebacks (any value but empty, 0, false, no, off)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def one_line(text: object) -> str:
    """``text`` on one line: messages that quote other tools' errors may span several."""
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit code 2.

    The stock parser prints the whole usage block first, which for the decoding tools is a dozen lines.
    """

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _show_warning(prog: str, fallback):
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DllmWarning):
            print(f"{prog}: warning: {one_line(message)}", file=sys.stderr, flush=True)
        else:
            fallback(message, category, filename, lineno, file, line)
    return show


def run_cli(prog: str, body: Callable[[], int | None], interrupted_hint: str = "") -> int:
    """Run a command's body and turn every way it can end into an exit code and at most one line.

    ``interrupted_hint`` is appended to the Ctrl-C line (e.g. that an export resumes where it stopped).
    """
    debug = debug_enabled()

    def fail(kind: str, message: str, code: int) -> int:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {kind}: {one_line(message)}", file=sys.stderr, flush=True)
        return code

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning(prog, warnings.showwarning)
        try:
            code = body()
            return EXIT_OK if code is None else code
        except KeyboardInterrupt:
            return fail("interrupted", f"stopped by Ctrl-C{'; ' + interrupted_hint if interrupted_hint else ''}",
                        EXIT_INTERRUPTED)
        except DllmError as e:
            return fail("error", str(e), EXIT_BAD_INPUT)
        except MemoryError:
            return fail("error", "out of memory; try a smaller model, shorter --gen-length or a machine with more "
                                 "memory", EXIT_FAILURE)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            return fail("error", f"{e.strerror or e}{where}; check the path, its permissions and the free disk "
                                 f"space (set {DEBUG_ENV}=1 to see where it happened)", EXIT_FAILURE)
        except Exception as e:   # the last line of defence: never a bare traceback
            if type(e).__name__ == "OutOfMemoryError":      # torch.OutOfMemoryError (CUDA)
                return fail("error", f"the GPU ran out of memory ({str(e).splitlines()[0]}); try a shorter "
                                     "--gen-length, a smaller model or a bigger GPU", EXIT_FAILURE)
            return fail("error", f"unexpected {type(e).__name__}: {e}; this is a bug, please report it with the "
                                 f"traceback that {DEBUG_ENV}=1 prints", EXIT_FAILURE)


# -- output paths -----------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return parent
    return Path(path.anchor or ".")


def _probe_writable(directory: Path, flag: str, path: Path) -> None:
    """Create and remove a file in ``directory`` (os.access says yes to root on read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".dllm-write-test-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {directory} ({e.strerror or e}); choose a writable "
                          "path") from None


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail early when ``path`` cannot become a file: it is a directory, or its folder is not writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        example = p / ("out" + (p.suffix or ".json"))
        raise ConfigError(f"{flag} {p} is a directory; pass a file path inside it, e.g. {example}")
    ancestor = p.parent if p.parent.is_dir() else _existing_ancestor(p)
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {p}: {ancestor} is a file, not a directory; choose another path")
    _probe_writable(ancestor, flag, p)
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"{flag} {p} exists and is read-only; choose another path or make it writable")
    return p


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Fail early when ``path`` cannot become a new directory: it is a file, or its folder is not writable."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file; pass a directory path")
    ancestor = p if p.is_dir() else _existing_ancestor(p)
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {p}: {ancestor} is a file, not a directory; choose another path")
    _probe_writable(ancestor, flag, p)
    return p


def _file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: str | os.PathLike, text: str, flag: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all (temp file + rename), errors naming ``flag``."""
    p = Path(path).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, _file_mode(p))         # mkstemp makes 0600; give the usual umask-based mode
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ConfigError(f"{flag} {p}: could not write it ({e.strerror or e}); choose a writable file path") from None
    return p
