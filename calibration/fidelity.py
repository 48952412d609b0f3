"""An honest estimate of the rank fidelity an INT8 artifact will keep on new photos.

Users consume memorability scores as a ranking, so what matters is the Spearman rho between
INT8 and FP32 scores on photos nobody calibrated on. Measured directly on a handful of
held-out images it is nearly blind: on 4 images it can only be 1.0, 0.8, 0.6, ...

The estimate instead models the ratio that decides rank agreement, the spread of the score
*errors* against the spread of the *scores* themselves. For Gaussian scores and errors the
Pearson correlation is ``rho = sigma_scores / sqrt(sigma_scores**2 + sigma_error**2)`` and the
population Spearman is ``(6 / pi) * asin(rho / 2)``. Both spreads are estimated from every image
there is: the FP32 scores of all images, and the score errors of images the artifact (or a
cross-validation fold of it) never calibrated on, with their augmented views. Their ratio has an
exact F-distributed pivot, ``(s_e**2 / sigma_e**2) / (s_s**2 / sigma_s**2) ~ F(df_e, df_s)``,
which gives the 90% interval on Spearman; the mean absolute error gets a t / chi-square interval.
Quantiles are exact (``scipy.stats``; calibration needs the ``export`` extra, which installs it).
Views of one image share most of their error, so the error's degrees of freedom count images,
not views (the conservative choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from memexport.core.errors import UsageError
from memexport.core.optional import require
from memexport.core.ranks import spearman as spearman_rho

CONFIDENCE = 0.90
# Fewer images than this leave 3 degrees of freedom or less: the interval spans most of [0, 1].
MIN_IMAGES = 5


def _dist(name: str) -> Any:
    """``scipy.stats.<name>``: exact quantiles (calibration needs the export extra, which installs scipy; the runtime never imports this)."""
    stats = require("scipy.stats", "export", "the calibration's fidelity intervals")
    return getattr(stats, name)


@lru_cache(maxsize=256)
def _f_quantiles(df_error: int, df_scores: int, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = _dist("f").ppf([tail, 1.0 - tail], df_error, df_scores)
    return float(low), float(high)


@lru_cache(maxsize=256)
def _t_quantile(df: int, confidence: float) -> float:
    """The t distribution's ``1 - (1 - confidence) / 2`` quantile: one end of a two-sided interval."""
    return float(_dist("t").ppf(1.0 - (1.0 - confidence) / 2.0, df))


