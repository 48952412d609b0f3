"""The evidence behind a fidelity estimate: images an artifact never calibrated on, with FP32 scores.

Two sources, used together:

- **cross-validation**: the calibration images are dealt into folds; for each fold the artifact
  is rebuilt from the statistics of the other folds and scores that fold's images and their
  augmented views, which it never saw. Every calibration image becomes honest evidence, at the
  price of a slightly pessimistic estimate (each rebuild saw fewer images than the artifact);
- **a held-out folder** (``--held-out`` or ``--held-out-fraction``): images the artifact itself
  never saw, scored by the artifact as written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


def fold_of(paths: Sequence[Path], folds: int) -> tuple[int, ...]:
    """Deal ``paths`` into ``folds`` folds by a hash of each file name: stable, balanced, order-free."""
    if folds <= 0:
        return tuple(0 for _ in paths)
    ranked = sorted(range(len(paths)), key=lambda i: (hashlib.sha1(paths[i].name.encode("utf-8", "surrogateescape")).digest(), str(paths[i])))
    out = [0] * len(paths)
    for rank, index in enumerate(ranked):
        out[index] = rank % folds
    return tuple(out)


@dataclass(frozen=True)
class EvidenceGroup:
    """Images scored by one artifact build.

    Attributes:
        fold: The fold left out of the build, or ``None`` for the artifact as written (held-out images).
        batch: Every view of every image (float32 NCHW).
        image: Index of each view's image in :attr:`Evidence.scores`.
        reference: FP32 score of each view.
    """

    fold: int | None
    batch: np.ndarray
    image: np.ndarray
    reference: np.ndarray


@dataclass(frozen=True)
class Evidence:
    """Everything the fidelity estimate rests on.

    Attributes:
        groups: Images by the build that scores them.
        scores: FP32 score of each evidence image (its original view).
        other_scores: FP32 scores of calibration images that are not evidence (they still tell the scores' spread).
        paths: The evidence images.
    """

    groups: tuple[EvidenceGroup, ...]
    scores: np.ndarray
    other_scores: np.ndarray
    paths: tuple[Path, ...]

    @property
    def images(self) -> int:
        return len(self.paths)

    def originals(self) -> tuple[np.ndarray, np.ndarray]:
        """The first view of each evidence image and its FP32 score (for ranking layers)."""
        batches, scores = [], []
        for group in self.groups:
            first = np.flatnonzero(np.r_[True, group.image[1:] != group.image[:-1]])
            batches.append(group.batch[first])
            scores.append(group.reference[first])
        return np.concatenate(batches), np.concatenate(scores)

    def errors(self, scores_by_group: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per evidence image, the errors of its views, from each group's INT8 scores (``None``: a group not scored, its images left empty)."""
        out: list[list[float]] = [[] for _ in range(self.images)]
        for group, scores in zip(self.groups, scores_by_group):
            if scores is None:
                continue
            for image, error in zip(group.image, np.asarray(scores, np.float64) - group.reference):
                out[int(image)].append(float(error))
        return [np.array(values) for values in out]


def gather_evidence(
    model: Path, preprocess: Any, groups: Sequence[tuple[int | None, Sequence[Path]]], views: int, others: Sequence[Path] = (),
    log: Callable[[str], None] = lambda _: None,
) -> Evidence:
    """Preprocess the evidence images (with ``views`` augmented views each) and score them in FP32.

    Args:
        model: FP32 ONNX file.
        preprocess: The artifact's preprocessing.
        groups: ``(fold, images)`` per build (``fold`` ``None``: scored by the artifact as written).
        views: Augmented views per image besides the image itself.
        others: Further images whose FP32 scores only sharpen the scores' spread.
        log: Receives skipped images.
    """
    from memexport.calibration.guard import ort_session, session_scores
    from memexport.calibration.images import augmented_views, load_all
    from memexport.core.errors import InputImageError
    from memexport.runtime.preprocess import load_image, preprocess_image

    session = ort_session(model)
    built, paths, scores = [], [], []
    for fold, members in groups:
        arrays, owner = [], []
        for path in members:
            try:
                image = load_image(path)
                stack = [preprocess_image(view, preprocess) for view in (augmented_views(image, views, seed=len(paths)) if views else [image])]
            except (InputImageError, OSError, ValueError, SyntaxError) as error:
                log(f"skipped {path}: {error}")
                continue
            arrays += stack
            owner += [len(paths)] * len(stack)
            paths.append(path)
        if not arrays:
            continue
        batch = np.stack(arrays)
        reference = session_scores(session, batch)
        owner_array = np.array(owner)
        first = np.flatnonzero(np.r_[True, owner_array[1:] != owner_array[:-1]])
        scores.append(reference[first])
        built.append(EvidenceGroup(fold, batch, owner_array, reference))
    other_batch = load_all(list(others), preprocess)
    other_scores = session_scores(session, other_batch) if len(other_batch) else np.zeros(0)
    return Evidence(tuple(built), np.concatenate(scores) if scores else np.zeros(0), other_scores, tuple(paths))
