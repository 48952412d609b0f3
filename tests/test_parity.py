"""Parity reports: every bound is enforced, and failures say what would have passed."""

import numpy as np
import pytest

from memexport.core.errors import ParityError
from memexport.core.parity import compare, require
from memexport.core.spec import Tolerance

REF = np.array([0.70, 0.75, 0.80, 0.85, 0.90])


def test_identical_scores_pass():
    report = compare(REF.copy(), REF, Tolerance(atol=1e-6))
    assert report.passed and report.max_abs == 0 and report.spearman == pytest.approx(1.0)
    require(report, "same")  # does not raise


def test_absolute_error_over_tolerance_fails_and_states_needed_atol():
    report = compare(REF + 0.002, REF, Tolerance(atol=1e-3, min_spearman=0.99, min_kendall=0.9))
    assert not report.passed
    assert report.needed_atol == pytest.approx(0.002)
    with pytest.raises(ParityError) as info:
        require(report, "art.onnx")
    message = str(info.value)
    assert "art.onnx" in message and "max abs err <= 0.002" in message and "spearman >=" in message


def test_rank_swap_fails_on_spearman_and_kendall_even_when_errors_are_small():
    swapped = REF.copy()
    swapped[[0, 4]] = swapped[[4, 0]]
    report = compare(swapped, REF, Tolerance(atol=1.0, min_spearman=0.99, min_kendall=0.9))
    assert not report.passed
    assert any("spearman" in f for f in report.failures) and any("kendall" in f for f in report.failures)


def test_mean_statistic_and_relative_tolerance():
    candidate = REF.copy()
    candidate[0] += 0.04  # mean abs error 0.008
    assert compare(candidate, REF, Tolerance(atol=0.01, statistic="mean", min_spearman=0.5, min_kendall=0.5)).passed
    assert not compare(candidate, REF, Tolerance(atol=0.001, statistic="mean", min_spearman=0.5, min_kendall=0.5)).passed
    # rtol scales with the reference statistic: 0.01 * mean(|ref|) = 0.008 allows it.
    assert compare(candidate, REF, Tolerance(atol=0.0, rtol=0.0101, statistic="mean", min_spearman=0.5, min_kendall=0.5)).passed


def test_non_finite_scores_fail():
    candidate = REF.copy()
    candidate[2] = np.nan
    assert not compare(candidate, REF, Tolerance(atol=1.0, min_spearman=-1, min_kendall=-1)).passed


def test_length_mismatch_is_an_error():
    with pytest.raises(ParityError):
        compare(REF[:3], REF, Tolerance(atol=1.0))
