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
    # one bucket for a whole step: more steps repeat, for more rows
    one = prop["one-bucket"]
    assert one["step_keys"] < prop["bucketed"]["step_keys"] and one["step_replay"] > prop["bucketed"]["step_replay"]
    assert one["padding"] > prop["bucketed"]["padding"]
    # uniform budgets: nothing to pad, the same keys either way
    assert uniform["exact"] == uniform["bucketed"] == uniform["one-bucket"] and uniform["bucketed"]["padding"] is None
    assert "bucketed" in run.stdout and "one-bucket" in run.stdout


def _keys(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--layers", "4", "--gen-length", "16", "--block-length", "8",
                          "--budget", "2", "--window", "2", "--prompts", "5", "--batch", "2", "--arrive-every", "3",
                          "--methods", "dcu@allocation=uniform", "--json", str(out), *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text())


def test_staggered_arrivals_of_mixed_lengths_start_new_keys(tmp_path):
    one = _keys(tmp_path, "one", "--prompt-len", "8")
    mixed = _keys(tmp_path, "mixed", "--prompt-len", "4", "--prompt-len-max", "12")
    assert one["arrive_every"] == mixed["arrive_every"] == 3 and mixed["prompt_len_max"] == 12
    a, b = one["methods"]["dcu@allocation=uniform"]["exact"], mixed["methods"]["dcu@allocation=uniform"]["exact"]
    assert a["steps"] > 0 and b["steps"] > 0
    # each new mix of canvas lengths is a new key: prompts of one length share theirs
    assert b["step_keys"] > a["step_keys"]


def test_bad_arguments_are_named():
    run = subprocess.run([sys.executable, str(SCRIPT), "--arrive-every", "3"], capture_output=True, text=True)
    assert run.returncode != 0 and "--batch 2 or more" in run.stderr
    run = subprocess.run([sys.executable, str(SCRIPT), "--prompt-len", "9", "--prompt-len-max", "4"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "below --prompt-len 9" in run.stderr
    run = subprocess.run([sys.executable, str(SCRIPT), "--rows", "exact,buckets"], capture_output=True, text=True)
    assert run.returncode != 0 and "give some of exact,bucketed,one-bucket" in run.stderr
