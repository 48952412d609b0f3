"""An honest estimate after the guard has chosen: choose on the other folds, judge on this one.

The guard builds several candidate artifacts (every layer in INT8, then the most sensitive 1, 2,
4, ... units kept in FP32; for the OpenVINO IR also two precisions for the layers outside INT8)
and ships the best by its estimate. The best of several estimates on the same images is
optimistic: the winner is partly the one whose errors happened to look small on these images.

So the interval reported for the shipped artifact is a nested cross-validation of the *whole
procedure*. The evidence images fall into blocks (the cross-validation folds; held-out images
scored by the final artifact make blocks of their own). For each block, the candidate is chosen
by the guard's own rule on the errors of the *other* blocks, and that candidate's errors on the
block are what the estimate sees. The units are ranked the same way: for each block, from the
ranking images outside it (:meth:`memexport.calibration.guard.Guard.sensitivity` keeps each
image's sensitivity), and when that ranking keeps other units in FP32 than the one the guard
used, the block is scored once more with those units. No image ever judges a choice it helped
make, so the errors the interval rests on are those of new photos under the procedure that chose
the shipped artifact, and :func:`~memexport.calibration.fidelity.estimate_fidelity` applies as
it does with nothing chosen. ``tests/calibration/test_selection.py`` checks the coverage on
synthetic data with a known answer, correlated candidates and correlated views per image.

Cost: the candidates' errors are those the guard measured anyway; the nested part adds only the
rescoring of a block whose own ranking differs (at most one build per block). With a single
candidate (the estimate was verified at once) nothing is chosen and nothing is added. On ResMem's
default workflow (15 images of ../shared/images, 5 folds) the Q/DQ guard tried 5 candidates and
3 folds were scored again, one fold build each, against the 25 fold builds of the search itself;
the OpenVINO IR's choice between BF16 and FP32 adds nothing.

What it estimates, and its limits: like any cross-validation, the procedure's performance
averaged over training sets, not the one artifact shipped; the candidates themselves are the ones
the guard tried on all images (a block's replay picks among them, it does not search again). On
synthetic data with 5 candidates correlated 0.9 (as fallback steps of one network are) and 4
views per image correlated 0.7, the 90% Spearman interval covered the shipped candidate's truth
in 95% of 300 calibrations and the mean-error bound in 94% (in-sample: 95% and 91%). With weakly
correlated candidates (0.3-0.6) the bound covered 84-91% nested against 75-82% in-sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from memexport.calibration.fidelity import MIN_IMAGES, FidelityEstimate, FidelityTarget, estimate_fidelity

# Blocks the held-out images (scored by the final artifact, which never saw any of them) are dealt into.
HELD_OUT_BLOCKS = 5


@dataclass(frozen=True)
class Block:
    """Evidence images judged together.

    Attributes:
        group: Index of the evidence group (the build) that scores them.
        images: Their indices among the evidence images.
    """

    group: int
    images: tuple[int, ...]


@dataclass
class Candidate:
    """One artifact the guard built and estimated.

    Attributes:
        label: What it is, for the record (``"2 units"``, ``"bf16, 0 units"``).
        units: How many of the most sensitive units it keeps in FP32 (0: none).
        exclude: The layers it keeps in FP32.
        errors: Per evidence image, the errors of its views.
        estimate: Its estimate on every evidence image (in-sample for the choice).
        rescore: Scores one group with another fallback set: ``rescore(exclude, group)`` returns
            per evidence image its errors (empty for images outside the group); ``None``: cannot.
        extra: Per ``(exclude, group)``, rescored errors already measured.
    """

    label: str
    units: int
    exclude: frozenset
    errors: list
    estimate: FidelityEstimate
    rescore: Callable[[frozenset, int], list] | None = None
    extra: dict = field(default_factory=dict)

    def errors_on(self, block: Block, exclude: frozenset) -> list:
        """This candidate's errors on ``block``'s images, with ``exclude`` in FP32 (rescored once when it differs)."""
        if exclude == self.exclude or self.rescore is None:
            return [self.errors[i] for i in block.images]
        key = (exclude, block.group)
        if key not in self.extra:
            self.extra[key] = self.rescore(exclude, block.group)
        return [self.extra[key][i] for i in block.images]


def blocks_of(groups: Sequence[Any], held_out_blocks: int = HELD_OUT_BLOCKS) -> tuple[Block, ...]:
    """The judging blocks: one per cross-validation fold, and the held-out group dealt into a few.

    Args:
        groups: :class:`~memexport.calibration.evidence.EvidenceGroup` objects, in order.
        held_out_blocks: Blocks for a group scored by the final artifact (default :data:`HELD_OUT_BLOCKS`).
    """
    out = []
    for index, group in enumerate(groups):
        images = tuple(int(i) for i in dict.fromkeys(np.asarray(group.image).tolist()))
        if group.fold is None:
            parts = [images[start::held_out_blocks] for start in range(held_out_blocks)]
            out += [Block(index, part) for part in parts if part]
        else:
            out.append(Block(index, images))
    return tuple(out)


def choose(estimates: Sequence[FidelityEstimate], target: FidelityTarget) -> int:
    """The guard's rule: from the first, take a later candidate only when it is better.

    The guard stops trying once its best is verified, so what it ships is the best of the
    candidates it tried; replayed on fewer images, the same rule picks among the same candidates
    (it does not stop early again: which candidates exist is the guard's, the pick is the block's).
    """
    best = 0
    for index in range(1, len(estimates)):
        if estimates[index].better_than(estimates[best], target):
            best = index
    return best


def choose_on(candidates: Sequence[Candidate], images: Sequence[int], scores: np.ndarray, other_scores: np.ndarray, target: FidelityTarget) -> int:
    """:func:`choose` on the estimates of ``images`` only (the lowest mean squared error when they are too few to estimate)."""
    if len(images) < MIN_IMAGES:
        return int(np.argmin([np.mean([np.mean(np.square(c.errors[i])) for i in images]) if images else 0.0 for c in candidates]))
    estimates = [estimate_fidelity([c.errors[i] for i in images], scores[list(images)], other_scores) for c in candidates]
    return choose(estimates, target)


def nested_estimate(
    candidates: Sequence[Candidate], blocks: Sequence[Block], scores: np.ndarray, other_scores: np.ndarray, target: FidelityTarget,
    fallback_for: Callable[[Block, int], frozenset] | None = None,
) -> tuple[FidelityEstimate, tuple[int, ...]]:
    """The estimate of the choosing procedure: each block judged by the candidate chosen on the other blocks.

    Args:
        candidates: What the guard tried, in order (the first is every layer in INT8).
        blocks: The judging blocks (:func:`blocks_of`).
        scores: FP32 score of each evidence image.
        other_scores: FP32 scores of further images (the scores' spread only).
        target: The guard's target.
        fallback_for: The layers a candidate with ``units`` units keeps in FP32 when the units are
            ranked without ``block``'s images (default: the candidate's own set).

    Returns:
        The estimate, and per block the index of the candidate that judged it.
    """
    count = len(scores)
    errors: list = [None] * count
    picks = []
    for block in blocks:
        inside = set(block.images)
        others = [i for i in range(count) if i not in inside]
        pick = choose_on(candidates, others, scores, other_scores, target)
        chosen = candidates[pick]
        exclude = fallback_for(block, chosen.units) if fallback_for is not None and chosen.units else chosen.exclude
        for image, values in zip(block.images, chosen.errors_on(block, exclude)):
            errors[image] = values
        picks.append(pick)
    missing = [i for i, e in enumerate(errors) if e is None]
    if missing:
        raise ValueError(f"evidence images {missing[:5]} are in no judging block")
    estimate = estimate_fidelity(errors, scores, other_scores)
    chosen_labels = sorted({candidates[p].label for p in picks})
    note = (f"nested: chosen among {len(candidates)} candidates on the other blocks, judged on each of {len(blocks)} blocks "
            f"(chosen: {', '.join(chosen_labels)})")
    return replace(estimate, selection=note), tuple(picks)
