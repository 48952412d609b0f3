"""Helpers shared by the batch-scoring tests of both engines (local and Ray)."""

from __future__ import annotations

import csv
from pathlib import Path

from memexport.runtime.preprocess import preprocess
from memexport.core.spec import RESMEM
from tests.models import scorer_scores


def rows(path: Path) -> list[list[str]]:
    """A scores or errors CSV as written (non-UTF-8 names kept as surrogate escapes)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        return list(csv.reader(handle))


def write_copies(folder: Path, photo: Path, count: int) -> Path:
    """``count`` distinct files holding one real photo: slow enough to act on mid-run, one known score."""
    folder.mkdir()
    data = photo.read_bytes()
    for index in range(count):
        (folder / f"img_{index:04d}.jpg").write_bytes(data)
    return folder


def expected_tiny(path: Path) -> float:
    """What ``tests.models.write_tiny_scorer``'s model scores for an image file."""
    return float(scorer_scores(preprocess(path, RESMEM.preprocess)[None])[0])
