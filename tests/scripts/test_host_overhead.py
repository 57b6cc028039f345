"""scripts/host-overhead.py: the graph path's host work, timed on the CPU with graphs that run nothing."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "host-overhead.py"


def test_every_step_replays_after_warm_up_and_the_report_is_written(tmp_path):
    out = tmp_path / "host.json"
    methods = "full,dual+threshold,dcu,dcu+apd,dllm-cache,dcu@allocation=proportional,window=2"
    run = subprocess.run([sys.executable, str(SCRIPT), "--layers", "4", "--prompt", "8", "--gen-length", "16",
                          "--block-length", "8", "--repeat", "1", "--methods", methods, "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["full", "dual+threshold", "dcu", "dcu+apd", "dllm-cache",
                                       "dcu@allocation=proportional,window=2"]
    for name, m in report["methods"].items():
        # a step whose key repeats is one replay: after two warm-up decodes every step is one
        assert m["replayed_fraction"] == 1.0, name
        assert m["host_us_per_step"] > 0 and 0 < m["steps"] <= 16
    assert "dcu+apd" in run.stdout


def test_a_batch_replays_every_step_too(tmp_path):
    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--layers", "3", "--prompt", "6", "--gen-length", "16",
                          "--block-length", "8", "--repeat", "1", "--batch", "3", "--methods", "dcu+apd,full",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["batch"] == 3
    assert all(m["replayed_fraction"] == 1.0 for m in report["methods"].values())
