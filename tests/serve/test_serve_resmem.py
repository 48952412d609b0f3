"""End to end on the real ResMem artifact: ``examples/v2_client.py --model resmem`` against
``memexport serve`` gives ``Predictor``'s scores (ONNX Runtime FP32) to 1e-6."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")
pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (test extra)")

from memexport.runtime.predictor import Predictor  # noqa: E402
from tests.serve.server import ROOT, running  # noqa: E402


@pytest.mark.slow
def test_real_resmem_through_the_example_client(resmem_artifact, sample_images):
    photos = sample_images[:5]
    with Predictor(resmem_artifact, device="cpu") as predictor:
        expected = predictor.score(photos)
    for server in running(resmem_artifact, "--device", "cpu", "--max-batch-size", "4"):
        run = subprocess.run([sys.executable, str(ROOT / "examples" / "v2_client.py"), "--url", server.url, "--model", "resmem",
                              *map(str, photos)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = np.array([float(line.rsplit(",", 1)[1]) for line in run.stdout.splitlines()], np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
