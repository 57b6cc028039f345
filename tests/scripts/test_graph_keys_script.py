"""scripts/graph-keys.py: how often graphs would replay over different prompts, with exact and bucketed rows."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "graph-keys.py"


def test_bucketed_rows_repeat_proportional_step_keys_and_the_report_is_written(tmp_path):
    out = tmp_path / "keys.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--layers", "6", "--prompt-len", "8", "--gen-length", "32",
                          "--block-length", "32", "--budget", "4", "--window", "4", "--prompts", "3",
                          "--methods", "dcu,dcu@allocation=uniform", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    prop, uniform = report["methods"]["dcu"], report["methods"]["dcu@allocation=uniform"]
    assert prop["exact"]["steps"] == prop["bucketed"]["steps"] == 3 * 32
    # proportional budgets: buckets give fewer step keys, and pad (more rows run than asked for)
    assert prop["bucketed"]["step_keys"] < prop["exact"]["step_keys"]
    assert prop["bucketed"]["step_replay"] > prop["exact"]["step_replay"]
    assert prop["bucketed"]["padding"] > 1.0 and prop["exact"]["padding"] is None
    # uniform budgets: nothing to pad, the same keys either way
    assert uniform["exact"] == uniform["bucketed"] and uniform["bucketed"]["padding"] is None
    assert "bucketed" in run.stdout
