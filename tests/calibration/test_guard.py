"""The rank-fidelity guard finds a planted INT8-sensitive layer and keeps only it in FP32."""

from __future__ import annotations

import numpy as np
import pytest

from memexport.calibration.guard import Guard, GuardTarget, SwitchableModel, fidelity, layer_sensitivity, ort_session, session_scores
from memexport.calibration.images import iter_batches, load_all, split_images
from memexport.calibration.qdq import QdqOptions, qdq_proto_from_ranges, quantizable_layers
from memexport.calibration.stats import activation_stats_from_batches, amax_from_stats
from memexport.errors import CalibrationError
from tests.models import SENSITIVE_LAYER, TINY_PREPROCESS, tiny_cnn_proto, write_tiny_cnn


def _setup(tmp_path, sample_images, planted):
    model = write_tiny_cnn(tmp_path / "tiny.onnx", planted=planted)
    split = split_images(sample_images, held_out_fraction=0.5)
    stats = activation_stats_from_batches(model, iter_batches(split.calibration, TINY_PREPROCESS, 4, augment=3))
    # MinMax: the per-tensor range is set by the planted outlier channel
    amax = amax_from_stats(stats, "minmax")
    proto = tiny_cnn_proto(planted=planted)
    held = np.concatenate([load_all(split.held_out, TINY_PREPROCESS), load_all(split.calibration, TINY_PREPROCESS)])
    reference = session_scores(ort_session(proto), held)
    return proto, amax, held, reference


def test_switchable_model_is_exact_when_off_and_matches_qdq_when_on(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=False)
    layers = quantizable_layers(proto)
    sim = SwitchableModel(proto, amax, layers)
    np.testing.assert_allclose(sim.scores(held, set()), reference, atol=1e-6)
    qdq = session_scores(ort_session(qdq_proto_from_ranges(proto, amax)), held)
    np.testing.assert_allclose(sim.scores(held, set(layers)), qdq, atol=2e-3)


def test_guard_finds_the_planted_layer(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    layers = quantizable_layers(proto)
    build = lambda exclude: qdq_proto_from_ranges(proto, amax, QdqOptions(exclude=exclude))  # noqa: E731
    naive = fidelity(session_scores(ort_session(build(frozenset())), held), reference, GuardTarget())
    assert not naive.passed  # the plant works: all-INT8 is off target
    lines = []
    guard = Guard(proto, amax, layers, held, reference, GuardTarget(0.99, 0.01), lines.append)
    final_proto, report = guard.run(build, "tiny")
    sensitivity = report.sensitivity
    assert max(sensitivity, key=sensitivity.get) == SENSITIVE_LAYER
    assert report.fallback == (SENSITIVE_LAYER,)
    assert report.passed and report.final.passed
    assert report.table()[0] == (SENSITIVE_LAYER, sensitivity[SENSITIVE_LAYER], "fp32")
    assert all(precision == "int8" for _, _, precision in report.table()[1:])
    # the returned proto is the one measured: conv_b reads the FP32 activation
    conv_b = next(n for n in final_proto.graph.node if n.name == SENSITIVE_LAYER)
    assert conv_b.input[0] == "a_relu"
    assert any("sensitivity" in line for line in lines)


def test_sensitivity_ranks_on_a_subset_and_still_finds_the_planted_layer(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    lines = []
    guard = Guard(proto, amax, quantizable_layers(proto), held, reference, GuardTarget(0.99, 0.01), lines.append, sensitivity_images=2)
    build = lambda exclude: qdq_proto_from_ranges(proto, amax, QdqOptions(exclude=exclude))  # noqa: E731
    _, report = guard.run(build, "tiny")
    assert any("on 2 held-out images" in line for line in lines)
    assert max(report.sensitivity, key=report.sensitivity.get) == SENSITIVE_LAYER
    # the fallback is still chosen and checked on every held-out image
    assert report.passed and report.final.count == len(held)


def test_guard_skips_sensitivity_when_the_target_is_met(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=False)
    guard = Guard(proto, amax, quantizable_layers(proto), held, reference, GuardTarget(-1.0, 1.0))
    _, report = guard.run(lambda exclude: qdq_proto_from_ranges(proto, amax, QdqOptions(exclude=exclude)), "tiny")
    assert report.fallback == () and report.sensitivity == {} and report.passed


def test_guard_gives_up_with_a_clear_error(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    # a builder that ignores the fallback set can never recover
    broken = lambda exclude: qdq_proto_from_ranges(proto, amax)  # noqa: E731
    guard = Guard(proto, amax, quantizable_layers(proto), held, reference, GuardTarget(0.99, 0.01), max_rounds=2)
    with pytest.raises(CalibrationError, match="short of"):
        guard.run(broken, "tiny")


def test_layer_sensitivity_covers_every_layer(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    sim = SwitchableModel(proto, amax, quantizable_layers(proto))
    values = layer_sensitivity(sim, held, reference)
    assert set(values) == {"conv_a", "conv_b", "conv_c", "fc"} and all(v >= 0 for v in values.values())


def test_switchable_model_simulates_the_cpu_artifact(tmp_path, sample_images):
    from memexport.calibration.cpu_int8 import CPU_OP_TYPES, cpu_int8_proto_from_ranges, cpu_ranges
    from memexport.calibration.stats import ActivationStats

    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    stats = activation_stats_from_batches(model, iter_batches(sample_images, TINY_PREPROCESS, 4, augment=1))
    amax = amax_from_stats(stats, "entropy")
    proto = tiny_cnn_proto()
    ranges = cpu_ranges(stats)
    assert isinstance(stats, ActivationStats) and ranges["a_relu"][0] == 0.0
    layers = quantizable_layers(proto, [op for op in CPU_OP_TYPES if op == "Conv"])
    assert layers == ["conv_a", "conv_b", "conv_c"]
    held = load_all(sample_images, TINY_PREPROCESS)
    sim = SwitchableModel(proto, amax, layers, u8_ranges=ranges)
    real = session_scores(ort_session(cpu_int8_proto_from_ranges(model, ranges)), held)
    reference = session_scores(ort_session(proto), held)
    simulated = sim.scores(held, set(layers))
    # the simulation tracks the real UINT8 kernels far better than it tracks FP32
    assert np.abs(simulated - real).max() < 2e-3
    assert np.abs(simulated - real).mean() < 0.5 * max(np.abs(real - reference).mean(), 1e-4) + 5e-4
