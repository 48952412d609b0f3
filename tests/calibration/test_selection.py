"""After the guard chooses among candidates, the reported interval still covers the shipped artifact's truth.

Synthetic data with a known answer, as production makes it: 15 images in 5 folds, 4 correlated
views per image, and 5 correlated candidate artifacts (like fallback steps) whose true error
spreads differ. The shipped candidate is the guard's choice on every image; its truth is known.
"""

from __future__ import annotations

import numpy as np
import pytest

from memexport.calibration.fidelity import FidelityTarget, estimate_fidelity, folded_normal_mean, gaussian_spearman
from memexport.calibration.selection import Block, Candidate, blocks_of, choose, nested_estimate

SCORE_SD, IMAGES, VIEWS, FOLDS = 0.08, 15, 4, 5
# Never verified, so the guard always keeps the best candidate: the strongest choosing there is.
TARGET = FidelityTarget(0.9999, 0.0001)


def _trial(rng, sd, bias, candidate_corr, view_corr=0.7):
    """One calibration's evidence: per candidate, per image, the errors of its views; and the FP32 scores."""
    scores = rng.normal(0.75, SCORE_SD, IMAGES)

    def views(shape):  # views of one image share ``view_corr`` of their variance
        return np.sqrt(view_corr) * rng.normal(size=shape[:-1] + (1,)) + np.sqrt(1 - view_corr) * rng.normal(size=shape)

    shared, own = views((IMAGES, VIEWS)), views((len(sd), IMAGES, VIEWS))
    errors = bias[:, None, None] + sd[:, None, None] * (np.sqrt(candidate_corr) * shared + np.sqrt(1 - candidate_corr) * own)
    candidates = [Candidate(f"{k}", k, frozenset({str(k)}), list(errors[k]), estimate_fidelity(list(errors[k]), scores)) for k in range(len(sd))]
    return scores, candidates


def _coverage(seed, trials, relative_sd, candidate_corr):
    rng = np.random.default_rng(seed)
    sd, bias = 0.006 * np.asarray(relative_sd), np.full(len(relative_sd), 0.001)
    truth = [gaussian_spearman(s / SCORE_SD) for s in sd]
    true_mean_abs = [folded_normal_mean(b, s) for b, s in zip(bias, sd)]
    fold = np.arange(IMAGES) % FOLDS
    blocks = [Block(f, tuple(int(i) for i in np.flatnonzero(fold == f))) for f in range(FOLDS)]
    counts = {"in_sample": [0, 0], "nested": [0, 0]}
    for _ in range(trials):
        scores, candidates = _trial(rng, sd, bias, candidate_corr)
        shipped = choose([c.estimate for c in candidates], TARGET)
        nested, picks = nested_estimate(candidates, blocks, scores, np.zeros(0), TARGET)
        assert len(picks) == FOLDS and nested.images == IMAGES and nested.views == IMAGES * VIEWS
        for name, estimate in (("in_sample", candidates[shipped].estimate), ("nested", nested)):
            counts[name][0] += estimate.spearman_low <= truth[shipped] <= estimate.spearman_high
            counts[name][1] += estimate.mean_abs_high >= true_mean_abs[shipped]
    return {name: (rank / trials, error / trials) for name, (rank, error) in counts.items()}


def test_interval_covers_the_shipped_artifact_after_choosing():
    """300 calibrations, each choosing among 5 correlated candidates (correlation 0.9, as fallback
    steps of one network are): the nested 90% Spearman interval covers the shipped artifact's true
    Spearman about 90% of the time (3-sigma binomial margin 0.052), and the mean-error bound, one
    end of a 90% interval, holds at least 90% of the time. Judged in-sample, as before, the bound
    held only about 85% of the time on the same data."""
    coverage = _coverage(seed=11, trials=300, relative_sd=[1.0, 0.95, 0.9, 0.85, 0.8], candidate_corr=0.9)
    margin = 3 * np.sqrt(0.9 * 0.1 / 300)
    rank, error = coverage["nested"]
    assert abs(rank - 0.90) <= margin + 0.02, coverage  # views make the interval a little conservative
    assert error >= 0.90, coverage
    assert coverage["in_sample"][1] < error, coverage


