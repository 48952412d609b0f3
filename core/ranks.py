"""Rank statistics in numpy (the torch-free runtime has no scipy)."""

from __future__ import annotations

import numpy as np


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (scipy's ``method='average'``)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    # Boundaries of runs of equal values.
    starts = np.concatenate(([True], sorted_values[1:] != sorted_values[:-1]))
    run_id = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.bincount(run_id)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = average[run_id]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho with average ranks; 1.0 when both inputs are constant, 0.0 when one is."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) < 2:
        return 1.0
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb else 0.0
    return float(np.mean((ra - ra.mean()) * (rb - rb.mean())) / (sa * sb))


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (tie-corrected), O(n^2) in memory-bounded blocks."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    n = len(a)
    if n < 2:
        return 1.0
    concordant = discordant = ties_a = ties_b = 0.0
    block = max(1, 4_000_000 // n)
    for start in range(0, n, block):
        da = np.sign(a[start : start + block, None] - a[None, :])
        db = np.sign(b[start : start + block, None] - b[None, :])
        prod = da * db
        concordant += float((prod > 0).sum())
        discordant += float((prod < 0).sum())
        ties_a += float(((da == 0) & (db != 0)).sum())
        ties_b += float(((db == 0) & (da != 0)).sum())
    # Every pair was counted twice (i<j and j>i); the ratio is unaffected.
    denominator = np.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    if denominator == 0:
        return 1.0 if np.array_equal(np.sign(a - a[0]), np.sign(b - b[0])) else 0.0
    return float((concordant - discordant) / denominator)
