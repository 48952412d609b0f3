"""Score-offset correction: the FP32 output bias absorbs INT8's systematic logit shift."""

from __future__ import annotations

import numpy as np
import pytest

from memexport.calibration.guard import ort_session, session_scores
from memexport.calibration.offset import logit, offset_corrected, output_bias, score_offset, with_score_offset
from memexport.core.ranks import spearman
from tests.models import tiny_cnn_proto


def test_finds_the_bias_feeding_the_output_sigmoid():
    assert output_bias(tiny_cnn_proto()) == "fc.bias"
    assert output_bias(tiny_cnn_proto(residual=True)) == "fc.bias"


def test_a_shifted_model_is_shifted_back():
    reference_model = tiny_cnn_proto()
    batch = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    reference = session_scores(ort_session(reference_model), batch)
    shifted = with_score_offset(reference_model, -0.3)
    scores = session_scores(ort_session(shifted), batch)
    assert np.mean(logit(reference) - logit(scores)) == pytest.approx(0.3, abs=1e-4)
    corrected, offset = offset_corrected(shifted, batch, reference)
    assert offset == pytest.approx(0.3, abs=1e-4)
    fixed = session_scores(ort_session(corrected), batch)
    assert np.abs(fixed - reference).max() < 1e-5
    assert spearman(fixed, scores) == pytest.approx(1.0)
    # the input model is left as it was
    assert np.array_equal(session_scores(ort_session(shifted), batch), scores)


def test_score_offset_is_mean_logit_difference():
    reference = np.array([0.2, 0.5, 0.8])
    assert score_offset(reference, reference) == 0.0
    assert score_offset(np.array([0.5]), np.array([1.0 / (1.0 + np.exp(0.5))])) == pytest.approx(0.5)


def test_models_without_an_output_sigmoid_are_left_alone():
    import onnx

    proto = tiny_cnn_proto()
    del proto.graph.node[-1]
    proto.graph.output[0].name = "logit"
    assert output_bias(proto) is None
    batch = np.zeros((2, 3, 32, 32), np.float32)
    same, offset = offset_corrected(proto, batch, np.zeros(2))
    assert same is proto and offset is None
    with pytest.raises(ValueError, match="no FP32 bias"):
        with_score_offset(proto, 1.0)
    assert isinstance(proto, onnx.ModelProto)
