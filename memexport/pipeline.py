"""Pipelines: the steps of several layers chained into one call.

``build`` is the CLI's ``memexport build``: a model name (exported once and cached) or an ONNX
file in, optionally calibrated on the way (``--calib DIR``), a TensorRT engine out. It sits
above ``export/`` and ``calibration/`` so that neither imports the other's way (README, *Layout*).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from memexport.core.version import __version__
from memexport.core.cachedir import default_cache_dir
from memexport.core.errors import CalibrationError
from memexport.export.tensorrt import BuildOptions, BuildResult, engine_from_onnx
from memexport.export.trt_version import tensorrt
from memexport.runtime.engine_sidecar import sha256_path


def onnx_cache_key(model: str, weights_record: dict[str, Any], opset: int) -> str:
    """Hash of everything that determines an export: model, weights (by sha256), opset, memexport version."""
    payload = json.dumps({"model": model, "weights": weights_record, "opset": opset, "memexport": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def onnx_for_model(name: str, cache_dir: Path | None = None, weights: Path | None = None, opset: int = 17,
                   warn: Callable[[str], None] = print) -> Path:
    """Export model ``name`` once and reuse the ONNX from the cache while its inputs are unchanged.

    The file is ``<cache_dir>/onnx/<name>-<hash>.onnx``; the hash covers the model name, the
    weights' sha256, the opset and the memexport version.
    """
    from memexport.export import export_model, require_export_deps
    from memexport.export.weights import resolve
    from memexport.core.spec import get_spec

    spec = get_spec(name)
    require_export_deps()
    source = resolve(weights, spec=spec)
    key = onnx_cache_key(name, source.describe(), opset)
    path = (cache_dir or default_cache_dir()) / "onnx" / f"{name}-{key}.onnx"
    if not path.is_file():
        warn(f"exporting {name} to {path}")
        export_model(name, path, weights=weights, opset=opset, warn=warn)
    return path


def calibration_cache_for(onnx_path: Path, images: Path, workdir: Path) -> Path:
    """Calibrate on the way (``--calib DIR``) with the calibration module, returning the cache path.

    Raises:
        CalibrationError: Calibration wrote no cache.
    """
    from memexport.calibration import CalibrationOptions, calibrate

    result = calibrate(onnx_path, images, workdir, CalibrationOptions(outputs=("cache",)))
    cache = Path(getattr(result, "cache", result) or workdir / f"{onnx_path.stem}.calib.cache")
    if not cache.is_file():
        raise CalibrationError(f"calibration of {onnx_path} from {images} wrote no cache at {cache}")
    return cache


def build(model_or_onnx: str | Path, output: Path | str, options: BuildOptions = BuildOptions(),
          warn: Callable[[str], None] = print) -> BuildResult:
    """The CLI's ``build``: a model name (exported and cached first) or an ONNX file in, an engine out.

    TensorRT is checked first, so a machine without it fails in a second, not after an export.
    """
    options.validate()
    tensorrt(options.device)
    source = Path(model_or_onnx)
    if source.suffix.lower() == ".onnx" or source.exists():
        onnx_path = source
    else:
        onnx_path = onnx_for_model(str(model_or_onnx), options.cache_dir, warn=warn)
    if options.calibration_images is not None:
        workdir = (options.cache_dir or default_cache_dir()) / "calibration" / sha256_path(onnx_path)[:16]
        cache = calibration_cache_for(onnx_path, Path(options.calibration_images), workdir)
        options = replace(options, calibration_cache=cache, calibration_images=None)
    return engine_from_onnx(onnx_path, output, options)
