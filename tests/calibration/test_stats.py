"""Activation statistics: streaming histograms, range methods, storage."""

from __future__ import annotations

import numpy as np
import pytest

from memexport.calibration.stats import ActivationStats, activation_stats_from_batches, amax_from_stats, observed_tensors, signed_ranges
from memexport.core.errors import ArtifactError, UsageError


def _stats_of(chunks, bins=512):
    stats = ActivationStats.empty(["t"], bins)
    for chunk in chunks:
        stats.update(0, chunk)
    return stats


def test_histogram_is_independent_of_batch_order():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(0, scale, 1000).astype(np.float32) for scale in (0.1, 1.0, 30.0, 2.0)]
    forward, backward = _stats_of(chunks), _stats_of(chunks[::-1])
    assert forward.edge[0] == backward.edge[0]
    np.testing.assert_array_equal(forward.hist, backward.hist)
    assert forward.hist.sum() == 4000
    assert forward.minimum[0] == min(c.min() for c in chunks) and forward.maximum[0] == max(c.max() for c in chunks)


def test_methods():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 1, 200_000), [400.0, -350.0]]).astype(np.float32)
    stats = _stats_of([values], bins=4096)
    minmax = amax_from_stats(stats, "minmax")["t"]
    percentile = amax_from_stats(stats, "percentile", percentile=99.9)["t"]
    entropy = amax_from_stats(stats, "entropy")["t"]
    assert minmax == pytest.approx(400.0)
    # |N(0,1)| 99.9th percentile is ~3.29; the bins over [0, 512] are 0.125 wide
    assert 3.0 < percentile < 3.6
    # entropy ignores the two outliers and keeps most of the bulk
    assert 1.5 < entropy < 60.0
    with pytest.raises(UsageError):
        amax_from_stats(stats, "mse")
    low, high = signed_ranges(stats, {"t": entropy})["t"]
    assert low == pytest.approx(-entropy) and high == pytest.approx(entropy)


def test_save_load_round_trip(tmp_path):
    stats = _stats_of([np.linspace(-2, 5, 100, dtype=np.float32)])
    stats.images, stats.fingerprint = 3, "abc"
    stats.save(tmp_path / "s.npz")
    back = ActivationStats.load(tmp_path / "s.npz")
    assert back.names == ["t"] and back.images == 3 and back.fingerprint == "abc"
    np.testing.assert_array_equal(back.hist, stats.hist)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError):
        ActivationStats.load(tmp_path / "bad.npz")


def test_gathers_every_float_activation_of_a_model(tmp_path):
    from tests.models import tiny_cnn_proto, write_tiny_cnn

    path = write_tiny_cnn(tmp_path / "tiny.onnx")
    names = observed_tensors(tiny_cnn_proto())
    assert names[0] == "image" and {"a", "a_relu", "b", "pooled", "logit", "score"} <= set(names)
    batches = [np.random.default_rng(i).random((2, 3, 32, 32), dtype=np.float32) for i in range(3)]
    stats = activation_stats_from_batches(path, iter(batches), total=6)
    assert stats.images == 6
    image = stats.names.index("image")
    assert stats.minimum[image] >= 0 and stats.maximum[image] <= 1 and stats.hist[image].sum() == 6 * 3 * 32 * 32
    assert stats.minimum[stats.names.index("a_relu")] >= 0