def test_choosing_among_equals_flatters_in_sample_but_not_nested():
    """Five candidates with the same truth: any winner is chosen for its luck on these images. The
    in-sample estimate of the winner is biased low; the nested one is not."""
    rng = np.random.default_rng(3)
    sd = np.full(5, 0.006)
    truth = folded_normal_mean(0.001, 0.006)
    fold = np.arange(IMAGES) % FOLDS
    blocks = [Block(f, tuple(int(i) for i in np.flatnonzero(fold == f))) for f in range(FOLDS)]
    in_sample, nested = [], []
    for _ in range(200):
        scores, candidates = _trial(rng, sd, np.full(5, 0.001), candidate_corr=0.3)
        in_sample.append(candidates[choose([c.estimate for c in candidates], TARGET)].estimate.mean_abs)
        nested.append(nested_estimate(candidates, blocks, scores, np.zeros(0), TARGET)[0].mean_abs)
    assert np.mean(in_sample) < 0.9 * truth  # the winner's curse
    assert np.mean(nested) == pytest.approx(truth, rel=0.05)


def test_a_block_is_judged_by_a_choice_made_without_it():
    """Candidate 1 looks perfect on block 0's two images and poor elsewhere. Block 0 is judged by the
    choice made on block 1 (candidate 0); block 1 by the choice made on block 0 (candidate 1, picked
    by mean squared error as two images are too few to estimate), whose poor errors there count."""
    scores = np.linspace(0.5, 0.9, 10)
    good, bad = [np.array([0.001, -0.001])] * 10, [np.array([0.02, -0.02])] * 10
    lucky = [np.array([0.0, 0.0])] * 2 + bad[2:]  # candidate 1: perfect on block 0, poor elsewhere
    blocks = [Block(0, (0, 1)), Block(1, tuple(range(2, 10)))]
    candidates = [Candidate("0", 0, frozenset(), good, estimate_fidelity(good, scores)),
                  Candidate("1", 1, frozenset({"x"}), lucky, estimate_fidelity(lucky, scores))]
    estimate, picks = nested_estimate(candidates, blocks, scores, np.zeros(0), FidelityTarget())
    assert picks == (0, 1)
    assert estimate.mean_abs == pytest.approx((2 * 0.001 + 8 * 0.02) / 10)
    assert candidates[1].estimate.mean_abs < estimate.mean_abs  # in-sample, the lucky one looked better than it is


def test_a_block_ranked_without_its_images_is_rescored_once():
    """When the units ranked without a block name other layers, that block's images are scored again, once."""
    scores = np.linspace(0.5, 0.9, 10)
    errors = [np.array([0.001, -0.002])] * 10
    calls = []

    def rescore(exclude, group):
        calls.append((exclude, group))
        return [np.array([0.003, 0.003])] * 10

    step = Candidate("1", 1, frozenset({"a"}), errors, estimate_fidelity(errors, scores), rescore)
    first = Candidate("0", 0, frozenset(), [e * 3 for e in errors], estimate_fidelity([e * 3 for e in errors], scores))
    blocks = [Block(0, tuple(range(5))), Block(1, tuple(range(5, 10)))]
    estimate, picks = nested_estimate([first, step], blocks, scores, np.zeros(0), FidelityTarget(), lambda block, units: frozenset({"b"}) if block.group == 0 else frozenset({"a"}))
    assert picks == (1, 1) and calls == [(frozenset({"b"}), 0)]
    assert estimate.images == 10 and estimate.selection.startswith("nested")


def test_held_out_images_are_dealt_into_blocks():
    class Group:
        def __init__(self, fold, image):
            self.fold, self.image = fold, np.array(image)

    blocks = blocks_of([Group(None, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]), Group(0, [6, 6, 7, 7]), Group(1, [8, 9])], held_out_blocks=3)
    assert [b.images for b in blocks] == [(0, 3), (1, 4), (2, 5), (6, 7), (8, 9)]
    assert [b.group for b in blocks] == [0, 0, 0, 1, 2]
