"""What an artifact records about itself, read without loading the model (no back end, no GPU).

``--fast`` reads the precision an artifact records; the Ray driver and ``bench --end-to-end`` read
the model each artifact is, to plan a run of several models before any actor loads one.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

from memexport.core.errors import MemexportError
from memexport.runtime.engine_sidecar import read_sidecar
from memexport.runtime.integrity import find_metadata_entry
from memexport.runtime.ir_integrity import ir_metadata_value
from memexport.runtime.metadata import ENGINE_SUFFIXES


def recorded_metadata(path: Path | str) -> dict[str, Any] | None:
    """The memexport metadata an artifact records, as parsed JSON, read without loading the model:
    an ONNX file's metadata entry, an OpenVINO IR's ``rt_info``, or a TensorRT engine's sidecar.

    Returns:
        The record, or ``None`` when the file is unreadable or records none (loading it then says why).
    """
    path = Path(path)
    try:
        if path.suffix.lower() in ENGINE_SUFFIXES:
            value: str | None = read_sidecar(path).metadata.to_json()
        elif path.suffix.lower() == ".xml":
            value = ir_metadata_value(path)
        else:
            with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                value = find_metadata_entry(data, path).value
        record = json.loads(value) if value else None
    except (OSError, ValueError, MemexportError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def recorded_model(path: Path | str) -> str | None:
    """The model name an artifact records (:func:`recorded_metadata`), or ``None`` when unreadable."""
    model = (recorded_metadata(path) or {}).get("model")
    return model if isinstance(model, str) else None
