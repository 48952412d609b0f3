"""Tamper and corruption detection for OpenVINO IR artifacts (``.xml`` + ``.bin``), without OpenVINO.

The ONNX seal (:mod:`memexport.runtime.integrity`) cannot carry over: an IR is two files, and
its memexport metadata sits in the ``.xml`` as the ``value`` attribute of ``<memexport>``
elements in ``rt_info`` (OpenVINO writes one at the top level and, for a model converted from
ONNX, one under ``framework``). :func:`seal_openvino_ir` records in that metadata a sha256 over

* the ``.xml`` bytes with every ``<memexport value="...">`` attribute of the model's own
  ``rt_info`` emptied (the attribute holds the digest: it cannot cover itself; copies inside
  ``If`` bodies are hashed as they are), then
* the ``.bin``'s own sha256, then
* the metadata JSON, canonicalised and without its ``extra.integrity`` record (so an edited
  field is caught too).

Every ``<memexport>`` value in the file must be the same JSON, and the runner cross-checks it
with the one OpenVINO parsed. As for ONNX, this catches corruption and casual tampering; it is
not a signature.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from html import unescape
from pathlib import Path
from typing import Any, Mapping

from memexport.core.errors import ArtifactError
from memexport.runtime.integrity import INTEGRITY_KEY, canonical_metadata, file_identity, remember_verified, sha256_file, verified_before
from memexport.runtime.integrity import SCHEME as ONNX_SCHEME

IR_SCHEME = "sha256:openvino-ir-xml-without-memexport-values+bin+canonical-metadata/v1"
_VALUE = re.compile(rb'(<memexport value=")([^"]*)(")')


def _escape(text: str) -> bytes:
    """``text`` as an XML attribute value in double quotes (what pugixml, OpenVINO's parser, reads back)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;").encode("utf-8")


def _model_rt_info_start(data: bytes) -> int:
    """Where the model's own ``rt_info`` can start: after the top-level ``</edges>``, the last one in the
    file (an ``If`` or ``Loop`` body inside a layer has edges and a copy of the ONNX metadata of its own)."""
    return max(data.rfind(b"</edges>"), 0)


def _read(xml: Path) -> bytes:
    try:
        return xml.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{xml}: cannot read the IR ({exc.strerror or exc}); check the path and permissions") from None


def ir_metadata_value(xml: Path | str, data: bytes | None = None) -> str | None:
    """The memexport metadata JSON of an IR's ``.xml`` (``None``: none), read without hashing anything.

    Raises:
        ArtifactError: Unreadable, or two different memexport metadata values in one ``.xml``.
    """
    data = _read(Path(xml)) if data is None else data
    values = {unescape(m.group(2).decode("utf-8")) for m in _VALUE.finditer(data, _model_rt_info_start(data))}
    if len(values) > 1:
        raise ArtifactError(f"{xml}: two different memexport metadata entries in one IR (tampered?); re-run `memexport calibrate`")
    return values.pop() if values else None


def ir_digest(xml: Path | str, data: bytes | None = None) -> tuple[str, str | None]:
    """sha256 of an IR as :data:`IR_SCHEME` defines it, and its memexport metadata JSON (``None``: none).

    Args:
        xml: The ``.xml``; its ``.bin`` sits beside it.
        data: The ``.xml`` bytes when already read (default ``None``: read them).

    Raises:
        ArtifactError: Unreadable files, or two different memexport metadata values in one ``.xml``.
    """
    xml = Path(xml)
    data = _read(xml) if data is None else data
    value = ir_metadata_value(xml, data)
    try:
        weights = sha256_file(xml.with_suffix(".bin"))
    except OSError as exc:
        raise ArtifactError(f"{xml.with_suffix('.bin')}: weights of {xml.name} unreadable ({exc.strerror or exc}); keep the .xml and .bin side by side") from None
    digest = hashlib.sha256(IR_SCHEME.encode() + b"\0")
    start = _model_rt_info_start(data)
    digest.update(data[:start] + _VALUE.sub(rb"\1\3", data[start:]) + b"\0" + weights.encode() + b"\0")
    if value is not None:
        # An "extra" the seal adds must not change the digest: hash as if every metadata had one.
        digest.update(canonical_metadata(json.dumps({"extra": {}, **json.loads(value)})))
    return digest.hexdigest(), value


def seal_openvino_ir(xml: Path | str) -> dict[str, Any]:
    """Record the IR's digest in its own memexport metadata, rewriting the ``.xml`` in place.

    Call it after the last ``openvino.save_model``, with the ``.bin`` beside the ``.xml``.

    Returns:
        The integrity record written (``scheme``, ``sha256``).

    Raises:
        ArtifactError: The ``.xml`` has no memexport metadata to seal.
    """
    xml = Path(xml)
    data = _read(xml)
    digest, value = ir_digest(xml, data)
    if value is None:
        raise ArtifactError(f"{xml}: no memexport metadata in this IR to seal; save it with memexport's metadata first")
    record = {"scheme": IR_SCHEME, "sha256": digest}
    sealed = json.loads(value)
    sealed.setdefault("extra", {})[INTEGRITY_KEY] = record
    new_value = _escape(json.dumps(sealed, sort_keys=True))
    with open(xml, "wb") as handle:
        start = _model_rt_info_start(data)
        handle.write(data[:start] + _VALUE.sub(lambda m: m.group(1) + new_value + m.group(3), data[start:]))
        handle.flush()
        os.fsync(handle.fileno())
    return record


def check_parsed_metadata(xml: Path, parsed_value: str | None, value: str | None) -> None:
    """Refuse metadata that OpenVINO parsed differently from the value in the file (the one hashed)."""
    if parsed_value is not None and value is not None and json.loads(parsed_value) != json.loads(value):
        raise ArtifactError(f"{xml}: the memexport metadata OpenVINO read is not the one in the file (tampered?); re-run `memexport calibrate`")


def _same_json(parsed: str, hashed: str) -> bool:
    return json.loads(parsed) == json.loads(hashed)  # OpenVINO may re-serialise what it parsed


def _identity(xml: Path) -> tuple | None:
    """The identity of the ``.xml`` and its ``.bin`` (``None`` when unreadable: the check reports it)."""
    try:
        return (file_identity(xml), file_identity(xml.with_suffix(".bin")))
    except OSError:
        return None


def check_openvino_ir(xml: Path | str, parsed_value: str | None = None, use_cache: bool = True) -> Mapping[str, Any] | None:
    """Verify an IR against the digest recorded in its metadata.

    Args:
        xml: The ``.xml``; its ``.bin`` sits beside it.
        parsed_value: The memexport metadata JSON as OpenVINO read it, cross-checked with the bytes
            hashed (default ``None``: no cross-check).
        use_cache: Skip re-hashing an IR already verified in this process whose two files keep their
            size, inode, mtime and ctime, as :func:`memexport.runtime.integrity.check_onnx` does
            (default ``True``; the ``.bin`` of ResMem's INT8 IR is 348 MB).

    Returns:
        The integrity record, or ``None`` for an IR written without one (or converted by hand from a
        sealed ONNX, whose record covers the ONNX bytes).

    Raises:
        ArtifactError: The ``.xml`` or ``.bin`` does not match the recorded sha256, or the metadata
            OpenVINO parsed is not the one in the file.
    """
    xml = Path(xml)
    key = _identity(xml) if use_cache else None
    cached = verified_before(key, parsed_value, _same_json) if key is not None else None
    if cached is not None:
        return cached
    data = _read(xml)
    value = ir_metadata_value(xml, data)
    check_parsed_metadata(xml, parsed_value, value)
    record = json.loads(value).get("extra", {}).get(INTEGRITY_KEY) if value is not None else None
    if record is None or (isinstance(record, dict) and record.get("scheme") == ONNX_SCHEME):
        # Nothing recorded, or an IR converted by hand from a sealed ONNX: its record covers ONNX bytes, not these.
        return None
    if not isinstance(record, dict) or record.get("scheme") != IR_SCHEME:
        raise ArtifactError(f"{xml}: unknown integrity scheme {record!r:.80}; re-run `memexport calibrate` with this memexport version")
    digest, _ = ir_digest(xml, data)  # only now: hashing the .bin is the costly part
    if digest != record.get("sha256"):
        raise ArtifactError(
            f"{xml}: sha256 {digest[:16]}... of the .xml and {xml.with_suffix('.bin').name} does not match the "
            f"{str(record.get('sha256'))[:16]}... recorded when it was written: modified or corrupted since; "
            "re-run `memexport calibrate` or restore the original"
        )
    if key is not None:
        remember_verified(key, record, value)
    return record