@lru_cache(maxsize=256)
def _chi2_quantiles(df: int, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = _dist("chi2").ppf([tail, 1.0 - tail], df)
    return float(low), float(high)


def folded_normal_mean(mean: float, sd: float) -> float:
    """``E|X|`` for ``X ~ N(mean, sd**2)``: the mean absolute error of Gaussian errors."""
    if sd <= 0:
        return abs(mean)
    z = abs(mean) / sd
    return sd * math.sqrt(2.0 / math.pi) * math.exp(-z * z / 2.0) + abs(mean) * math.erf(z / math.sqrt(2.0))


def mean_abs_interval(per_image_abs: np.ndarray, errors: np.ndarray, images: int, confidence: float) -> tuple[float, float]:
    """Both ends of the mean absolute error's interval.

    Each end takes the wider of two bounds: a t bound on the per-image mean |error| (right for any
    error shape, but short on few images because |error| is skewed), and the Gaussian errors'
    ``E|e|`` at the matching ends of the error's mean (t) and spread (chi-square). The low end is
    a real bound (``E|e|`` grows with both ``|mean|`` and the spread), not the high end mirrored.

    Args:
        per_image_abs: Per image, the mean |error| of its views.
        errors: Per image, the mean error of its views.
        images: How many images (the degrees of freedom are ``images - 1``).
        confidence: Two-sided coverage.
    """
    t = _t_quantile(images - 1, confidence)
    chi_low, chi_high = _chi2_quantiles(images - 1, confidence)
    step = t * float(per_image_abs.std(ddof=1)) / math.sqrt(images)
    sd = float(errors.std(ddof=1))
    mean, mean_step = abs(float(errors.mean())), t * sd / math.sqrt(images)
    gaussian_high = folded_normal_mean(mean + mean_step, sd * math.sqrt((images - 1) / chi_low))
    gaussian_low = folded_normal_mean(max(0.0, mean - mean_step), sd * math.sqrt((images - 1) / chi_high))
    centre = float(per_image_abs.mean())
    return max(0.0, min(centre - step, gaussian_low)), max(centre + step, gaussian_high)


def gaussian_spearman(error_to_spread: float) -> float:
    """Population Spearman of FP32 against INT8 scores for Gaussian scores and errors.

    Args:
        error_to_spread: ``sigma_error / sigma_scores``.
    """
    rho = 1.0 / math.sqrt(1.0 + error_to_spread**2)
    return 6.0 / math.pi * math.asin(rho / 2.0)


@dataclass(frozen=True)
class FidelityTarget:
    """What the estimate must show.

    Attributes:
        min_spearman: Lowest Spearman on new photos (default 0.99).
        max_mean_abs: Largest mean absolute score error on new photos (default 0.01).
    """

    min_spearman: float = 0.99
    max_mean_abs: float = 0.01


@dataclass(frozen=True)
class FidelityEstimate:
    """Spearman and mean absolute error against FP32 expected on new photos, with a 90% interval.

    Attributes:
        spearman: Point estimate of the Spearman rho on a large set of new photos.
        spearman_low: Lower end of its interval.
        spearman_high: Upper end.
        mean_abs: Point estimate of the mean absolute score error.
        mean_abs_high: Upper end of its interval.
        images: Real images the estimate rests on (views not counted).
        views: Score errors that went in (images times views).
        measured_spearman: Spearman of the errors' images themselves (original views), for reference.
        error_sd: Standard deviation of the score error.
        score_sd: Standard deviation of the FP32 scores.
        score_images: Images whose FP32 scores gave ``score_sd``.
        confidence: Interval coverage (default 0.9).
        mean_abs_low: Lower end of the mean absolute error's interval (:func:`mean_abs_interval`).
        selection: How the interval accounts for the guard's choice among candidate artifacts
            (empty: nothing was chosen; see :mod:`memexport.calibration.selection`).
    """

    spearman: float
    spearman_low: float
    spearman_high: float
    mean_abs: float
    mean_abs_high: float
    images: int
    views: int
    measured_spearman: float
    error_sd: float
    score_sd: float
    score_images: int
    confidence: float = CONFIDENCE
    mean_abs_low: float = 0.0
    selection: str = ""

    def verified(self, target: FidelityTarget) -> bool:
        """The whole interval meets ``target``."""
        return self.spearman_low >= target.min_spearman and self.mean_abs_high <= target.max_mean_abs

    def refuted(self, target: FidelityTarget) -> bool:
        """Even the interval's best end misses ``target``: more images would not help."""
        return self.spearman_high < target.min_spearman or self.mean_abs_low > target.max_mean_abs

    def better_than(self, other: "FidelityEstimate", target: FidelityTarget) -> bool:
        """Whether this estimate improves on ``other`` towards ``target``.

        Each shortfall (Spearman's lower end under its target, the error's upper end over its
        bound) is scaled by its target's headroom and the larger one decides; ties do not count.
        """
        return _shortfall(self, target) < _shortfall(other, target) - 1e-12

    def record(self, target: FidelityTarget) -> dict:
        """The ``fidelity`` entry of ``<stem>.calib.json`` and of the artifact's metadata."""
        return {
            "spearman": round(self.spearman, 4), "spearman_low": round(self.spearman_low, 4), "spearman_high": round(self.spearman_high, 4),
            "mean_abs": round(self.mean_abs, 5), "mean_abs_high": round(self.mean_abs_high, 5), "mean_abs_low": round(self.mean_abs_low, 5), "images": self.images,
            "verified": self.verified(target), "views": self.views, "measured_spearman": round(self.measured_spearman, 4),
            "confidence": self.confidence, "target": {"min_spearman": target.min_spearman, "max_mean_abs": target.max_mean_abs},
            **({"selection": self.selection} if self.selection else {}),
        }

    def describe(self) -> str:
        return (
            f"spearman {self.spearman:.4f} ({self.confidence:.0%} interval {self.spearman_low:.4f}-{self.spearman_high:.4f}), "
            f"mean abs {self.mean_abs:.4f} (<= {self.mean_abs_high:.4f}) on {self.images} images"
        )

    def spearman_low_with(self, count: int) -> float:
        """The interval's lower end if ``count`` images (and the same further score images) showed these spreads.

        The degrees of freedom are :func:`estimate_fidelity`'s: ``count - 1`` for the errors and
        ``count + (score_images - images) - 1`` for the scores, so ``count == images`` gives ``spearman_low``.
        """
        ratio = self.error_sd / self.score_sd if self.score_sd > 0 else math.inf
        f_low, _ = _f_quantiles(count - 1, count + self.score_images - self.images - 1, self.confidence)
        return gaussian_spearman(ratio / math.sqrt(f_low))

    def images_to_settle(self, target: FidelityTarget, limit: int = 100_000) -> int | None:
        """Images that would verify ``target`` if more of them showed the same errors; ``None`` if no number would.

        Each added image adds to both spreads, as in :func:`estimate_fidelity`: the errors' degrees of
        freedom are ``count - 1`` and the scores' ``count + (score_images - images) - 1``.
        """
        if self.spearman < target.min_spearman or self.mean_abs > target.max_mean_abs:
            return None
        if self.verified(target):
            return self.images
        spread = (self.mean_abs_high - self.mean_abs) * math.sqrt(self.images) / _t_quantile(self.images - 1, self.confidence)

        def settles(count: int) -> bool:
            high = self.mean_abs + _t_quantile(count - 1, self.confidence) * spread / math.sqrt(count)
            return self.spearman_low_with(count) >= target.min_spearman and high <= target.max_mean_abs

        low, high = self.images, self.images
        while not settles(high):
            low, high = high, high * 2
            if high > limit:
                return None
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if settles(middle) else (middle, high)
        return high


def _shortfall(estimate: FidelityEstimate, target: FidelityTarget) -> float:
    rank = (target.min_spearman - estimate.spearman_low) / max(1.0 - target.min_spearman, 1e-6)
    error = (estimate.mean_abs_high - target.max_mean_abs) / max(target.max_mean_abs, 1e-9)
    return max(rank, error)


def estimate_fidelity(
    errors: Sequence[np.ndarray], image_scores: Sequence[float], other_scores: Sequence[float] = (), confidence: float = CONFIDENCE
) -> FidelityEstimate:
    """Estimate, with an interval, the Spearman and mean abs error INT8 keeps against FP32 on new photos.

    Args:
        errors: Per image, the INT8 minus FP32 score errors of its views (the image itself first),
            each from an artifact that never calibrated on that image.
        image_scores: FP32 score of each of those images, in the same order.
        other_scores: FP32 scores of further real images (default none); they sharpen the
            scores' spread, which does not depend on calibration.
        confidence: Coverage of the intervals (default 0.9).

    Raises:
        UsageError: Fewer than :data:`MIN_IMAGES` images with errors, or scores without spread.
    """
    per_image = [np.asarray(e, np.float64).reshape(-1) for e in errors]
    own = np.asarray(image_scores, np.float64).reshape(-1)
    if len(per_image) != own.size or any(e.size == 0 for e in per_image):
        raise ValueError(f"{len(per_image)} error sets for {own.size} image scores")
    if own.size < MIN_IMAGES:
        raise UsageError(f"a fidelity estimate needs at least {MIN_IMAGES} images, got {own.size}; pass a folder with more images")
    scores = np.concatenate([own, np.asarray(other_scores, np.float64).reshape(-1)])
    pooled = np.concatenate(per_image)
    count = len(per_image)
    error_sd, score_sd = float(pooled.std(ddof=1)), float(scores.std(ddof=1))
    if score_sd <= 0:
        raise UsageError("the FP32 scores of these images are all equal, so no ranking can be checked; pass a folder of varied photos")
    f_low, f_high = _f_quantiles(count - 1, scores.size - 1, confidence)
    ratio = error_sd / score_sd
    absolute = np.array([np.mean(np.abs(e)) for e in per_image])
    mean_abs = float(absolute.mean())
    low, bound = mean_abs_interval(absolute, np.array([e.mean() for e in per_image]), count, confidence)
    firsts = np.array([e[0] for e in per_image])
    return FidelityEstimate(
        spearman=gaussian_spearman(ratio),
        spearman_low=gaussian_spearman(ratio / math.sqrt(f_low)),
        spearman_high=gaussian_spearman(ratio / math.sqrt(f_high)),
        mean_abs=mean_abs,
        mean_abs_high=bound,
        images=count,
        views=int(pooled.size),
        measured_spearman=spearman_rho(own + firsts, own),
        error_sd=error_sd,
        score_sd=score_sd,
        score_images=int(scores.size),
        confidence=confidence,
        mean_abs_low=low,
    )
