"""Parity between an artifact and its torch reference, with tolerances stated in full."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from memexport.core.errors import ParityError
from memexport.core.spec import Tolerance
from memexport.core.ranks import kendall_tau_b, spearman

_STATISTICS = {"max": np.max, "mean": np.mean, "median": np.median}


@dataclass(frozen=True)
class ParityReport:
    """Agreement of ``candidate`` with ``reference`` scores.

    Attributes:
        count: Images compared.
        max_abs: Largest absolute error.
        mean_abs: Mean absolute error.
        median_abs: Median absolute error.
        spearman: Spearman rho.
        kendall: Kendall tau-b.
        tolerance: The tolerance applied.
        passed: Whether every bound holds.
        failures: Which bounds failed, with observed values.
        needed_atol: Smallest ``atol`` that would have passed the score check (given ``rtol``).
    """

    count: int
    max_abs: float
    mean_abs: float
    median_abs: float
    spearman: float
    kendall: float
    tolerance: Tolerance
    passed: bool
    failures: tuple[str, ...]
    needed_atol: float

    def would_pass(self) -> str:
        """The tolerance that would have passed, stated in full."""
        return (
            f"{self.tolerance.statistic} abs err <= {self.needed_atol:.3g} + {self.tolerance.rtol:g}*{self.tolerance.statistic}|ref|, "
            f"spearman >= {math.floor(self.spearman * 1e4) / 1e4:g}, kendall >= {math.floor(self.kendall * 1e4) / 1e4:g}"
        )

    def as_dict(self) -> dict:
        data = asdict(self)
        data["tolerance"] = asdict(self.tolerance)
        data["would_pass"] = self.would_pass()
        return data

    def summary(self) -> dict:
        """The measured agreement alone, rounded, for records: spearman, kendall, mean/max abs, images."""
        return {
            "spearman": round(self.spearman, 6), "kendall": round(self.kendall, 6), "mean_abs": round(self.mean_abs, 6),
            "max_abs": round(self.max_abs, 6), "images": self.count,
        }

    def lines(self) -> list[str]:
        return [
            f"images: {self.count}",
            f"abs error: max {self.max_abs:.3g}, mean {self.mean_abs:.3g}, median {self.median_abs:.3g}",
            f"ranks: spearman {self.spearman:.6f}, kendall {self.kendall:.6f}",
            f"tolerance: {self.tolerance.describe()}",
            "result: PASS" if self.passed else f"result: FAIL ({'; '.join(self.failures)}); would pass with: {self.would_pass()}",
        ]


def compare(candidate: np.ndarray, reference: np.ndarray, tolerance: Tolerance) -> ParityReport:
    """Compare two score vectors under ``tolerance``."""
    candidate = np.asarray(candidate, dtype=np.float64).reshape(-1)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    if candidate.shape != reference.shape or candidate.size == 0:
        raise ParityError(f"cannot compare {candidate.size} candidate scores with {reference.size} reference scores")
    error = np.abs(candidate - reference)
    stat = _STATISTICS[tolerance.statistic]
    observed = float(stat(error))
    allowed = tolerance.atol + tolerance.rtol * float(stat(np.abs(reference)))
    rho, tau = spearman(candidate, reference), kendall_tau_b(candidate, reference)
    failures = []
    if not np.all(np.isfinite(candidate)):
        failures.append("non-finite scores")
    if not observed <= allowed:
        failures.append(f"{tolerance.statistic} abs err {observed:.3g} > {allowed:.3g}")
    if rho < tolerance.min_spearman:
        failures.append(f"spearman {rho:.6f} < {tolerance.min_spearman:g}")
    if tau < tolerance.min_kendall:
        failures.append(f"kendall {tau:.6f} < {tolerance.min_kendall:g}")
    needed = max(0.0, observed - tolerance.rtol * float(stat(np.abs(reference))))
    return ParityReport(
        count=int(candidate.size),
        max_abs=float(error.max()),
        mean_abs=float(error.mean()),
        median_abs=float(np.median(error)),
        spearman=rho,
        kendall=tau,
        tolerance=tolerance,
        passed=not failures,
        failures=tuple(failures),
        needed_atol=needed,
    )


def require(report: ParityReport, what: str) -> None:
    """Raise :class:`ParityError` when ``report`` failed: parity failures are errors, never warnings."""
    if not report.passed:
        raise ParityError(f"{what}: parity FAILED ({'; '.join(report.failures)}); tolerance {report.tolerance.describe()}; would pass with: {report.would_pass()}")
