"""``tools/serve_load.py`` in small, over REST and gRPC: every request answered once, correctly, at two
concurrency levels, the server's own statistics counting the same requests and images; an overload run
with a tiny queue gets only 200s and 503s; and the tool does fail on answers that do not match
``Predictor`` (``--atol -1`` makes every answer wrong)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")

from tests.serve.server import ROOT  # noqa: E402

TOOL = ROOT / "tools" / "serve_load.py"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_small_load_run(tiny, tmp_path, protocol):
    report_path = tmp_path / "load.json"
    run = subprocess.run([sys.executable, str(TOOL), "-m", str(tiny), "--clients", "1,4", "--requests", "5", "--overload-clients", "6",
                          "--protocol", protocol, "--server-args", "--device cpu --max-batch-size 8", "--json", str(report_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_path.read_text())
    assert report["protocol"] == protocol and f"({protocol})" in run.stdout and "server /stats" in run.stdout
    assert [(level["clients"], level["requests"]) for level in report["levels"]] == [(1, 5), (4, 20)]
    for level in report["levels"]:
        server = level["server"]
        assert level["p50_ms"] <= level["p99_ms"]
        # the server's own statistics saw exactly the level's requests and images, in batches never past --max-batch-size
        assert server["inference_stats"]["success"]["count"] == level["requests"] and server["images"] == level["images"]
        assert sum(server["batches_by_size"].values()) == server["executions"] >= 1
        assert all(1 <= int(size) <= 8 for size in server["batches_by_size"])
        assert server["inference_stats"]["queue"]["mean_ms"] >= 0 and server["inference_stats"]["compute_infer"]["mean_ms"] > 0
    statuses = report["overload"]["statuses"]
    assert set(statuses) <= {"200", "503"} and sum(statuses.values()) == 60 and statuses.get("200", 0) >= 1


def test_load_tool_fails_on_wrong_answers(tiny):
    run = subprocess.run([sys.executable, str(TOOL), "-m", str(tiny), "--clients", "1", "--requests", "2", "--overload-clients", "0",
                          "--atol", "-1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "differ from Predictor's" in run.stderr and len(run.stderr.strip().splitlines()) == 1
