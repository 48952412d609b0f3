"""Rank statistics against scipy's reference implementations."""

import numpy as np
import pytest
from scipy import stats as sps

from memexport.core.ranks import kendall_tau_b, rankdata, spearman


@pytest.mark.parametrize("seed", range(5))
def test_rank_statistics_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 8, size=40).astype(float)  # many ties
    b = a + rng.normal(0, 2, size=40)
    np.testing.assert_allclose(rankdata(a), sps.rankdata(a))
    assert spearman(a, b) == pytest.approx(sps.spearmanr(a, b).statistic, abs=1e-12)
    assert kendall_tau_b(a, b) == pytest.approx(sps.kendalltau(a, b).statistic, abs=1e-12)


def test_kendall_blocks_agree_on_larger_input():
    rng = np.random.default_rng(7)
    a = rng.random(3000)
    b = a + rng.normal(0, 0.1, 3000)
    assert kendall_tau_b(a, b) == pytest.approx(sps.kendalltau(a, b).statistic, abs=1e-9)


def test_identical_and_reversed_rankings():
    x = np.array([0.3, 0.1, 0.9, 0.5])
    assert spearman(x, x) == pytest.approx(1.0) and kendall_tau_b(x, x) == 1.0
    assert spearman(x, -x) == pytest.approx(-1.0) and kendall_tau_b(x, -x) == pytest.approx(-1.0)
