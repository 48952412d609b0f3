"""A file that kills its Ray actor every time gets an error row after a bounded number of deaths, and
the job ends (exit 1) with every other file scored once. Runs ``memexport predict --engine ray`` in a
child process, on its own local Ray instance whose workers crash on one file (tests/distributed/crash_hook.py),
under a time limit: before the bound, Ray Data retried that file for ever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.ray_helpers import ray  # noqa: F401 - skips this module without Ray
from memexport.runtime.batch import errors_path_for
from tests.distributed.crash_hook import CRASH_MARK
from tests.scoring import expected_tiny, rows, write_copies

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 240  # a job that never ends fails here instead of hanging the suite (it ends in about 1 min)

DRIVER = """
import sys
import ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2,
         runtime_env={"worker_process_setup_hook": "tests.distributed.crash_hook.install"})
from memexport.cli import main
sys.argv = ["memexport", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # about 1 min: three actor restarts
def test_a_file_that_kills_its_actor_every_time_gets_an_error_row_and_the_job_ends(tiny, tmp_path, data_dir):
    folder = write_copies(tmp_path / "photos", data_dir / "china.jpg", 12)
    crash = folder / f"img_0005-{CRASH_MARK}.jpg"
    crash.write_bytes((data_dir / "china.jpg").read_bytes())
    out = tmp_path / "scores.csv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, "-c", DRIVER, "predict", str(folder), "-m", str(tiny), "-o", str(out), "--engine", "ray",
            "--actors", "1", "--cpus-per-actor", "1", "--batch-size", "4", "--device", "cpu"]
    child = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's own session: its driver and the Ray it started
        child.communicate()
        raise AssertionError(f"the job did not end within {LIMIT_S} s: the crashing file was retried without bound") from None
    text = stdout.decode(errors="replace") + stderr.decode(errors="replace")
    assert child.returncode == 1, text
    assert "Traceback" not in text and "scored 12 images" in text and "1 failed (1 worker-died)" in text
    scored = {Path(row[0]).name: float(row[2]) for row in rows(out)[1:]}
    assert sorted(scored) == sorted(p.name for p in folder.iterdir() if p != crash)  # each good file once
    assert all(abs(score - expected_tiny(crash)) < 1e-6 for score in scored.values())
    errors = rows(errors_path_for(out))[1:]
    assert [Path(row[0]).name for row in errors] == [crash.name]
    assert errors[0][1].startswith("worker-died: worker died 3 times on this file")
