"""``calibrate`` and ``memexport calibrate`` end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from memexport.calibration import CalibrationOptions, calibrate
from memexport.calibration.cache import read_calibration_cache
from memexport.calibration.qdq import tensorrt_qdq_violations
from memexport.calibration.stats import ActivationStats, amax_from_stats
from memexport.cli import app
from memexport.errors import UsageError
from memexport.inspect import inspect_artifact
from memexport.runtime.base import RunnerOptions
from memexport.runtime.onnxruntime_runner import OnnxRuntimeRunner
from tests.models import SENSITIVE_LAYER, write_tiny_cnn

OPTIONS = CalibrationOptions(method="minmax", held_out_fraction=0.5, augment=1)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, sample_images):
    folder = tmp_path_factory.mktemp("calib")
    model = write_tiny_cnn(folder / "tiny.onnx", planted=True)
    lines: list[str] = []
    result = calibrate(model, sample_images[0].parent, folder / "out", OPTIONS, log=lines.append)
    return model, result, lines


def test_writes_every_artifact(calibrated):
    import onnx

    model, result, _ = calibrated
    assert result.cache.name == "tiny.calib.cache" and result.qdq.name == "tiny.int8-qdq.onnx" and result.cpu.name == "tiny.int8-cpu.onnx"
    assert result.images + result.held_out == 8 and not result.reused_stats
    cache = read_calibration_cache(result.cache)
    assert cache.algorithm == "MinMaxCalibration" and cache.version == 8601
    expected = amax_from_stats(ActivationStats.load(result.stats), "minmax")
    assert cache.ranges.keys() == expected.keys() and {"image", "a_relu", "score"} <= set(cache.ranges)
    for name, value in expected.items():
        assert cache.ranges[name] == pytest.approx(value, rel=1e-6)
    assert tensorrt_qdq_violations(onnx.load(str(result.qdq))) == []
    record = json.loads(result.record.read_text())
    assert record["method"] == "minmax" and record["fallback_layers"] == result.fallback_layers


def test_guard_keeps_the_planted_layer_and_records_it(calibrated):
    _, result, lines = calibrated
    for kind in ("qdq", "cpu"):
        report = result.guards[kind]
        assert report.passed and SENSITIVE_LAYER in report.fallback
        assert max(report.sensitivity, key=report.sensitivity.get) == SENSITIVE_LAYER
    for path, kind in ((result.qdq, "qdq"), (result.cpu, "cpu")):
        info = inspect_artifact(path)
        assert info["precision"] == "int8" and info["calibration_method"] == "minmax"
        assert info["fallback_layers"] == list(result.guards[kind].fallback)
        assert info["calibration_images"] == result.images
        assert info["fidelity_guard"]["spearman"] >= 0.99
    cpu = inspect_artifact(result.cpu)
    # a model without a declared spec pins nothing; the offset comes from calibration images
    assert cpu["pinned_fp32_layers"] == [] and cpu["range_percentile"] == 99.999
    assert isinstance(cpu["score_offset_logit"], float)


def test_changing_method_reuses_statistics_without_reading_images(calibrated, tmp_path, monkeypatch, sample_images):
    import memexport.calibration.images as images

    model, result, _ = calibrated
    monkeypatch.setattr(images, "iter_batches", lambda *a, **k: pytest.fail("images were read again"))
    again = calibrate(
        model, sample_images[0].parent, result.stats.parent,
        CalibrationOptions(method="percentile", held_out_fraction=0.5, augment=1, outputs=("cache",)),
    )
    assert again.reused_stats and read_calibration_cache(again.cache).algorithm == "EntropyCalibration2"


def test_refuses_non_fp32_models_and_bad_options(calibrated, tmp_path, sample_images):
    _, result, _ = calibrated
    with pytest.raises(UsageError, match="FP32"):
        calibrate(result.cpu, sample_images[0].parent, tmp_path, OPTIONS)
    with pytest.raises(UsageError, match="method"):
        calibrate(result.cpu, sample_images[0].parent, tmp_path, CalibrationOptions(method="mse"))


def test_cli_calibrate_predict_bench(tmp_path, sample_images):
    runner = CliRunner()
    model = write_tiny_cnn(tmp_path / "tiny.onnx", planted=True)
    out = tmp_path / "out"
    called = runner.invoke(app, ["calibrate", "--model", str(model), "--images", str(sample_images[0].parent), "-o", str(out),
                                 "--method", "minmax", "--held-out-fraction", "0.5", "--augment", "1"])
    assert called.exit_code == 0, called.output
    assert "sensitivity" in called.output and SENSITIVE_LAYER in called.output and "fp32" in called.output
    for name in ("tiny.calib.cache", "tiny.int8-qdq.onnx", "tiny.int8-cpu.onnx", "tiny.calib-stats.npz"):
        assert (out / name).is_file()
    scores = tmp_path / "scores.csv"
    called = runner.invoke(app, ["predict", str(sample_images[0].parent), "-m", str(out / "tiny.int8-cpu.onnx"), "-o", str(scores), "--device", "cpu"])
    assert called.exit_code == 0, called.output
    assert len(scores.read_text().strip().splitlines()) == 1 + len(sample_images)
    called = runner.invoke(app, ["bench", "-m", str(model), "-m", str(out / "tiny.int8-cpu.onnx"), "-m", str(out / "tiny.int8-qdq.onnx"),
                                 "--batch-sizes", "2", "--iterations", "2", "--warmup", "1", "--no-torch"])
    assert called.exit_code == 0, called.output
    assert "int8" in called.output and "x onnxruntime fp32" in called.output


def test_cli_errors_are_one_line(tmp_path, sample_images):
    runner = CliRunner()
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    called = runner.invoke(app, ["calibrate", "--model", str(model), "--images", str(tmp_path / "nowhere"), "-o", str(tmp_path)])
    assert called.exit_code == 2 and "image folder not found" in called.output and "Traceback" not in called.output
    called = runner.invoke(app, ["calibrate", "--model", str(model), "--images", str(sample_images[0].parent), "-o", str(tmp_path), "--method", "mse"])
    assert called.exit_code == 2 and "unknown calibration method" in called.output


def test_runner_scores_track_fp32(calibrated, sample_images):
    from memexport.calibration.images import load_all
    from tests.models import TINY_PREPROCESS

    model, result, _ = calibrated
    batch = load_all(sample_images, TINY_PREPROCESS)
    with OnnxRuntimeRunner(model, RunnerOptions(device="cpu")) as fp32:
        reference = fp32.infer(batch)
    for path in (result.qdq, result.cpu):
        with OnnxRuntimeRunner(path, RunnerOptions(device="cpu")) as runner:
            assert np.abs(runner.infer(batch) - reference).mean() <= 0.01


def test_held_out_folder_replaces_the_split(tmp_path, sample_images):
    import shutil

    calib, held = tmp_path / "calib", tmp_path / "held"
    for folder, images in ((calib, sample_images[:4]), (held, sample_images[4:])):
        folder.mkdir()
        for image in images:
            shutil.copy(image, folder / image.name)
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    options = CalibrationOptions(method="minmax", held_out=held, outputs=("cpu",))
    result = calibrate(model, calib, tmp_path / "out", options)
    assert result.images == 4 and result.held_out == len(sample_images) - 4
    assert result.guards["cpu"].final.count == len(sample_images) - 4
    with pytest.raises(UsageError, match="in both --images and --held-out"):
        calibrate(model, calib, tmp_path / "out", CalibrationOptions(held_out=calib, outputs=("cpu",)))
    with pytest.raises(UsageError, match="held-out folder not found"):
        calibrate(model, calib, tmp_path / "out", CalibrationOptions(held_out=tmp_path / "none", outputs=("cpu",)))


def test_guard_bounds_follow_the_held_out_count(tmp_path, sample_images):
    from PIL import Image

    held = tmp_path / "held"
    held.mkdir()
    rng = np.random.default_rng(0)
    for index in range(30):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(held / f"noise{index:02d}.png")
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    options = CalibrationOptions(method="minmax", held_out=held, outputs=("qdq", "cpu"))
    many = calibrate(model, sample_images[0].parent, tmp_path / "many", options)
    # 30 held-out images: the CPU artifact gets the spec's whole INT8 error bound, Q/DQ keeps half (TensorRT margin)
    assert many.guards["cpu"].target.max_mean_abs == 0.01 and many.guards["qdq"].target.max_mean_abs == 0.005
    few = calibrate(model, sample_images[0].parent, tmp_path / "few", dataclasses.replace(options, held_out=None, held_out_fraction=0.5))
    assert few.held_out < 30 and few.guards["cpu"].target.max_mean_abs == 0.005
    fixed = calibrate(model, sample_images[0].parent, tmp_path / "fixed", dataclasses.replace(options, max_mean_abs=0.02))
    assert {report.target.max_mean_abs for report in fixed.guards.values()} == {0.02}
