"""TensorRT calibration caches in TensorRT's own text format.

The first line is ``TRT-<version>-EntropyCalibration2`` (or ``-MinMaxCalibration``); each
further line is ``tensor_name: <hex>``, where ``<hex>`` is the big-endian IEEE float32 bit
pattern of the scale and the tensor's dynamic range is ``scale * 127``. TensorRT 8.6's
implicit-INT8 builder reads such a file through ``IInt8Calibrator.readCalibrationCache``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from memexport.core.atomic import write_text_atomic
from memexport.core.errors import ArtifactError, UsageError

ALGORITHMS = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration", "percentile": "EntropyCalibration2"}
DEFAULT_TENSORRT_VERSION = "8.6.1"
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")


@dataclass(frozen=True)
class CalibrationCache:
    """A parsed cache.

    Attributes:
        version: TensorRT's integer version as written (``8601`` for 8.6.1, ``100300`` for 10.3.0).
        algorithm: ``EntropyCalibration2``, ``MinMaxCalibration``, ...
        ranges: Dynamic range (``scale * 127``) by tensor name.
    """

    version: int
    algorithm: str
    ranges: Mapping[str, float]


def tensorrt_version_number(version: str) -> int:
    """TensorRT's ``NV_TENSORRT_VERSION`` for a version string: 8.6.1 -> 8601, 10.3.0 -> 100300."""
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        raise UsageError(f"not a TensorRT version: {version!r}; expected something like 8.6.1") from None
    major, minor, patch = (list(parsed.release) + [0, 0])[:3]
    # TensorRT 10 widened the major field (major * 10000); 8.x used major * 1000.
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def scale_hex(dynamic_range: float) -> str:
    """The cache's 8-hex-digit big-endian float32 of ``dynamic_range / 127``."""
    return struct.pack(">f", float(dynamic_range) / 127.0).hex()


def calibration_cache_text(ranges: Mapping[str, float], method: str = "entropy", tensorrt_version: str = DEFAULT_TENSORRT_VERSION) -> str:
    """The cache file's text for ``ranges`` (dynamic range by tensor name).

    Args:
        ranges: Symmetric dynamic range (``amax``) per tensor.
        method: ``entropy``, ``minmax`` or ``percentile`` (default ``entropy``); percentile
            ranges are written under the entropy header, as TensorRT knows no percentile cache.
        tensorrt_version: Version written into the header (default 8.6.1, the last for Pascal).
    """
    if method not in ALGORITHMS:
        raise UsageError(f"unknown calibration method {method!r}; expected one of {', '.join(ALGORITHMS)}")
    lines = [f"TRT-{tensorrt_version_number(tensorrt_version)}-{ALGORITHMS[method]}"]
    for name, value in ranges.items():
        if "\n" in name or not name:
            raise UsageError(f"tensor name {name!r} cannot be written to a TensorRT calibration cache")
        lines.append(f"{name}: {scale_hex(value)}")
    return "\n".join(lines) + "\n"


def write_calibration_cache(path: Path | str, ranges: Mapping[str, float], method: str = "entropy", tensorrt_version: str = DEFAULT_TENSORRT_VERSION) -> None:
    """Write :func:`calibration_cache_text` to ``path`` atomically."""
    write_text_atomic(path, calibration_cache_text(ranges, method, tensorrt_version))


def parse_calibration_cache(text: str, source: str = "<cache>") -> CalibrationCache:
    """Parse a TensorRT calibration cache.

    Raises:
        ArtifactError: Bad header or line, naming the line.
    """
    lines = text.splitlines()
    match = _HEADER.match(lines[0].strip()) if lines else None
    if not match:
        first = lines[0][:60] if lines else "(empty file)"
        raise ArtifactError(f"{source}: not a TensorRT calibration cache: header {first!r}, expected 'TRT-<version>-EntropyCalibration2'")
    ranges: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or not name or not re.fullmatch(r"[0-9a-fA-F]{8}", value):
            raise ArtifactError(f"{source}: line {number} is not 'tensor_name: <8 hex digits>': {line[:80]!r}")
        ranges[name] = struct.unpack(">f", bytes.fromhex(value))[0] * 127.0
    return CalibrationCache(int(match.group(1)), match.group(2), ranges)


def read_calibration_cache(path: Path | str) -> CalibrationCache:
    """Read and parse a cache file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read calibration cache ({exc}); re-run `memexport calibrate`") from None
    return parse_calibration_cache(text, str(path))
