"""``calibrate`` and ``memexport calibrate`` end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from memexport.calibration import CalibrationOptions, calibrate
from memexport.calibration.cache import read_calibration_cache
from memexport.calibration.cpu_int8 import CPU_PERCENTILE
from memexport.calibration.qdq import tensorrt_qdq_violations
from memexport.calibration.stats import ActivationStats, amax_from_stats
from memexport.cli import app
from memexport.core.errors import CalibrationError, UsageError
from memexport.inspect import inspect_artifact
from memexport.runtime.base import RunnerOptions
from memexport.runtime.onnxruntime_runner import OnnxRuntimeRunner
from tests.models import SENSITIVE_LAYER, write_tiny_cnn

# The CPU artifact's fallback is off by default (ResMem: islands cost more speed than they buy); on the
# tiny model with its planted layer both guards search, so both searches are tested.
OPTIONS = CalibrationOptions(method="minmax", held_out_fraction=0.5, augment=1, cpu_fallback_rounds=4)


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
    # 4 images calibrate, 4 are held out; the estimate rests on all 8 (4 held out + 4 cross-validated)
    assert result.images == 4 and result.held_out == 8 and not result.reused_stats
    cache = read_calibration_cache(result.cache)
    assert cache.algorithm == "MinMaxCalibration" and cache.version == 8601
    expected = amax_from_stats(ActivationStats.load(result.stats), "minmax")
    assert cache.ranges.keys() == expected.keys() and {"image", "a_relu", "score"} <= set(cache.ranges)
    for name, value in expected.items():
        assert cache.ranges[name] == pytest.approx(value, rel=1e-6)
    assert tensorrt_qdq_violations(onnx.load(str(result.qdq))) == []
    record = json.loads(result.record.read_text())
    assert record["method"] == "minmax" and record["fallback_layers"] == result.fallback_layers
    for kind in ("qdq", "cpu"):
        entry = record["fidelity"][kind]
        assert entry["spearman_low"] <= entry["spearman"] <= entry["spearman_high"] and entry["mean_abs"] <= entry["mean_abs_high"]
        assert entry["images"] == 8 and entry["verified"] is True


def test_guard_keeps_the_planted_layer_and_records_it(calibrated):
    _, result, lines = calibrated
    for kind in ("qdq", "cpu"):
        report = result.guards[kind]
        assert report.verified and SENSITIVE_LAYER in report.fallback
        assert max(report.sensitivity, key=report.sensitivity.get) == SENSITIVE_LAYER
    for path, kind in ((result.qdq, "qdq"), (result.cpu, "cpu")):
        info = inspect_artifact(path)
        # the Q/DQ and CPU ranges are percentiles whatever the cache's --method
        assert info["precision"] == "int8" and info["calibration_method"] == "percentile"
        assert info["fallback_layers"] == list(result.guards[kind].fallback)
        assert info["calibration_images"] == result.images
        assert info["fidelity"]["spearman_low"] >= 0.99 and info["fidelity"]["verified"] is True
        assert info["fidelity"] == json.loads(result.record.read_text())["fidelity"][kind]
    cpu = inspect_artifact(result.cpu)
    # a model without a declared spec pins nothing; the offset comes from calibration images
    assert cpu["pinned_fp32_layers"] == [] and cpu["range_percentile"] == CPU_PERCENTILE
    assert isinstance(cpu["score_offset_logit"], float)


def test_cpu_fallback_is_off_by_default_and_bounded_options_are_checked(calibrated, tmp_path, sample_images):
    model, result, _ = calibrated
    assert CalibrationOptions().cpu_fallback_rounds == 0 and CalibrationOptions().fallback_rounds == 4
    # The planted layer ruins the all-INT8 CPU artifact; without a search the guard refuses it and says how to allow one.
    lines: list[str] = []
    with pytest.raises(CalibrationError, match=r"tiny\.int8-cpu\.onnx: INT8 misses .* with no layer searched for FP32 fallback; .*--cpu-fallback-rounds"):
        calibrate(model, sample_images[0].parent, tmp_path / "off", dataclasses.replace(OPTIONS, cpu_fallback_rounds=0, outputs=("cpu",)), log=lines.append)
    assert not any(line.startswith("refused:") for line in lines)  # a lone kind's refusal is said once, as the error
    for flag, options in (("--fallback-rounds", CalibrationOptions(fallback_rounds=-1)), ("--cpu-fallback-rounds", CalibrationOptions(cpu_fallback_rounds=-1))):
        with pytest.raises(UsageError, match=f"{flag} must be 0 or more, got -1"):
            calibrate(model, sample_images[0].parent, tmp_path, options)


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
                                 "--method", "minmax", "--held-out-fraction", "0.5", "--augment", "1", "--cpu-fallback-rounds", "4"])
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


def test_held_out_folder_adds_evidence(tmp_path, sample_images):
    import shutil

    calib, held = tmp_path / "calib", tmp_path / "held"
    for folder, images in ((calib, sample_images[:4]), (held, sample_images[4:])):
        folder.mkdir()
        for image in images:
            shutil.copy(image, folder / image.name)
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    options = CalibrationOptions(method="minmax", held_out=held, outputs=("cpu",))
    result = calibrate(model, calib, tmp_path / "out", options)
    # the held-out folder and the cross-validated calibration images together
    assert result.images == 4 and result.held_out == len(sample_images)
    assert result.guards["cpu"].final.images == len(sample_images)
    with pytest.raises(UsageError, match="in both --images and --held-out"):
        calibrate(model, calib, tmp_path / "out", CalibrationOptions(held_out=calib, outputs=("cpu",)))
    with pytest.raises(UsageError, match="held-out folder not found"):
        calibrate(model, calib, tmp_path / "out", CalibrationOptions(held_out=tmp_path / "none", outputs=("cpu",)))


def test_targets_default_to_the_spec_and_follow_the_options(tmp_path, sample_images):
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    options = CalibrationOptions(method="minmax", augment=1, outputs=("qdq", "cpu"))
    default = calibrate(model, sample_images[0].parent, tmp_path / "default", options)
    # a model without a declared spec: the default INT8 bound, 0.01, for both artifacts
    assert {report.target.max_mean_abs for report in default.guards.values()} == {0.01}
    fixed = calibrate(model, sample_images[0].parent, tmp_path / "default", dataclasses.replace(options, max_mean_abs=0.02, min_spearman=0.98))
    assert fixed.reused_stats and {(r.target.min_spearman, r.target.max_mean_abs) for r in fixed.guards.values()} == {(0.98, 0.02)}


def test_a_folder_too_small_for_an_estimate_gets_one_line(tmp_path, sample_images):
    import shutil

    folder = tmp_path / "three"
    folder.mkdir()
    for image in sample_images[:3]:
        shutil.copy(image, folder / image.name)
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    with pytest.raises(UsageError, match="needs at least 5"):
        calibrate(model, folder, tmp_path / "out")
    called = CliRunner().invoke(app, ["calibrate", "--model", str(model), "--images", str(folder), "-o", str(tmp_path / "out")])
    assert called.exit_code == 2 and "at least 5" in called.output and len(called.output.strip().splitlines()) == 1
    # without the guard, 3 images still calibrate
    assert calibrate(model, folder, tmp_path / "out", CalibrationOptions(min_spearman=0.0, augment=0)).cpu.is_file()


def _estimate(**fields):
    from memexport.calibration.fidelity import FidelityEstimate

    base = dict(spearman=0.995, spearman_low=0.975, spearman_high=0.999, mean_abs=0.004, mean_abs_high=0.006, images=15, views=60,
                measured_spearman=0.99, error_sd=0.005, score_sd=0.07, score_images=15)
    return FidelityEstimate(**{**base, **fields})


def test_thin_evidence_ships_unverified_or_refuses_with_strict():
    from memexport.calibration.artifacts import judge
    from memexport.calibration.fidelity import FidelityTarget
    from memexport.calibration.guard import GuardReport
    from memexport.core.errors import CalibrationError

    def report(estimate):
        return GuardReport(estimate, estimate, (), {}, FidelityTarget())

    lines = []
    judge(report(_estimate()), "m.int8-cpu.onnx", False, lines.append)
    assert len(lines) == 1 and "not verified" in lines[0] and "more images would settle it" in lines[0] and "0.975" in lines[0]
    with pytest.raises(CalibrationError, match="--strict"):
        judge(report(_estimate()), "m.int8-cpu.onnx", True, lines.append)
    # never certify what the evidence cannot support, never fail what it cannot refute
    with pytest.raises(CalibrationError, match="misses"):
        judge(report(_estimate(spearman=0.96, spearman_low=0.93, spearman_high=0.98)), "m.int8-cpu.onnx", False, lines.append)
    judge(report(_estimate(spearman_low=0.992)), "m.int8-cpu.onnx", True, lines.append)
    assert "verified" in lines[-1] and "not" not in lines[-1]


def test_predict_and_verify_warn_about_an_unverified_artifact(calibrated, tmp_path, sample_images):
    import dataclasses as dc

    import onnx

    from memexport.export.onnx_export import save_onnx_artifact
    from memexport.runtime.metadata import metadata_from_map
    from memexport.verify import unverified_warning

    _, result, _ = calibrated
    assert unverified_warning(result.cpu) is None
    proto = onnx.load(str(result.cpu))
    meta = metadata_from_map({p.key: p.value for p in proto.metadata_props}, result.cpu)
    fidelity = {**meta.extra["fidelity"], "verified": False}
    unverified = save_onnx_artifact(proto, dc.replace(meta, extra={**meta.extra, "fidelity": fidelity}), tmp_path / "tiny.int8-cpu.onnx")
    warning = unverified_warning(unverified)
    assert warning and "not verified" in warning and "\n" not in warning
    called = CliRunner().invoke(app, ["predict", str(sample_images[0].parent), "-m", str(unverified), "-o", str(tmp_path / "s.csv"), "--device", "cpu"])
    assert called.exit_code == 0 and "not verified" in called.output


@pytest.mark.parametrize("fold_mean", [True, False])
def test_cpu_artifact_sets_residual_branch_ranges_from_the_folds(tmp_path, sample_images, fold_mean):
    """The written U8S8 artifact requantises the residual branch (conv_c's output) with the mean of the
    folds' ranges by default, and with the pooled percentile when asked; inspect says which."""
    import onnx
    from onnx import numpy_helper

    from memexport.calibration.cpu_int8 import cpu_ranges, mean_of_fold_ranges
    from memexport.calibration.stats import FoldedStats

    model = write_tiny_cnn(tmp_path / "res.onnx", residual=True)
    options = CalibrationOptions(outputs=("cpu",), min_spearman=0.0, augment=0, folds=2, cpu_branch_fold_mean=fold_mean)
    result = calibrate(model, sample_images[0].parent, tmp_path / "out", options)
    stats = FoldedStats.load(result.stats)
    assert len(stats.folds) == 2
    pooled = cpu_ranges(stats.all(), CPU_PERCENTILE)
    low, high = mean_of_fold_ranges(pooled, stats.folds, ["c"])["c"] if fold_mean else pooled["c"]
    proto = onnx.load(str(result.cpu))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    (conv_c,) = [n for n in proto.graph.node if n.op_type == "QLinearConv" and n.name.startswith("conv_c")]
    assert float(inits[conv_c.input[6]]) == pytest.approx((high - low) / 255.0, rel=1e-5)  # y_scale
    assert inspect_artifact(result.cpu)["branch_ranges"] == ("fold-mean" if fold_mean else "pooled")
