"""What every dllm-* command shares: --version, --threads, one spelling per choice, fast --help, log-friendly progress."""

import importlib
import io
import subprocess
import sys

import pytest

from dllm.cli import Progress, show, spelled
from dllm.runtime.config import ApdMode, CachePolicyKind

TOOLS = {"dllm-export": "dllm.exporter.cli:parser", "dllm-run": "dllm.runtime.cli:build_parser",
         "dllm-bench": "dllm.tools.bench:build_parser", "dllm-eval": "dllm.tools.eval:build_parser",
         "dllm-demo": "dllm.tools.demo:build_parser", "dllm-train-tiny": "dllm.tools.train_tiny:build_parser"}


def parser_of(tool):
    module, func = TOOLS[tool].split(":")
    return getattr(importlib.import_module(module), func)()


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_option_has_help_and_every_tool_has_version_and_threads(tool, capsys):
    p = parser_of(tool)
    flags = {s for a in p._actions for s in a.option_strings}
    assert {"--version", "--threads", "--help"} <= flags
    undocumented = [a.option_strings or a.dest for a in p._actions if not a.help]
    assert not undocumented, f"{tool}: options without help: {undocumented}"
    assert not p.description.lstrip().startswith(("``", "`", "*", "#")), "descriptions are plain text"
    text = p.format_help()
    assert "_" not in "".join(a.metavar or "" for a in p._actions if a.choices)     # one spelling: hyphens
    for raw in ("Kind.", "Proxy.", "Alg.", "Remasking.", "ApdMode.", "Device.", "LossKind."):
        assert raw not in text, f"{tool} shows a Python enum name: {raw}"
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--version"])
    assert exc.value.code == 0 and "(dllm-deploy)" in capsys.readouterr().out


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_does_not_load_torch(tool):
    """--help and --version answer before torch loads (the parsers are built from light modules)."""
    module, func = TOOLS[tool].split(":")
    code = f"import sys, {module} as m; m.{func}().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.strip() == "False"


def test_choice_spelling_and_defaults_as_typed():
    assert spelled("per_token") == "per-token" and spelled(" DLLM_cache ") == "dllm-cache"
    assert show(ApdMode.PER_TOKEN) == "per-token" and show(CachePolicyKind.DLLM_CACHE) == "dllm-cache"
    assert show(None) == "off" and show(0.0) == "0" and show(200.0) == "200" and show(0.25) == "0.25"


def test_progress_in_logs_is_one_line_per_item():
    stream = io.StringIO()
    progress = Progress(stream)
    progress.update("export", 2, "embed", "start", done=False)
    progress.update("export", 2, "embed", "done", done=True)
    progress.update("export", 2, "head", "skipped", done=True)
    progress.close()
    assert stream.getvalue() == "export: 1/2 embed done\nexport: 2/2 head skipped\n"
