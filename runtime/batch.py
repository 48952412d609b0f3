"""Scoring many files to CSV, keeping every good result and reporting every bad input."""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from memexport.runtime.files import collect_images
from memexport.runtime.predictor import Predictor


@dataclass(frozen=True)
class PredictOptions:
    """Options for :func:`scores_csv_from_images`.

    Attributes:
        batch_size: Images per inference call (default 16).
        device: ``cpu``, ``cuda`` or ``auto`` (default ``auto``).
        exif_transpose: Honour EXIF orientation (default ``False``, as the original code).
    """

    batch_size: int = 16
    device: str = "auto"
    exif_transpose: bool = False


@dataclass
class PredictSummary:
    """Outcome of a batch job.

    Attributes:
        scored: Images scored in this run.
        failures: Count of failed inputs by reason.
        duplicates: Inputs listed more than once (scored once).
        errors_path: Where per-file errors were written, if any failed.
    """

    scored: int = 0
    failures: Counter = field(default_factory=Counter)
    duplicates: int = 0
    errors_path: Path | None = None

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def errors_path_for(output: Path) -> Path:
    """``scores.csv`` → ``scores.errors.csv``."""
    return output.with_name(f"{output.stem}.errors.csv")


def scores_csv_from_images(
    model: Path, inputs: Sequence[Path], output: Path, options: PredictOptions = PredictOptions(),
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> PredictSummary:
    """Score files and folders into ``output`` (``path,score``) and ``<stem>.errors.csv`` (``path,error``).

    Rows are flushed as each batch finishes, so an interrupted run keeps every finished score.

    Args:
        model: Artifact to score with.
        inputs: Files and folders (folders recursively, sorted).
        output: CSV destination.
        options: See :class:`PredictOptions`.
        progress: Called with (done, total) after each image.
    """
    collected = collect_images(inputs)
    summary = PredictSummary(duplicates=len(collected.duplicates))
    errors_file = errors_path_for(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    error_rows: list[tuple[str, str]] = [(str(p), f"{reason}: file not found; check the path") for p, reason in collected.missing]
    for path, _ in collected.missing:
        summary.failures["missing"] += 1
    total = len(collected.paths)
    with Predictor(model, batch_size=options.batch_size, device=options.device, exif_transpose=options.exif_transpose) as predictor, open(
        output, "w", newline="", encoding="utf-8", errors="surrogateescape"
    ) as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score"])
        done = 0
        for result in predictor.score_iter(collected.paths):
            done += 1
            if result.error is None:
                writer.writerow([result.source, f"{result.score:.8f}"])
                summary.scored += 1
            else:
                error_rows.append((result.source, f"{result.error.reason}: {result.error.detail}"))
                summary.failures[result.error.reason] += 1
            if done % options.batch_size == 0 or done == total:
                handle.flush()
                os.fsync(handle.fileno())
            progress(done, total)
    if error_rows:
        with open(errors_file, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "error"])
            writer.writerows(error_rows)
        summary.errors_path = errors_file
    return summary
