"""The runner contract: :class:`Runner` and the one options object every runner shares.

A runner is a context manager. Entering it loads the artifact, checks its inputs against
the metadata and checks the memory budget; ``infer`` then maps a float32 NCHW batch to a
float32 vector of scores, one per image. Runners never preprocess: :class:`Predictor` does.

Every runner answers ``device``, ``precision``, ``max_batch``, :meth:`Runner.describe` and
:meth:`Runner.memory_bytes`, so callers never probe for back-end attributes. A new back end
is one module with a :class:`Runner` subclass plus one entry in :mod:`memexport.runtime.registry`.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from memexport.core.errors import UsageError
from memexport.runtime.budget import DEFAULT_BUDGET_BYTES
from memexport.runtime.metadata import ArtifactMetadata

_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def parse_device(device: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"cpu"``/``"auto"``/``"cuda"`` -> ``(kind, 0)``.

    Raises:
        UsageError: Anything else (an index is allowed on ``cuda`` only).
    """
    match = _DEVICE.match(str(device).strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UsageError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")
    return match.group(1), int(match.group(2) or 0)


@dataclass(frozen=True)
class RunnerOptions:
    """Options every runner takes (per-back-end options are separate frozen dataclasses).

    Attributes:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default ``"auto"``: the GPU
            when the back end can use one, else the CPU). Always a string.
        threads: Intra-op CPU threads; 0 leaves the back end's default (default 0).
        check_integrity: Verify the artifact against the digest recorded when it was made,
            before loading: the ONNX sha256 of ``runtime.integrity`` or the engine plan's sha256
            in its sidecar (default ``True``).
        vram_budget_bytes: GPU memory budget checked before loading on a GPU (default 11 GiB).
        varying_batch: The caller's batch sizes change from call to call (a server's dynamic
            batcher), so a back end should run one dynamic-shape model rather than compile one
            per size: OpenVINO's static shapes recompile (about 1 s for ResMem) for each new size
            (default ``False``: a folder job, whose batches all have one size but the last).
    """

    device: str = "auto"
    threads: int = 0
    check_integrity: bool = True
    vram_budget_bytes: int = DEFAULT_BUDGET_BYTES
    varying_batch: bool = False

    def __post_init__(self) -> None:
        parse_device(self.device)
        if self.threads < 0:
            raise UsageError(f"threads must be >= 0 (0: the back end's default), got {self.threads}")

    @property
    def device_kind(self) -> str:
        """``auto``, ``cpu`` or ``cuda``."""
        return parse_device(self.device)[0]

    @property
    def device_index(self) -> int:
        """The CUDA ordinal (0 unless ``cuda:N``)."""
        return parse_device(self.device)[1]


# Marks a recorded precision whose run calibration never measured (see Runner.recorded_precision).
UNVERIFIED_SUFFIX = "-unverified"


class Runner(abc.ABC):
    """Base class: subclasses implement :meth:`activate`, :meth:`_infer`, ``device`` and :meth:`memory_bytes`.

    Args:
        path: The artifact (``None`` for runners built from a model, such as the torch reference).
        options: Shared options (default :class:`RunnerOptions`).
        backend_options: The back end's own frozen options, or ``None`` for its defaults.

    Attributes:
        backend: Short back-end name used by ``bench`` records and the registry
            (``onnxruntime``, ``tensorrt``, ``openvino``, ``torch``).
        metadata: The artifact's metadata, available once active.
        unverified: Once active, one line saying why this run computes outside what the artifact's
            calibration verified (an INT8 artifact whose floating-point layers run in another
            precision than its guard checked), or ``None``.
    """

    backend: ClassVar[str] = "runner"
    options_class: ClassVar[type | None] = None  # the back end's own options dataclass, if any

    def __init__(self, path: Path | str | None = None, options: RunnerOptions = RunnerOptions(), backend_options: Any = None) -> None:
        if not isinstance(options, RunnerOptions):
            raise UsageError(f"{self.backend} runner: unknown options {type(options).__name__}; expected RunnerOptions")
        cls = self.options_class
        if backend_options is not None and (cls is None or not isinstance(backend_options, cls)):
            expected = cls.__name__ if cls is not None else "none"
            raise UsageError(f"{self.backend} runner: unknown option type {type(backend_options).__name__}; expected {expected}")
        self.path = Path(path) if path is not None else None
        self.options = options
        self.backend_options = backend_options if backend_options is not None else (cls() if cls is not None else None)
        self.metadata: ArtifactMetadata | None = None
        self.unverified: str | None = None
        self._active = False

    @classmethod
    def options_for_precision(cls, precision: str) -> Any:
        """The back end's own options that make it compute in ``precision`` (``--precision``).

        Back ends without a choice compute the artifact's own precision: they accept ``fp32``
        (their default, exact for an FP32 artifact) and refuse the rest. OpenVINO overrides this.

        Raises:
            UsageError: A precision this back end cannot be asked for.
        """
        if precision == "fp32":
            return None
        raise UsageError(f"--precision {precision}: the {cls.backend} back end computes the artifact's own precision; use --backend openvino for bf16")

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """The device actually used (``"cpu"``, ``"cuda:0"``...); before activation, the one asked for."""

    @property
    def precision(self) -> str:
        """The precision actually computed (``fp32``, ``fp16``, ``bf16``, ``int8``), or ``unknown`` before activation."""
        return self.metadata.precision if self.metadata else "unknown"

    @property
    def recorded_precision(self) -> str:
        """The precision scores files and summaries record: :attr:`precision`, followed by
        ``-unverified`` when the run computes outside what calibration verified (:attr:`unverified`)."""
        return f"{self.precision}{UNVERIFIED_SUFFIX}" if self.unverified else self.precision

    @property
    def max_batch(self) -> int | None:
        """Largest batch one ``infer`` call accepts, or ``None`` when unbounded."""
        return None

    @abc.abstractmethod
    def memory_bytes(self) -> int | None:
        """Estimate of the memory the active runner holds (VRAM on a GPU, weights on a CPU); ``None`` when unknown."""

    def describe(self) -> dict[str, Any]:
        """What runs where: back end, device, precision, batch limit, memory (back ends add their own facts)."""
        return {
            "path": str(self.path) if self.path is not None else None,
            "backend": self.backend,
            "device": self.device,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "memory_bytes": self.memory_bytes(),
        } | ({"unverified": self.unverified} if self.unverified else {})

    def __enter__(self) -> "Runner":
        self.activate()
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False
        self.deactivate()

    @abc.abstractmethod
    def activate(self) -> None:
        """Load the artifact, read its metadata, check inputs and budget."""

    def deactivate(self) -> None:
        """Release the artifact (default: nothing to release)."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Score a preprocessed batch.

        Args:
            batch: float32 array of shape ``(N, *input_shape)``, N >= 1.

        Returns:
            float32 array of shape ``(N,)``.

        Raises:
            UsageError: Inactive runner, or a batch of the wrong dtype or shape.
        """
        if not self._active or self.metadata is None:
            raise UsageError(f"{type(self).__name__} is not active; use it as `with runner: runner.infer(batch)`")
        expected = tuple(self.metadata.input_shape)
        if not isinstance(batch, np.ndarray) or batch.dtype != np.float32 or batch.ndim != 1 + len(expected) or tuple(batch.shape[1:]) != expected or batch.shape[0] < 1:
            seen = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise UsageError(f"{self.backend} runner: expected a float32 batch of shape (N, {', '.join(map(str, expected))}), got {seen}")
        limit = self.max_batch
        if limit is None or batch.shape[0] <= limit:
            return self._infer(np.ascontiguousarray(batch)).reshape(-1).astype(np.float32, copy=False)
        # Batches beyond the engine's profile are split rather than refused.
        parts = [self._infer(np.ascontiguousarray(batch[i : i + limit])).reshape(-1) for i in range(0, batch.shape[0], limit)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Back-end inference on a validated batch within ``max_batch``."""
