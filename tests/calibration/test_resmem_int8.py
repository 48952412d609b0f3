"""The one real ResMem calibration of the suite: the default workflow on tests/data, checked against torch."""

from __future__ import annotations

import dataclasses
import json

import pytest

from memexport.calibration import CalibrationOptions, calibrate
from memexport.calibration.cache import read_calibration_cache


@pytest.mark.slow
@pytest.mark.covers("resmem", "parity:int8")
def test_resmem_int8_parity(resmem_onnx, data_dir, sample_images, tmp_path):
    """The default options on the 8 images of tests/data (x4 views, 5 cross-validation folds): the TensorRT
    cache, the Q/DQ and the CPU artifact, each with its fidelity estimate; both ONNX artifacts then verify
    against torch FP32 on the 8 images (mean abs <= 0.01, Kendall >= 0.9, Spearman >= 0.97)."""
    import onnx

    from memexport.calibration.qdq import tensorrt_qdq_violations
    from memexport.inspect import inspect_artifact
    from memexport.core.parity import require
    from memexport.core.spec import RESMEM
    from memexport.verify import VerifyOptions, verify_artifact

    # Defaults, but no fallback search: on 8 images the estimate's interval is wide, and ranking
    # ResMem's units costs minutes. The search itself is tested on the tiny models (test_guard.py).
    # The OpenVINO IR (NNCF on all of ResMem) is left to its tiny-model tests, for CI time.
    options = CalibrationOptions(fallback_rounds=0, outputs=("cache", "qdq", "cpu"))
    result = calibrate(resmem_onnx, data_dir, tmp_path, options)
    assert result.images == 8 and result.held_out == 8
    cache = read_calibration_cache(result.cache)
    assert cache.algorithm == "EntropyCalibration2" and "image" in cache.ranges and "/features/conv1/Conv_output_0" in cache.ranges
    assert tensorrt_qdq_violations(onnx.load(str(result.qdq), load_external_data=False)) == []
    record = json.loads(result.record.read_text())
    for kind, path in (("qdq", result.qdq), ("cpu", result.cpu)):
        entry = record["fidelity"][kind]
        assert entry["images"] == 8 and entry["views"] == 32
        assert entry["spearman_low"] <= entry["spearman"] <= entry["spearman_high"] and entry["mean_abs"] <= entry["mean_abs_high"]
        # informative even on 8 images: the artifact is far from a coin toss
        assert entry["spearman_low"] > 0.9 and entry["mean_abs_high"] < 0.02
        assert inspect_artifact(path)["fidelity"] == entry

    # Statistics are reused (another cache method reads no image again; cheap, so CI stays fast).
    again = calibrate(resmem_onnx, data_dir, tmp_path, dataclasses.replace(options, method="percentile", outputs=("cache",)))
    assert again.reused_stats and read_calibration_cache(again.cache).algorithm == "EntropyCalibration2"

    # The CPU recipe: residual Adds in UINT8, the spec's pinned stem and layer1 in FP32, the score
    # offset measured on the calibration images.
    proto = onnx.load(str(result.cpu), load_external_data=False)
    ops = {node.name: node.op_type for node in proto.graph.node}
    assert ops["/features/conv1/Conv"] == "Conv" and ops["/features/layer1/layer1.0/conv1/Conv"] == "Conv"
    assert sum(op == "QLinearAdd" for op in ops.values()) == 50 - 3  # every residual sum but layer1's three
    assert sum(op == "QLinearConv" for op in ops.values()) > 120
    described = inspect_artifact(result.cpu)
    assert described["pinned_fp32_layers"] == list(RESMEM.int8_fp32_layers)
    assert abs(described["score_offset_logit"]) < 0.5 and described["branch_ranges"] == "fold-mean"
    # The Q/DQ artifact pins the same layers: no QuantizeLinear feeds the stem or layer1.
    qdq = onnx.load(str(result.qdq), load_external_data=False)
    dequantized = {o for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    pinned = [n for n in qdq.graph.node if n.name.startswith(RESMEM.int8_fp32_layers) and n.op_type == "Conv"]
    assert len(pinned) == 11 and not any(i in dequantized for n in pinned for i in n.input)
    assert any(i in dequantized for n in qdq.graph.node if n.name == "/features/layer2/layer2.0/conv1/Conv" for i in n.input)
    assert inspect_artifact(result.qdq)["pinned_fp32_layers"] == list(RESMEM.int8_fp32_layers)

    # The spec's INT8 error bound and Kendall bound as they are; Spearman at 0.97 because on 8 images
    # one swap of the two closest scores (0.817 vs 0.826) already gives 0.976.
    tolerance = dataclasses.replace(RESMEM.tolerance("int8"), min_spearman=0.97)
    for path in (result.qdq, result.cpu):
        checked = verify_artifact(path, sample_images, VerifyOptions(tolerance=tolerance))
        assert checked.precision == "int8"
        require(checked.report, str(path))
