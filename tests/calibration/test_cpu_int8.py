"""The ONNX Runtime CPU INT8 artifact: U8 activations, S8 per-channel weights, own ranges."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from memexport.calibration.cpu_int8 import CpuInt8Options, cpu_int8_onnx_from_ranges, cpu_int8_proto_from_ranges
from memexport.calibration.guard import ort_session, session_scores
from memexport.runtime.base import RunnerOptions
from memexport.runtime.onnxruntime_runner import OnnxRuntimeRunner
from tests.models import tiny_cnn_proto, tiny_metadata, write_tiny_cnn

RANGES = {"image": (0.0, 1.0), "a": (-4.0, 4.0), "a_relu": (0.0, 4.0), "b": (-3.0, 3.0), "b_relu": (0.0, 3.0),
          "c": (-3.0, 3.0), "c_relu": (0.0, 3.0), "pooled": (0.0, 2.0), "flat": (0.0, 2.0), "logit": (-6.0, 6.0)}


def test_u8_activations_s8_weights(tmp_path):
    proto = cpu_int8_proto_from_ranges(write_tiny_cnn(tmp_path / "tiny.onnx"), RANGES)
    convs = [n for n in proto.graph.node if n.op_type == "QLinearConv"]
    assert len(convs) == 3
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in convs:
        assert inits[node.input[2]].dtype == np.uint8  # activation zero point
        assert inits[node.input[3]].dtype == np.int8  # weight
        assert inits[node.input[4]].shape == (8,)  # per-channel weight scales
    # the sigmoid output is never quantised: scores outside the calibration range would clip
    assert any(n.op_type == "Sigmoid" for n in proto.graph.node)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_scores_close_to_fp32_and_exclusion(tmp_path):
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    batch = np.random.default_rng(0).random((6, 3, 32, 32), dtype=np.float32)
    fp32 = session_scores(ort_session(tiny_cnn_proto()), batch)
    int8 = session_scores(ort_session(cpu_int8_proto_from_ranges(model, RANGES)), batch)
    assert np.abs(int8 - fp32).max() < 0.05
    kept = cpu_int8_proto_from_ranges(model, RANGES, CpuInt8Options(exclude=frozenset({"conv_b"})))
    assert [n.name for n in kept.graph.node if n.op_type == "Conv"] == ["conv_b"]


def test_written_artifact_carries_metadata(tmp_path):
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    meta = tiny_metadata(precision="int8").with_extra(calibration_method="minmax", fallback_layers=["conv_b"])
    out = cpu_int8_onnx_from_ranges(model, RANGES, tmp_path / "tiny.int8-cpu.onnx", meta)
    with OnnxRuntimeRunner(out, RunnerOptions(device="cpu")) as runner:
        assert runner.metadata.precision == "int8" and runner.metadata.extra["fallback_layers"] == ["conv_b"]
        assert runner.infer(np.ones((3, 3, 32, 32), np.float32)).shape == (3,)


def test_residual_adds_are_quantised_constant_adds_are_not(tmp_path):
    from memexport.calibration.cpu_int8 import constant_adds

    model = write_tiny_cnn(tmp_path / "res.onnx", residual=True)
    ranges = {**RANGES, "c_sum": (-3.0, 6.0), "c_shift": (0.0, 3.5)}
    proto = cpu_int8_proto_from_ranges(model, ranges)
    ops = {n.name: n.op_type for n in proto.graph.node}
    # the residual sum stays in UINT8 (QLinearAdd, a com.microsoft op); the constant shift stays FP32
    assert any(n.op_type == "QLinearAdd" and n.domain == "com.microsoft" for n in proto.graph.node)
    assert ops["add_const"] == "Add" and "add_res" not in ops
    assert constant_adds(onnx.load(str(model))) == ["add_const"]
    batch = np.random.default_rng(1).random((6, 3, 32, 32), dtype=np.float32)
    fp32 = session_scores(ort_session(str(model)), batch)
    assert np.abs(session_scores(ort_session(proto), batch) - fp32).max() < 0.05


def test_cpu_ranges_are_percentiles_inside_the_observed_range(tmp_path, sample_images):
    from memexport.calibration.cpu_int8 import cpu_ranges
    from memexport.calibration.images import iter_batches
    from memexport.calibration.stats import activation_stats_from_batches
    from tests.models import TINY_PREPROCESS

    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    stats = activation_stats_from_batches(model, iter_batches(sample_images, TINY_PREPROCESS, 4))
    full, clipped = cpu_ranges(stats, 100.0), cpu_ranges(stats, 99.0)
    narrower = 0
    for index, name in enumerate(stats.names):
        low, high = min(float(stats.minimum[index]), 0.0), max(float(stats.maximum[index]), 0.0)
        assert full[name] == pytest.approx((low, high), rel=1e-6, abs=1e-12)
        assert low <= clipped[name][0] <= 0.0 <= clipped[name][1] <= high
        narrower += clipped[name][1] - clipped[name][0] < 0.999 * (high - low)
    assert narrower > 0
    assert full["a_relu"][0] == 0.0


def test_pinned_layers_match_prefixes():
    from memexport.calibration.cpu_int8 import pinned_layers

    proto = tiny_cnn_proto()
    assert pinned_layers(proto, ("conv_a", "relu_a")) == ["conv_a", "relu_a"]
    assert pinned_layers(proto, ()) == []


def test_residual_branch_outputs_are_the_convolutions_feeding_a_residual_sum(tmp_path):
    from memexport.calibration.cpu_int8 import residual_branch_outputs

    # add_res sums conv_c's output with b_relu (the identity path); add_const adds a constant
    assert residual_branch_outputs(tiny_cnn_proto(residual=True)) == ["c"]
    assert residual_branch_outputs(tiny_cnn_proto()) == []


def test_mean_of_fold_ranges_replaces_only_the_named_tensors(tmp_path, sample_images):
    from memexport.calibration.cpu_int8 import cpu_ranges, mean_of_fold_ranges
    from memexport.calibration.images import iter_batches
    from memexport.calibration.stats import folded_stats_from_batches
    from tests.models import TINY_PREPROCESS

    model = write_tiny_cnn(tmp_path / "res.onnx", residual=True)
    halves = [sample_images[::2], sample_images[1::2]]
    stats = folded_stats_from_batches(model, [iter_batches(half, TINY_PREPROCESS, 2) for half in halves])
    pooled = cpu_ranges(stats.all(), 99.0)
    mixed = mean_of_fold_ranges(pooled, stats.folds, ["c", "not-a-tensor"], 99.0)
    per_fold = [cpu_ranges(part, 99.0)["c"] for part in stats.folds]
    assert mixed["c"] == pytest.approx(tuple(np.mean(per_fold, axis=0)), rel=1e-6)
    assert mixed["c"] != pytest.approx(pooled["c"], rel=1e-6)  # the two folds' images differ
    assert {name: value for name, value in mixed.items() if name != "c"} == {name: value for name, value in pooled.items() if name != "c"}
    # one fold: nothing to average, the pooled ranges stand
    assert mean_of_fold_ranges(pooled, stats.folds[:1], ["c"], 99.0) == pooled
