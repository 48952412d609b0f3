"""The rank-fidelity guard finds a planted INT8-sensitive layer and keeps only it in FP32."""

from __future__ import annotations

import numpy as np
import pytest

from memexport.calibration.fidelity import FidelityTarget, estimate_fidelity
from memexport.calibration.guard import Guard, SwitchableModel, block_unit, ort_session, session_scores, unit_sensitivity
from memexport.calibration.images import iter_batches, load_all, split_images
from memexport.calibration.qdq import QdqOptions, qdq_proto_from_ranges, quantizable_layers
from memexport.calibration.stats import activation_stats_from_batches, amax_from_stats
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


def _evaluator(proto, amax, held, reference, build=None):
    """Builds the Q/DQ artifact with a fallback set and estimates its fidelity on ``held``."""
    build = build or (lambda exclude: qdq_proto_from_ranges(proto, amax, QdqOptions(exclude=exclude)))

    def evaluate(exclude):
        candidate = build(exclude)
        scores = session_scores(ort_session(candidate), held)
        return candidate, [np.array([e]) for e in scores - reference]

    return evaluate


def test_guard_finds_the_planted_layer(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    layers = quantizable_layers(proto)
    evaluate = _evaluator(proto, amax, held, reference)
    _, errors = evaluate(frozenset())
    naive = estimate_fidelity(errors, reference)
    assert not naive.verified(FidelityTarget())  # the plant works: all-INT8 is off target
    lines = []
    guard = Guard(proto, amax, layers, held, reference, FidelityTarget(0.99, 0.01), lines.append)
    final_proto, report = guard.run(evaluate, "tiny")
    sensitivity = report.sensitivity
    assert max(sensitivity, key=sensitivity.get) == SENSITIVE_LAYER
    assert report.fallback[0] == SENSITIVE_LAYER and report.fallback_units == report.fallback
    assert report.verified and report.final.verified(report.target)
    assert report.table()[0] == (SENSITIVE_LAYER, sensitivity[SENSITIVE_LAYER], "fp32")
    kept = len(report.fallback)
    assert all(precision == "int8" for _, _, precision in report.table()[kept:])
    # the returned proto is the one measured: conv_b reads the FP32 activation
    conv_b = next(n for n in final_proto.graph.node if n.name == SENSITIVE_LAYER)
    assert conv_b.input[0] == "a_relu"
    assert any("sensitivity" in line for line in lines)


def test_sensitivity_ranks_on_a_subset_and_still_finds_the_planted_layer(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    lines = []
    guard = Guard(proto, amax, quantizable_layers(proto), held, reference, FidelityTarget(0.99, 0.01), lines.append, sensitivity_images=2)
    _, report = guard.run(_evaluator(proto, amax, held, reference), "tiny")
    assert any("on 2 images" in line for line in lines)
    assert max(report.sensitivity, key=report.sensitivity.get) == SENSITIVE_LAYER
    # the fallback is still chosen and checked on every image
    assert report.verified and report.final.images == len(held)


def test_guard_skips_sensitivity_when_the_target_is_met(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=False)
    guard = Guard(proto, amax, quantizable_layers(proto), held, reference, FidelityTarget(-1.0, 1.0))
    _, report = guard.run(_evaluator(proto, amax, held, reference), "tiny")
    assert report.fallback == () and report.sensitivity == {} and report.verified


def test_fallback_never_makes_the_estimate_worse(tmp_path, sample_images):
    """A builder whose fallback hurts (as single-layer islands did on the CPU artifact): no step is taken."""
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    coarse = {name: value * 4 for name, value in amax.items()}

    def hurting(exclude):
        return qdq_proto_from_ranges(proto, coarse if exclude else amax)

    lines = []
    guard = Guard(proto, amax, quantizable_layers(proto), held, reference, FidelityTarget(0.99, 0.01), lines.append, max_rounds=3)
    final_proto, report = guard.run(_evaluator(proto, amax, held, reference, hurting), "tiny")
    assert report.steps and not any(step.taken for step in report.steps)
    assert report.fallback == () and report.chosen == report.initial
    # the estimate reported judges the choice too (nested), and says so
    assert report.final.selection.startswith("nested") and report.final.images == report.initial.images
    assert any("not taken" in line for line in lines)
    # and when steps help, the estimate only improves from one taken step to the next
    _, helped = Guard(proto, amax, quantizable_layers(proto), held, reference, FidelityTarget(0.9999, 0.0001), max_rounds=3).run(
        _evaluator(proto, amax, held, reference), "tiny")
    taken = [helped.initial] + [step.estimate for step in helped.steps if step.taken]
    assert all(later.better_than(earlier, helped.target) for earlier, later in zip(taken, taken[1:]))


def test_block_units_group_a_resnet_block():
    assert block_unit("/features/layer3/layer3.17/conv1/Conv") == "/features/layer3/layer3.17/"
    assert block_unit("/features/layer3/layer3.17/downsample/downsample.0/Conv") == "/features/layer3/layer3.17/"
    assert block_unit("/conv1/Conv") == "/conv1/Conv" and block_unit("conv_a") == "conv_a"


def test_unit_sensitivity_covers_every_layer(tmp_path, sample_images):
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    layers = quantizable_layers(proto)
    sim = SwitchableModel(proto, amax, layers)
    values = unit_sensitivity(sim, held, reference, {name: [name] for name in layers})
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


def test_sensitivity_cache_is_keyed_by_the_images_that_ranked_the_units(tmp_path, sample_images):
    """Same model, ranges and key, other ranking images: the cached ranking is not reused, it is measured again."""
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    cache = tmp_path / "sensitivity.json"
    layers = quantizable_layers(proto)

    def measured(batch, scores):
        lines = []
        Guard(proto, amax, layers, batch, scores, cache=cache, cache_key="model|qdq|percentile", log=lines.append).sensitivity()
        return any(line.startswith("measuring") for line in lines), any(line.startswith("reusing") for line in lines)

    assert measured(held[:4], reference[:4]) == (True, False)
    assert measured(held[:4], reference[:4]) == (False, True)  # same images: reused
    assert measured(held[4:8], reference[4:8]) == (True, False)  # other images: measured again


def test_units_ranked_without_a_judged_blocks_images(tmp_path, sample_images):
    """The nested estimate ranks units for a block without that block's ranking images."""
    proto, amax, held, reference = _setup(tmp_path, sample_images, planted=True)
    guard = Guard(proto, amax, quantizable_layers(proto), held, reference)
    per_image = guard.per_image()
    assert all(values.shape == (min(len(held), 8),) for values in per_image.values())
    without = guard.sensitivity(without=[0, 1])
    assert without == {unit: pytest.approx(float(values[2:].mean())) for unit, values in per_image.items()}
    assert guard.order()[0] == SENSITIVE_LAYER
