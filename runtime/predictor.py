"""``Predictor``: what apps embed. Paths, PIL images or arrays in; scores out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from memexport.errors import InputImageError, UsageError
from memexport.runtime.preprocess import ImageInput, describe, preprocess
from memexport.runtime.runners import Runner, runner_for


@dataclass(frozen=True)
class ScoreResult:
    """One image's outcome in a batch job: a score, or the error that stopped it.

    Attributes:
        source: Printable name of the input (its path for files).
        score: The score in [0, 1], or ``None`` on failure.
        error: The :class:`InputImageError`, or ``None`` on success.
    """

    source: str
    score: float | None
    error: InputImageError | None = None


class Predictor:
    """Score images with an exported artifact, applying the artifact's own preprocessing.

    Thread-safety: one Predictor may be shared by several threads; ``score`` calls run
    concurrently on ONNX Runtime (whose sessions are thread-safe) and are serialised on
    TensorRT (one execution context, one stream).

    Args:
        model: An ``.onnx`` artifact or a TensorRT ``.plan``/``.engine``, or an active :class:`Runner`.
        batch_size: Images per inference call (default 16).
        device: ``cpu``, ``cuda`` or ``auto`` for ONNX artifacts (default ``auto``).
        exif_transpose: Apply EXIF orientation before preprocessing (default ``False``,
            as the original resmem code).

    Example:
        >>> with Predictor("resmem.onnx") as predictor:
        ...     scores = predictor.score(["a.jpg", "b.png"])
    """

    def __init__(
        self, model: Path | str | Runner, batch_size: int = 16, device: str = "auto", exif_transpose: bool = False
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.exif_transpose = exif_transpose
        if isinstance(model, Runner):
            self.runner, self._owns_runner = model, False
            if model.metadata is None:
                raise UsageError("pass an active runner (inside its `with` block) or a path")
        else:
            self.runner, self._owns_runner = runner_for(model, device=device), True
            self.runner.__enter__()
        assert self.runner.metadata is not None
        self.metadata = self.runner.metadata

    def close(self) -> None:
        if self._owns_runner and self.runner.metadata is not None:
            self.runner.__exit__(None, None, None)

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One image input to the model input (float32 CHW)."""
        return preprocess(image, self.metadata.preprocess, self.exif_transpose)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Scores for an already preprocessed batch."""
        return self.runner.infer(batch)

    def score(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Score images; the first bad input raises.

        Args:
            images: One image input or a sequence of them (paths, PIL images, uint8 arrays).

        Returns:
            float32 array with one score per image.

        Raises:
            InputImageError: Naming the first input that could not be read.
        """
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            images = [images]  # type: ignore[list-item]
        arrays = [self.preprocess(image) for image in images]
        if not arrays:
            return np.zeros((0,), dtype=np.float32)
        out = [self.infer(np.stack(arrays[i : i + self.batch_size])) for i in range(0, len(arrays), self.batch_size)]
        return np.concatenate(out)

    def score_iter(self, images: Iterable[ImageInput]) -> Iterator[ScoreResult]:
        """Score images in order, keeping every good result and reporting every bad one.

        Yields:
            One :class:`ScoreResult` per input, in input order.
        """
        pending: list[tuple[str, Any]] = []
        for image in images:
            name = describe(image)
            try:
                pending.append((name, self.preprocess(image)))
            except InputImageError as error:
                pending.append((name, error))
            if sum(1 for _, item in pending if not isinstance(item, InputImageError)) >= self.batch_size:
                yield from self._flush(pending)
                pending = []
        if pending:
            yield from self._flush(pending)

    def _flush(self, pending: list[tuple[str, Any]]) -> Iterator[ScoreResult]:
        good = [item for _, item in pending if not isinstance(item, InputImageError)]
        scores = iter(self.infer(np.stack(good)).tolist()) if good else iter(())
        for name, item in pending:
            if isinstance(item, InputImageError):
                yield ScoreResult(name, None, item)
            else:
                yield ScoreResult(name, float(next(scores)))
