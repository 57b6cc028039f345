"""The package runs on Python 3.10 (JetPack 6's Python): no syntax, module or function newer than 3.10.

Checked with vermin over every package directory (the ``test`` extra installs it), so a 3.11+ construct
(``except*``, ``tomllib``, ``typing.Self``, ...) fails here instead of on a Jetson.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dllm", "exporter", "engines", "runtime", "tools", "kernels", "serve")


def vermin(*paths) -> subprocess.CompletedProcess:
    exe = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(exe).exists():
        pytest.fail("vermin is not installed; pip install -e '.[test]'")
    # --eval-annotations: annotations count too; dataclasses are not a backport question on 3.10
    return subprocess.run([exe, "-t=3.10-", "--violations", "--no-tips", "--eval-annotations",
                           "--no-parse-comments", *map(str, paths)], capture_output=True, text=True, timeout=300)


def test_package_needs_no_python_newer_than_3_10():
    res = vermin(*(ROOT / p for p in PACKAGES))
    assert res.returncode == 0, f"code needs a Python newer than 3.10:\n{res.stdout}{res.stderr}"


def test_the_check_catches_3_11_code(tmp_path):
    (tmp_path / "new.py").write_text("import tomllib\n")
    res = vermin(tmp_path)
    assert res.returncode != 0 and "tomllib" in res.stdout
