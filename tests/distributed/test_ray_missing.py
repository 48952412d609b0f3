"""Without Ray: memexport still imports, and --engine ray says how to install it, in one line."""

from __future__ import annotations

import subprocess
import sys

BLOCK_RAY = "import sys; sys.modules['ray'] = None; sys.argv[0] = 'memexport'; from memexport.cli import main; main()"


def test_engine_ray_without_ray_is_one_line_and_exit_2(tmp_path, data_dir):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, "predict", str(data_dir), "-m", str(model), "-o", str(tmp_path / "s.csv"), "--engine", "ray"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: scoring with --engine ray needs ray, which is not installed; install it with pip install 'memexport[ray]'"
    ]
    assert not (tmp_path / "s.csv").exists()  # refused before touching the output


def test_help_and_local_predict_work_without_ray():
    result = subprocess.run([sys.executable, "-c", BLOCK_RAY, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--engine" in result.stdout
