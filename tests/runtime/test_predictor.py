"""Predictor: the app-facing API, including a run with torch and onnx absent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from memexport.core.errors import InputImageError, UsageError
from memexport.runtime.predictor import Predictor
from memexport.runtime.base import RunnerOptions
from memexport.runtime.registry import runner_for


def test_scores_match_original_resmem(resmem_onnx, sample_images, reference_scores, onnx_backend):
    with Predictor(resmem_onnx, batch_size=3, device="cpu", backend=onnx_backend) as predictor:
        assert predictor.runner.backend == onnx_backend and predictor.runner.precision == "fp32"
        scores = predictor.score(sample_images)
    expected = np.array([reference_scores[p.name] for p in sample_images])
    assert scores.shape == (len(sample_images),) and scores.dtype == np.float32
    assert np.abs(scores - expected).max() <= 1e-4


def test_accepts_pil_images_and_arrays(resmem_onnx, sample_images, reference_scores):
    path = sample_images[0]
    with Image.open(path) as image:
        image.load()
        with Predictor(resmem_onnx, device="cpu") as predictor:
            from_pil = predictor.score(image)
            from_array = predictor.score(np.asarray(image.convert("RGB")))
            from_path = predictor.score(str(path))
    assert from_pil[0] == pytest.approx(reference_scores[path.name], abs=1e-4)
    np.testing.assert_allclose(from_array, from_path, atol=1e-6)


def test_score_iter_keeps_good_results_around_bad_inputs(resmem_onnx, sample_images, reference_scores, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    inputs = [sample_images[0], tmp_path / "missing.png", broken, sample_images[1]]
    with Predictor(resmem_onnx, batch_size=2, device="cpu") as predictor:
        results = list(predictor.score_iter(inputs))
    assert [r.error.reason if r.error else None for r in results] == [None, "missing", "not-an-image", None]
    assert results[0].score == pytest.approx(reference_scores[sample_images[0].name], abs=1e-4)
    assert results[3].score == pytest.approx(reference_scores[sample_images[1].name], abs=1e-4)
    with Predictor(resmem_onnx, device="cpu") as predictor, pytest.raises(InputImageError, match="broken.jpg"):
        predictor.score([sample_images[0], broken])


def test_runner_contract_rejects_bad_batches(resmem_onnx, onnx_backend):
    runner = runner_for(resmem_onnx, RunnerOptions(device="cpu"), onnx_backend)
    with pytest.raises(UsageError, match="not active"):
        runner.infer(np.zeros((1, 3, 227, 227), np.float32))
    with runner:
        with pytest.raises(UsageError, match=r"expected a float32 batch of shape \(N, 3, 227, 227\), got float64"):
            runner.infer(np.zeros((1, 3, 227, 227)))
        with pytest.raises(UsageError, match=r"got float32 \(1, 3, 224, 224\)"):
            runner.infer(np.zeros((1, 3, 224, 224), np.float32))
        assert runner.infer(np.zeros((2, 3, 227, 227), np.float32)).shape == (2,)


def test_runner_splits_batches_over_its_limit(resmem_onnx, monkeypatch, onnx_backend):
    calls = []
    runner = runner_for(resmem_onnx, RunnerOptions(device="cpu"), onnx_backend)
    monkeypatch.setattr(type(runner), "max_batch", property(lambda self: 2))
    with runner:
        original = runner._infer
        runner._infer = lambda batch: calls.append(len(batch)) or original(batch)
        batch = np.random.default_rng(0).random((5, 3, 227, 227), dtype=np.float32)
        split = runner.infer(batch)
    assert calls == [2, 2, 1]
    monkeypatch.undo()
    with runner_for(resmem_onnx, RunnerOptions(device="cpu"), onnx_backend) as whole:
        np.testing.assert_allclose(split, whole.infer(batch), atol=1e-6)


def test_runtime_scores_images_with_torch_and_onnx_absent(resmem_onnx, sample_images, reference_scores, onnx_backend):
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "tensorrt", "scipy"):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        from memexport import Predictor
        with Predictor({str(resmem_onnx)!r}, device="cpu", backend={onnx_backend!r}) as p:
            scores = p.score({[str(p) for p in sample_images]!r})
        assert not any(m.split(".")[0] in ("torch", "onnx") for m in sys.modules)
        print(json.dumps([float(s) for s in scores]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    expected = [reference_scores[p.name] for p in sample_images]
    assert np.abs(np.array(scores) - np.array(expected)).max() <= 1e-4


def test_import_and_help_need_no_heavy_backends():
    script = (
        "import sys, memexport, memexport.cli;"
        "heavy=[m for m in sys.modules if m.split('.')[0] in ('torch','onnx','onnxruntime','tensorrt','cuda','openvino')];"
        "print(heavy); assert not heavy"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    help_out = subprocess.run([sys.executable, "-m", "memexport", "--help"], capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "export" in help_out.stdout and "predict" in help_out.stdout
