"""Export side: torch models, checkpoints and ONNX export. Needs ``memexport[export]`` (torch, onnx).

Importing this package is light; torch loads when a function runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from memexport.errors import BackendUnavailableError
from memexport.spec import get_spec


def require_export_deps() -> None:
    """Raise a one-line error when torch or onnx is missing."""
    import importlib.util

    missing = [name for name in ("torch", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise BackendUnavailableError(f"export needs {' and '.join(missing)}; install them with `pip install 'memexport[export]'`")


def export_model(
    name: str,
    output: Path | str,
    weights: Path | str | None = None,
    segmentation_weights: Path | str | None = None,
    seed: int = 0,
    opset: int = 17,
    warn: Callable[[str], None] = print,
):
    """Export the declared model ``name`` to ``output``; the CLI's ``export`` command.

    Args:
        name: Model spec name (``resmem``, ``m3m``).
        output: Destination ``.onnx``.
        weights: Main checkpoint (default: installed published ResMem weights).
        segmentation_weights: M3M's segmentation checkpoint (default ``None``).
        seed: Seed for randomly initialised parts (default 0).
        opset: ONNX opset (default 17).
        warn: Where warnings go (default ``print``).

    Returns:
        The :class:`~memexport.runtime.metadata.ArtifactMetadata` written.
    """
    from memexport.errors import UsageError

    spec = get_spec(name)
    require_export_deps()
    from memexport.export.onnx_export import ExportOptions, onnx_from_torch
    from memexport.export.weights import resolve

    if spec.name == "resmem":
        if segmentation_weights is not None:
            raise UsageError("--segmentation-weights applies to m3m only")
        return onnx_from_torch(spec, resolve(weights, seed=seed), output, ExportOptions(opset=opset))
    if spec.name == "m3m":
        from memexport.export.m3m import SEGMENTATION_PART, onnx_with_external_data_from_torch

        parts = {SEGMENTATION_PART: Path(segmentation_weights)} if segmentation_weights is not None else {}
        # Default main checkpoint: ResMem's published weights for the shared parts.
        source = resolve(weights, parts, seed=seed)
        return onnx_with_external_data_from_torch(spec, source, output, ExportOptions(opset=opset), warn=warn).metadata
    raise UsageError(f"model {name!r} has no exporter yet")
