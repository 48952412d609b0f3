"""``tools/serve_load.py`` in small: every request answered once, correctly, at two concurrency
levels; an overload run with a tiny queue gets only 200s and 503s; and the tool does fail on
answers that do not match ``Predictor`` (``--atol -1`` makes every answer wrong)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")

from tests.serve.server import ROOT  # noqa: E402

TOOL = ROOT / "tools" / "serve_load.py"


def test_small_load_run(tiny, tmp_path):
    report_path = tmp_path / "load.json"
    run = subprocess.run([sys.executable, str(TOOL), "-m", str(tiny), "--clients", "1,4", "--requests", "5", "--overload-clients", "6",
                          "--server-args", "--device cpu --max-batch-size 8", "--json", str(report_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_path.read_text())
    assert [(level["clients"], level["requests"]) for level in report["levels"]] == [(1, 5), (4, 20)]
    for level in report["levels"]:
        assert level["p50_ms"] <= level["p99_ms"] and sum(level["batches_by_bucket"].values()) >= 1
        assert all(float(le) <= 8 for le, count in level["batches_by_bucket"].items() if count)  # never past --max-batch-size
    statuses = report["overload"]["statuses"]
    assert set(statuses) <= {"200", "503"} and sum(statuses.values()) == 60 and statuses.get("200", 0) >= 1


def test_load_tool_fails_on_wrong_answers(tiny):
    run = subprocess.run([sys.executable, str(TOOL), "-m", str(tiny), "--clients", "1", "--requests", "2", "--overload-clients", "0",
                          "--atol", "-1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "differ from Predictor's" in run.stderr and len(run.stderr.strip().splitlines()) == 1
