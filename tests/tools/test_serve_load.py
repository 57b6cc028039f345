"""The load tool against a real dllm-serve: a bounded run (fixed count, time limit) that reports
throughput and p50/p99 latency per concurrency level and writes JSON. Speed is reported, not asserted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("httpx")

from dllm.tools import serve_load  # noqa: E402


def test_a_bounded_load_run_reports_and_writes_json(served, tmp_path, capsys):
    out = tmp_path / "load.json"
    assert serve_load.main([served.url, "--requests", "8", "--concurrency", "1,4", "--time-limit", "60",
                            "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["conc", "done", "err"] and len(printed) == 3
    report = json.loads(out.read_text())
    assert report["model"] == "tiny-llada" and report["client_machine"]["cpus"] >= 1
    for level, conc in zip(report["levels"], (1, 4)):
        assert level["concurrency"] == conc and level["completed"] == 8 and level["errors"] == 0
        assert level["timed_out"] == level["skipped"] == 0
        assert level["requests_per_s"] > 0 and 0 < level["latency_p50_s"] <= level["latency_p99_s"]
        assert level["ttft_p50_s"] is not None and level["accuracy"] >= 0.5     # the shipped model answers


def test_the_time_limit_bounds_the_run(served, tmp_path):
    report = serve_load.run_load(serve_load.LoadConfig(served.url, requests=40, concurrency=(2,), time_limit=0.3,
                                                       max_tokens=256, method="full", stream=False),
                                 log=lambda line: None)
    level = report["levels"][0]
    assert level["completed"] + level["errors"] + level["timed_out"] + level["skipped"] == 40
    assert level["skipped"] > 0 and level["completed"] < 40


def test_percentile_and_bad_input(capsys):
    assert serve_load.percentile([], 50) is None
    assert serve_load.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and serve_load.percentile([1.0, 9.0], 99) == 9.0
    assert serve_load.main(["localhost:8000"]) == 2
    assert "http://" in capsys.readouterr().err
    assert serve_load.main(["http://127.0.0.1:9", "--concurrency", "1,x"]) == 2
    assert "--concurrency" in capsys.readouterr().err
