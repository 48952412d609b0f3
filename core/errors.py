"""Typed errors. Every user-facing failure is a :class:`MemexportError`.

Messages follow one shape: what failed, what was expected and what was seen, and
how to fix it. The CLI prints ``str(error)`` on one line and exits with
``error.exit_code``; it never prints a traceback for these.
"""

from __future__ import annotations


class MemexportError(Exception):
    """Base class for every error memexport raises on purpose.

    Attributes:
        exit_code: Process exit status the CLI uses for this error (default 1).
    """

    exit_code: int = 1

    def __str__(self) -> str:  # one line, whatever the message carried
        return " ".join(super().__str__().split())


class UsageError(MemexportError):
    """Options or arguments that cannot work together."""

    exit_code = 2


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``.

    Raises:
        UsageError: Any other value; one line naming ``option`` and the choices.
    """
    if value not in choices:
        raise UsageError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


class BackendUnavailableError(MemexportError):
    """An optional back end (torch, TensorRT, CUDA, onnxruntime-gpu) is missing."""

    exit_code = 2


class InputImageError(MemexportError):
    """An image that cannot be read or decoded.

    Attributes:
        path: The offending path, or ``"<array>"`` / ``"<PIL image>"`` for in-memory input.
        reason: Short machine-friendly reason (``missing``, ``empty``, ``not-an-image``,
            ``truncated``, ``too-large``, ``unsupported-mode``, ``unreadable``, ``symlink-outside``).
    """

    def __init__(self, path: str, reason: str, detail: str) -> None:
        self.path = path
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {detail}")


class CheckpointError(MemexportError):
    """A checkpoint that is missing, unsafe or does not match the model."""


class ArtifactError(MemexportError):
    """An ONNX model, engine or sidecar that is missing, corrupt, tampered or unsafe."""


class ParityError(MemexportError):
    """An artifact whose outputs fall outside the stated tolerance of the reference."""


class BudgetError(MemexportError):
    """A model or batch size that does not fit in the VRAM budget."""


class EngineMismatchError(ArtifactError):
    """A TensorRT engine built for another TensorRT version or GPU."""


class CalibrationError(MemexportError):
    """Calibration that cannot run or cannot meet its fidelity target."""


class CudaError(MemexportError):
    """A CUDA runtime call that failed (driver missing or too old, out of memory, ...).

    Attributes:
        code: The CUDA status code (``cudaError_t``).
    """

    def __init__(self, message: str, code: int = -1) -> None:
        self.code = code
        super().__init__(message)


class Interrupted(MemexportError):
    """A long job stopped by Ctrl-C or SIGTERM after keeping every finished result.

    Attributes:
        summary: What was done before the stop (for ``predict``: a ``PredictSummary``).
    """

    exit_code = 130

    def __init__(self, message: str, summary: object = None) -> None:
        self.summary = summary
        super().__init__(message)
