"""Q/DQ ONNX for TensorRT, and the checker of TensorRT's Q/DQ rules."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from memexport.calibration.guard import ort_session, session_scores
from memexport.calibration.qdq import (
    QdqOptions,
    qdq_onnx_from_ranges,
    qdq_proto_from_ranges,
    quantizable_layers,
    require_tensorrt_qdq,
    tensorrt_qdq_violations,
)
from memexport.core.errors import ArtifactError, UsageError
from memexport.runtime.base import RunnerOptions
from memexport.runtime.onnxruntime_runner import OnnxRuntimeRunner
from tests.models import tiny_cnn_proto, tiny_metadata

AMAX = {"image": 1.0, "a_relu": 4.0, "b_relu": 3.0, "flat": 2.0}


@pytest.fixture(scope="module")
def qdq():
    return qdq_proto_from_ranges(tiny_cnn_proto(), AMAX)


def _initializer(proto, name):
    return next(t for t in proto.graph.initializer if t.name == name)


def test_structure_follows_tensorrt_rules(qdq):
    assert tensorrt_qdq_violations(qdq) == []
    onnx.checker.check_model(qdq)
    ops = [n.op_type for n in qdq.graph.node]
    # one Q/DQ pair per activation and per weight of the four layers
    assert ops.count("QuantizeLinear") == 8 and ops.count("DequantizeLinear") == 8
    by_output = {o: n for n in qdq.graph.node for o in n.output}
    for layer in ("conv_a", "conv_b", "conv_c", "fc"):
        node = next(n for n in qdq.graph.node if n.name == layer)
        act, weight = by_output[node.input[0]], by_output[node.input[1]]
        assert act.op_type == weight.op_type == "DequantizeLinear"
        assert numpy_helper.to_array(_initializer(qdq, act.input[1])).shape == ()  # per-tensor activations
        scales = numpy_helper.to_array(_initializer(qdq, weight.input[1]))
        assert scales.shape == (8,) if layer != "fc" else (1,)  # per output channel
        assert next(a.i for a in weight.attribute if a.name == "axis") == 0
        assert node.input[2] in {t.name for t in qdq.graph.initializer}  # bias stays FP32, no DQ
        assert _initializer(qdq, node.input[2]).data_type == onnx.TensorProto.FLOAT


def test_numerics_close_to_fp32_and_exclusions():
    batch = np.random.default_rng(0).random((6, 3, 32, 32), dtype=np.float32)
    fp32 = session_scores(ort_session(tiny_cnn_proto()), batch)
    int8 = session_scores(ort_session(qdq_proto_from_ranges(tiny_cnn_proto(), AMAX)), batch)
    assert np.abs(int8 - fp32).max() < 0.03
    partial = qdq_proto_from_ranges(tiny_cnn_proto(), AMAX, QdqOptions(exclude=frozenset({"conv_b"})))
    conv_b = next(n for n in partial.graph.node if n.name == "conv_b")
    assert list(conv_b.input) == ["a_relu", "wb", "bb"]
    assert quantizable_layers(tiny_cnn_proto()) == ["conv_a", "conv_b", "conv_c", "fc"]


def test_written_artifact_runs_in_the_runtime(tmp_path):
    from tests.models import write_tiny_cnn

    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    out = qdq_onnx_from_ranges(model, AMAX, tmp_path / "tiny.int8-qdq.onnx", tiny_metadata(precision="int8"))
    with OnnxRuntimeRunner(out, RunnerOptions(device="cpu")) as runner:
        assert runner.precision == "int8"
        assert runner.infer(np.zeros((2, 3, 32, 32), np.float32)).shape == (2,)


def _break(qdq, mutate):
    proto = onnx.ModelProto()
    proto.CopyFrom(qdq)
    mutate(proto)
    return tensorrt_qdq_violations(proto)


def _set_initializer(proto, name, array):
    tensor = _initializer(proto, name)
    tensor.CopyFrom(numpy_helper.from_array(array, name))


def test_rejects_asymmetric_zero_point(qdq):
    found = _break(qdq, lambda p: _set_initializer(p, "qdq_zero_point_int8", np.array(3, np.int8)))
    assert any("is not 0" in v for v in found)


def test_rejects_uint8_zero_point(qdq):
    found = _break(qdq, lambda p: _set_initializer(p, "qdq_zero_point_int8", np.array(128, np.uint8)))
    assert any("uint8" in v for v in found)


def test_rejects_missing_zero_point(qdq):
    def drop(proto):
        node = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
        del node.input[2]

    assert any("no constant zero point" in v for v in _break(qdq, drop))


def test_rejects_int32_bias_dequantisation(qdq):
    def quantise_bias(proto):
        proto.graph.initializer.extend([
            numpy_helper.from_array(np.arange(8, dtype=np.int32), "bb_int32"),
            numpy_helper.from_array(np.full(8, 1e-3, np.float32), "bb_scale"),
            numpy_helper.from_array(np.zeros(8, np.int32), "bb_zero"),
        ])
        conv_b = next(n for n in proto.graph.node if n.name == "conv_b")
        index = list(proto.graph.node).index(conv_b)
        proto.graph.node.insert(index, helper.make_node("DequantizeLinear", ["bb_int32", "bb_scale", "bb_zero"], ["bb_dq"], axis=0))
        conv_b.input[2] = "bb_dq"

    found = _break(qdq, quantise_bias)
    assert any("INT32" in v for v in found)


def test_rejects_opset_above_17(qdq):
    def bump(proto):
        next(o for o in proto.opset_import if o.domain in ("", "ai.onnx")).version = 18

    assert any("opset 18" in v for v in _break(qdq, bump))
    with pytest.raises(UsageError):
        qdq_proto_from_ranges(tiny_cnn_proto(opset=18), AMAX)


def test_rejects_wrong_axis_and_dangling_quantize(qdq):
    def axis_one(proto):
        node = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith("wb_"))
        next(a for a in node.attribute if a.name == "axis").i = 1

    assert any("axis 1" in v for v in _break(qdq, axis_one))

    def skip_dq(proto):
        conv_b = next(n for n in proto.graph.node if n.name == "conv_b")
        conv_b.input[0] = "a_relu_QuantizeLinear_Output"

    assert any("followed by DequantizeLinear" in v for v in _break(qdq, skip_dq))


def test_require_names_the_file(qdq):
    proto = onnx.ModelProto()
    proto.CopyFrom(qdq)
    _set_initializer(proto, "qdq_zero_point_int8", np.array(1, np.int8))
    with pytest.raises(ArtifactError, match="bad.onnx"):
        require_tensorrt_qdq(proto, "bad.onnx")
