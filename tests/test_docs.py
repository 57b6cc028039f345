"""The documentation stands alone and its examples work.

- every file the docs, the README and the Python sources (docstrings and comments) mention exists in the
  repository: Markdown files, paths under the repository's own folders, and Markdown link targets;
- every README ``dllm-run`` example prints the answer its comment promises on the shipped model, and the
  README's Python example runs and prints right answers;
- ``help(dllm)`` leads to Pipeline, DecodeConfig and the command lines.
"""

from __future__ import annotations

import contextlib
import io
import pydoc
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_DIRS = ("docs", "tools", "runtime", "engines", "exporter", "dllm", "scripts", "tests", ".ci")
SOURCE_DIRS = ("dllm", "engines", "exporter", "runtime", "tools", "scripts", "tests")
_TOKEN = re.compile(r"[A-Za-z0-9_.\-/]+")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def documents() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("tools/assets/*/README.md"))]
    for d in SOURCE_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    return [f for f in files if f != Path(__file__).resolve()]


def mentioned_paths(path: Path) -> set[str]:
    """Tokens of ``path`` that name a file: any ``*.md``, anything under one of the repository's folders,
    and Markdown link targets. Placeholders (``<...>``, globs, ``$VARS``) are skipped."""
    text = path.read_text()
    found = set()
    for token in _TOKEN.findall(text):
        token = token.rstrip(".,:;-")
        if token.startswith("/") or token == ".md":
            continue
        if token.endswith(".md") or (token.split("/")[0] in TOP_DIRS and "/" in token):
            found.add(token)
    if path.suffix == ".md":
        for target in _LINK.findall(text):
            if "://" not in target and not target.startswith("#"):
                found.add(target.split("#")[0])
    return {t for t in found if t and not any(c in t for c in "<>*{}$")}


def exists(token: str, source: Path) -> bool:
    return any((base / token).exists() for base in (ROOT, source.parent))


def test_every_mentioned_file_exists():
    missing = [f"{p.relative_to(ROOT)}: {t}" for p in documents() for t in sorted(mentioned_paths(p))
               if not exists(t, p)]
    assert not missing, "files mentioned but not in the repository:\n" + "\n".join(missing)


def test_docs_read_without_the_work_log():
    phrases = (r"\bthe issue'?s?\b", r"\blent\b", r"\bthis session\b", r"\bissue \d+", r"\bshared/")
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = p.read_text().lower()
        hits = [w for w in phrases if re.search(w, text)]
        assert not hits, f"{p.relative_to(ROOT)} reads like a work log: {hits}"


def test_help_dllm_leads_to_the_entry_points():
    import dllm

    text = pydoc.render_doc(dllm, renderer=pydoc.plaintext)
    for name in ("Pipeline", "DecodeConfig", "method_config", "dllm-export", "dllm-run", "dllm-bench", "dllm-eval",
                 "docs/algorithms.md"):
        assert name in text, name


# -- README examples on the shipped model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import export_checkpoint
    from dllm.tools.assets import shipped_model_dir

    return export_checkpoint(ExportConfig(shipped_model_dir(), tmp_path_factory.mktemp("readme") / "tiny-engine",
                                          validate=False))


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def run_examples() -> list[tuple[str, str]]:
    """(command, promised answer) of every README line ``dllm-run tiny-engine ... # -> ANSWER``."""
    out = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            if line.startswith("dllm-run tiny-engine") and "# -> " in line:
                command, answer = line.split("# -> ")
                out.append((command.strip(), answer.strip()))
    return out


def test_readme_has_run_examples():
    assert len(run_examples()) >= 2


@pytest.mark.parametrize("command, answer", run_examples())
def test_readme_run_example_answers(tiny_engine, capsys, command, answer):
    from dllm.runtime.cli import main

    argv = [str(tiny_engine) if a == "tiny-engine" else a for a in shlex.split(command)[1:]]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == answer, f"{command!r} printed {captured.out!r}"
    assert "latency" in captured.err and "after 1 warm-up run" in captured.err


def test_readme_python_example(tiny_engine):
    block = next(b for b in readme_blocks("python") if "Pipeline.from_dir" in b)
    code = block.replace('"tiny-engine"', repr(str(tiny_engine)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "68" and lines[1].startswith("68 ") and lines[2] == "3 8 27 45"
    assert [x.strip() for x in lines[3:6]] == ["68", "4 7 9", "67"]           # the batch, in prompt order
    streamed = {"0": "", "1": ""}
    for line in lines[6:]:                                                   # (index, piece) as they come
        index, _, piece = line.partition(" ")
        streamed[index] += piece
    assert streamed["0"].strip() == "17" and streamed["1"].strip() == "3 8 15"
