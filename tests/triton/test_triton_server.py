"""A real ``tritonserver`` (nvidia-pytriton's, Python back end only) serving a ``memexport triton-repo``
repository for the real ResMem ONNX: memexport's preprocessing step, the ensemble with the serve
interface, and the Python-back-end scorer stand-in (this server has no ONNX Runtime back end).

Photos of different sizes in one request score as ``predict`` scores them, concurrent requests are
batched (the server's own batch statistics), a bad row fails its request with one line per row, and
``examples/v2_client.py`` works against the ensemble unchanged.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import have
from tests.triton.server import ROOT, TritonServer, triton_env

RESMEM = ROOT / "artifacts" / "resmem.onnx"
ENV, WHY = triton_env()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ENV is None, reason=f"no tritonserver: {WHY}"),
    pytest.mark.skipif(not RESMEM.is_file(), reason="artifacts/resmem.onnx is not there (make demo)"),
    pytest.mark.skipif(not have("tritonclient"), reason="tritonclient is not installed (pip install 'memexport[triton]')"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from memexport.triton.writer import TritonOptions, triton_repo_from_artifacts

    work = tmp_path_factory.mktemp("triton")
    # The stub's own site-packages (numpy<2, memexport editable) named explicitly, as a user would.
    options = TritonOptions(max_batch_size=8, max_queue_delay_us=50_000, python_scorer=True, sys_path=(str(ENV.site),))
    triton_repo_from_artifacts([RESMEM], work / "repo", options)
    running = TritonServer(ENV, work / "repo", work)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def predicted(sample_images):
    from memexport import Predictor

    with Predictor(RESMEM, device="cpu") as predictor:
        return dict(zip(sample_images, predictor.score(sample_images).tolist()))


def request(url: str, rows: list[bytes]):
    import tritonclient.http as httpclient

    data = np.array([[row] for row in rows], dtype=np.object_)
    image = httpclient.InferInput("image", list(data.shape), "BYTES")
    image.set_data_from_numpy(data, binary_data=True)
    with httpclient.InferenceServerClient(url) as client:
        return client.infer("resmem", [image], outputs=[httpclient.InferRequestedOutput("score", binary_data=True)]).as_numpy("score")


def test_photos_of_different_sizes_in_one_request_score_as_predict(server, sample_images, predicted):
    from PIL import Image

    assert len({Image.open(p).size for p in sample_images}) > 1
    scores = request(server.url, [p.read_bytes() for p in sample_images])
    assert scores.shape == (len(sample_images), 1) and scores.dtype == np.float32
    np.testing.assert_allclose(scores[:, 0], [predicted[p] for p in sample_images], rtol=0, atol=1e-6)


def test_the_v2_example_client_works_against_the_ensemble_unchanged(server, sample_images, predicted):
    paths = [str(p) for p in sample_images[:3]]
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "v2_client.py"), "--url", server.url, "--model", "resmem", *paths],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line.rsplit(",", 1) for line in done.stdout.splitlines()]
    assert [path for path, _ in lines] == paths
    np.testing.assert_allclose([float(s) for _, s in lines], [predicted[Path(p)] for p in paths], rtol=0, atol=1e-6)
    broken = subprocess.run([sys.executable, str(ROOT / "examples" / "v2_client.py"), "--url", server.url, "--model", "resmem", paths[0], __file__],
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1 and len(broken.stderr.strip().splitlines()) == 1 and "row 1:" in broken.stderr


def test_bad_rows_fail_their_request_with_one_line_per_row(server, sample_images):
    from tritonclient.utils import InferenceServerException

    good = sample_images[0].read_bytes()
    with pytest.raises(InferenceServerException) as caught:
        request(server.url, [good, b"not an image", good[: len(good) // 3]])
    lines = [line for line in str(caught.value).splitlines() if "row " in line]
    assert [line[line.index("row "):].split(":")[0] for line in lines] == ["row 1", "row 2"]
    assert request(server.url, [good]).shape == (1, 1)  # the server is still fine


def batch_counts(url: str, model: str) -> dict[int, int]:
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    return {int(entry["batch_size"]): int(entry["compute_infer"]["count"]) for entry in stats.get("batch_stats", [])}


def test_concurrent_requests_are_batched(server, sample_images, predicted):
    before = batch_counts(server.url, "resmem_python")
    results, errors = {}, []

    def one(index: int) -> None:
        try:
            results[index] = float(request(server.url, [sample_images[index].read_bytes()])[0, 0])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sample_images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(results) == len(sample_images)
    np.testing.assert_allclose([results[i] for i in range(len(sample_images))], [predicted[p] for p in sample_images], rtol=0, atol=1e-6)
    after = batch_counts(server.url, "resmem_python")
    grown = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * count for size, count in grown.items()) == len(sample_images)
    assert any(size > 1 and count > 0 for size, count in grown.items()), f"no batch over 1 image formed: {grown}"
