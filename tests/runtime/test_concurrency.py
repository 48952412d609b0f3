"""One Predictor shared by threads gives the scores serial use gives (the documented rule)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from memexport.runtime.predictor import Predictor
from tests.models import write_tiny_scorer


def test_shared_predictor_matches_serial_on_resmem(resmem_onnx, sample_images, onnx_backend):
    images = sample_images[:6]
    with Predictor(resmem_onnx, batch_size=3, device="cpu", backend=onnx_backend) as predictor:
        serial = predictor.score(images)
        jobs = [images[i:] + images[:i] for i in range(4)]  # each thread its own order and batches
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(predictor.score, jobs))
    for shift, scores in enumerate(results):
        np.testing.assert_allclose(scores, np.roll(serial, -shift), atol=1e-6)


def test_many_threads_hammering_one_predictor(tmp_path, sample_images, onnx_backend):
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    with Predictor(model, batch_size=2, device="cpu", backend=onnx_backend) as predictor:
        serial = {str(p): s for p, s in zip(sample_images, predictor.score(sample_images))}
        work = [sample_images[(i * 3) % len(sample_images) :][:5] for i in range(40)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [(batch, pool.submit(predictor.score, batch)) for batch in work]
            for batch, future in futures:
                np.testing.assert_allclose(future.result(), [serial[str(p)] for p in batch], atol=1e-6)
        results = [r for batch in work for r in ThreadPoolExecutor(max_workers=4).map(lambda p: predictor.score([p])[0], batch)]
    assert np.allclose(results, [serial[str(p)] for batch in work for p in batch], atol=1e-6)
