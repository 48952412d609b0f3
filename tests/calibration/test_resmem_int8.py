"""The one real ResMem calibration of the suite: a handful of tests/data images, checked against torch."""

from __future__ import annotations

import dataclasses

import pytest

from memexport.calibration import CalibrationOptions, calibrate
from memexport.calibration.cache import read_calibration_cache


@pytest.mark.slow
@pytest.mark.covers("resmem", "parity:int8")
def test_resmem_int8_parity(resmem_onnx, data_dir, sample_images, tmp_path):
    """Calibrate on 5 images (x4 views), guard on 3 held out; the Q/DQ artifact then verifies against torch FP32
    on all 8 images (mean abs <= 0.01, Kendall >= 0.9, Spearman >= 0.97)."""
    import onnx

    from memexport.calibration.qdq import tensorrt_qdq_violations
    from memexport.parity import require
    from memexport.spec import RESMEM
    from memexport.verify import VerifyOptions, verify_artifact

    # The guard sees only 3 held-out images here, so its error bound is set tight (0.0025) to keep
    # the ranking on all 8, whose closest scores are under 0.01 apart.
    options = CalibrationOptions(method="entropy", held_out_fraction=0.4, augment=3, outputs=("cache", "qdq"), max_mean_abs=0.0025)
    result = calibrate(resmem_onnx, data_dir, tmp_path, options)
    assert result.images == 5 and result.held_out == 3
    cache = read_calibration_cache(result.cache)
    assert cache.algorithm == "EntropyCalibration2" and "image" in cache.ranges and "/features/conv1/Conv_output_0" in cache.ranges
    assert tensorrt_qdq_violations(onnx.load(str(result.qdq), load_external_data=False)) == []
    assert result.guards["qdq"].passed
    # The spec's INT8 error bound and Kendall bound as they are; Spearman at 0.97 because on 8 images
    # one swap of the two closest scores (0.817 vs 0.826) already gives 0.976. The 0.99 target is
    # measured on the larger held-out benchmark set (README, *FP16 and INT8*).
    tolerance = dataclasses.replace(RESMEM.tolerance("int8"), min_spearman=0.97)
    verified = verify_artifact(result.qdq, sample_images, VerifyOptions(tolerance=tolerance))
    assert verified.precision == "int8"
    require(verified.report, str(result.qdq))

    # The CPU artifact from the same statistics (reused, no image read again), without the guard so
    # the recipe itself is what is checked: residual Adds in UINT8, the spec's pinned stem and
    # layer1 in FP32, the score offset measured on the calibration images.
    cpu_options = dataclasses.replace(options, outputs=("cpu",), min_spearman=0.0)
    cpu = calibrate(resmem_onnx, data_dir, tmp_path, cpu_options)
    assert cpu.reused_stats
    proto = onnx.load(str(cpu.cpu), load_external_data=False)
    ops = {node.name: node.op_type for node in proto.graph.node}
    assert ops["/features/conv1/Conv"] == "Conv" and ops["/features/layer1/layer1.0/conv1/Conv"] == "Conv"
    assert sum(op == "QLinearAdd" for op in ops.values()) == 50 - 3  # every residual sum but layer1's three
    assert sum(op == "QLinearConv" for op in ops.values()) > 120
    from memexport.inspect import inspect_artifact

    described = inspect_artifact(cpu.cpu)
    assert described["pinned_fp32_layers"] == list(RESMEM.int8_cpu_fp32_layers)
    assert abs(described["score_offset_logit"]) < 0.5
    checked = verify_artifact(cpu.cpu, sample_images, VerifyOptions(tolerance=tolerance))
    assert checked.precision == "int8"
    require(checked.report, str(cpu.cpu))
