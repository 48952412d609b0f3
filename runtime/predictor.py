"""``Predictor``: what apps embed. Paths, PIL images or arrays in; scores out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np

from memexport.core.errors import InputImageError, UsageError
from memexport.runtime.preprocess import ImageInput, check_decode, describe, preprocess, preprocess_bytes
from memexport.runtime.base import Runner, RunnerOptions
from memexport.runtime.registry import runner_for


Item = Union[np.ndarray, InputImageError]
"""A preprocessed image, or the error that stopped it."""

Key = TypeVar("Key")


def group_batches(items: Iterable[tuple[Key, Item]], batch_size: int) -> Iterator[list[tuple[Key, Item]]]:
    """Group ``(key, item)`` pairs, in order, into lists of up to ``batch_size`` preprocessed images
    plus the failures met on the way (failures never take an inference slot)."""
    pending: list[tuple[Key, Item]] = []
    good = 0
    for key, item in items:
        pending.append((key, item))
        good += not isinstance(item, InputImageError)
        if good >= batch_size:
            yield pending
            pending, good = [], 0
    if pending:
        yield pending


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


class BatchScoring:
    """``score_iter`` for a scorer that has ``batch_size``, ``preprocess(image)`` and ``score_batch(batch)``:
    :class:`Predictor` (one model) and :class:`~memexport.runtime.multi.MultiPredictor` (several)."""

    batch_size: int

    def preprocess(self, image: ImageInput) -> Any:
        raise NotImplementedError

    def score_batch(self, batch: Sequence[tuple[object, Any]]) -> list:
        raise NotImplementedError

    def score_iter(self, images: Iterable[ImageInput]) -> Iterator[Any]:
        """Score images in order, keeping every good result and reporting every bad one.

        Yields:
            One result per input, in input order (:class:`ScoreResult`, or
            :class:`~memexport.runtime.multi.MultiScoreResult` for several models).
        """
        for batch in group_batches(((describe(image), self._preprocess_or_error(image)) for image in images), self.batch_size):
            yield from self.score_batch(batch)

    def _preprocess_or_error(self, image: ImageInput) -> Any:
        try:
            return self.preprocess(image)
        except InputImageError as error:
            return error


class Predictor(BatchScoring):
    """Score images with an exported artifact, applying the artifact's own preprocessing.

    Thread-safety: one Predictor may be shared by several threads; ``score`` calls run
    concurrently on ONNX Runtime (whose sessions are thread-safe) and OpenVINO (one infer
    request per concurrent call) and are serialised on TensorRT (one execution context, one stream).

    Args:
        model: An ``.onnx`` artifact or a TensorRT ``.plan``/``.engine``, or an active :class:`Runner`.
        batch_size: Images per inference call (default 16).
        device: ``cpu``, ``cuda`` or ``auto`` for ONNX artifacts (default ``auto``).
        exif_transpose: Apply EXIF orientation before preprocessing (default ``False``,
            as the original resmem code).
        backend: ``onnxruntime``, ``openvino`` or ``tensorrt`` (default ``None``: by the
            artifact's suffix, ``.onnx`` -> ONNX Runtime, the exact FP32 default).
        precision: Compute precision where the back end offers a choice: OpenVINO ``fp32``
            (exact) or ``bf16`` (AMX/AVX512-BF16 CPUs) (default ``None``: the back end's exact default).
        decode: ``exact`` (default: the original code's pixels) or ``fast`` (JPEGs decoded at a DCT
            scale, about 2.3x less CPU than exact decoding on 12 MP photos, within the model spec's
            ``decode_tolerance``).

    Example:
        >>> with Predictor("resmem.onnx") as predictor:
        ...     scores = predictor.score(["a.jpg", "b.png"])
        >>> with Predictor("resmem.onnx", backend="openvino", precision="bf16") as fast:
        ...     scores = fast.score(["a.jpg", "b.png"])
    """

    def __init__(
        self, model: Path | str | Runner, batch_size: int = 16, device: str = "auto", exif_transpose: bool = False,
        backend: str | None = None, precision: str | None = None, decode: str = "exact",
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.decode = check_decode(decode)
        self.exif_transpose = exif_transpose
        if isinstance(model, Runner):
            self.runner, self._owns_runner = model, False
            if model.metadata is None:
                raise UsageError("pass an active runner (inside its `with` block) or a path")
            if backend is not None or precision is not None:
                raise UsageError("backend and precision belong to the runner passed in; give a path to choose them here")
        else:
            self.runner, self._owns_runner = runner_for(model, RunnerOptions(device=device), backend, precision=precision), True
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
        return preprocess(image, self.metadata.preprocess, self.exif_transpose, self.decode)

    def preprocess_bytes(self, data: bytes, name: str) -> np.ndarray:
        """An encoded image held in memory to the model input; errors name ``name``."""
        return preprocess_bytes(data, name, self.metadata.preprocess, self.exif_transpose, self.decode)

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

    def score_batch(self, batch: Sequence[tuple[object, Item]]) -> list[ScoreResult]:
        """Score one group from :func:`group_batches` in a single inference call.

        Returns:
            One :class:`ScoreResult` per entry, in order; ``source`` is ``str(key)``.
        """
        good = [item for _, item in batch if not isinstance(item, InputImageError)]
        scores = iter(self.infer(np.stack(good)).tolist()) if good else iter(())
        return [
            ScoreResult(str(key), None, item) if isinstance(item, InputImageError) else ScoreResult(str(key), float(next(scores)))
            for key, item in batch
        ]
