"""Tamper and corruption detection for ONNX artifacts, without the ``onnx`` package.

At export, :func:`seal_onnx` records in the artifact's own memexport metadata a sha256 over

* every byte of the ``.onnx`` file except the top-level ``metadata_props`` entry whose key is
  ``memexport`` (the entry that holds the digest: it cannot cover itself), then
* the memexport metadata JSON itself, canonicalised (``sort_keys``) and with the
  ``extra.integrity`` record removed, so editing the metadata (say, its preprocessing) is
  caught too, then
* nothing else: each external-data file gets its own sha256 in the same record.

The runtime finds that entry by its protobuf encoding alone: ``ModelProto.metadata_props``
is field 14 (tag byte ``0x72``) holding a ``StringStringEntryProto`` whose ``key`` (field 1,
``0x0a``) is ``memexport`` and whose ``value`` (field 2, ``0x12``) is the JSON. Re-encoding
``0x72 len(0x0a 9 "memexport" 0x12 len(json) json)`` gives the exact bytes to skip, and the
runner cross-checks that JSON against the one ONNX Runtime parsed.

This detects corruption and casual tampering (a flipped weight, an edited metadata field, a
swapped external-data file). It is not a signature: whoever can rewrite the file can rewrite
the digest too. For authenticity, compare :func:`onnx_digest` (shown by ``memexport inspect``)
with a digest published out of band.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from memexport.core.errors import ArtifactError
from memexport.core.optional import optional
from memexport.runtime.metadata import METADATA_KEY

def model_not_found(path: Path) -> ArtifactError:
    """The one-line error for a model file that is not there, with the command that makes one."""
    return ArtifactError(f"{path}: model file not found; export one with `memexport export resmem -o {path.with_suffix('.onnx').name}`")


def check_model_present(path: Path) -> None:
    """Refuse a missing or empty model file in one line, before a back end parses it."""
    if not path.is_file():
        raise model_not_found(path)
    if path.stat().st_size == 0:
        raise ArtifactError(f"{path}: model file is empty (0 bytes); re-export it")


def check_external_data_location(model_path: Path, locations: Sequence[str]) -> None:
    """Refuse external-data references that leave the model's folder.

    Raises:
        ArtifactError: For an absolute path, a ``..`` escape or a symlink out of the folder.
    """
    folder = model_path.resolve().parent
    for location in locations:
        candidate = Path(location)
        target = (folder / candidate).resolve()
        if candidate.is_absolute() or (folder != target and folder not in target.parents):
            raise ArtifactError(
                f"{model_path}: external data {location!r} points outside the model's folder {folder}; "
                "refusing to read it. Keep the .onnx and its data file side by side (re-export or move them together)"
            )


def external_data_locations(model_path: Path) -> list[str]:
    """Locations of every external-data tensor in an ONNX file (needs the ``onnx`` package).

    Returns an empty list where ``onnx`` is not installed; ONNX Runtime then applies its own
    checks (it also refuses paths that escape the model folder).
    """
    onnx = optional("onnx")
    if onnx is None:
        return []
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt artifact
        raise ArtifactError(f"{model_path}: not a readable ONNX file ({type(exc).__name__}); re-export it") from None
    return onnx_external_locations(proto)


def onnx_external_locations(proto: Any) -> list[str]:
    """Sorted external-data locations of a loaded ``onnx.ModelProto``."""
    from onnx import TensorProto
    from onnx.external_data_helper import _get_all_tensors

    return sorted(
        {e.value for t in _get_all_tensors(proto) if t.data_location == TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
    )


SCHEME = "sha256:onnx-without-memexport-entry+canonical-metadata/v1"
INTEGRITY_KEY = "integrity"

_TAG_METADATA_PROPS = b"\x72"  # ModelProto field 14, wire type 2
_KEY_FIELD = b"\x0a" + bytes([len(METADATA_KEY)]) + METADATA_KEY.encode()
_VALUE_TAG = b"\x12"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: Any, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


class MissingMetadataEntry(ArtifactError):
    """No well-formed memexport metadata entry in the bytes (unsealable, or nothing to check)."""


def metadata_entry_bytes(value: str) -> bytes:
    """The protobuf encoding of the top-level ``metadata_props`` entry ``memexport = value``."""
    raw = value.encode("utf-8")
    inner = _KEY_FIELD + _VALUE_TAG + _varint(len(raw)) + raw
    return _TAG_METADATA_PROPS + _varint(len(inner)) + inner


@dataclass(frozen=True)
class EntrySpan:
    """Where the memexport metadata entry sits in an ONNX file: bytes ``[start, end)``, and its JSON."""

    start: int
    end: int
    value: str


def find_metadata_entry(data: Any, source: Path | str = "<bytes>") -> EntrySpan:
    """Locate the memexport ``metadata_props`` entry in serialised ONNX bytes (or an mmap).

    The last match wins: top-level ``metadata_props`` (field 14) is serialised after the graph.

    Raises:
        MissingMetadataEntry: No well-formed memexport entry (truncated, corrupt or not a memexport file).
    """
    pattern = _KEY_FIELD + _VALUE_TAG
    pos = data.rfind(pattern)
    while pos >= 0:
        try:
            length, value_start = _read_varint(data, pos + len(pattern))
            value_end = value_start + length
            if value_end <= len(data):
                value = bytes(data[value_start:value_end]).decode("utf-8")
                entry = metadata_entry_bytes(value)
                start = value_end - len(entry)
                if start >= 0 and bytes(data[start:value_end]) == entry:
                    json.loads(value)
                    return EntrySpan(start, value_end, value)
        except (ValueError, UnicodeDecodeError):
            pass
        pos = data.rfind(pattern, 0, pos)
    raise MissingMetadataEntry(
        f"{source}: no readable memexport metadata entry in this ONNX file (truncated, corrupt or not exported by memexport); "
        "re-export it with `memexport export`"
    )


def canonical_metadata(value: str) -> bytes:
    """The metadata JSON without its integrity record, as ``json.dumps(sort_keys=True)`` UTF-8."""
    data = json.loads(value)
    extra = data.get("extra")
    if isinstance(extra, dict):
        data["extra"] = {k: v for k, v in extra.items() if k != INTEGRITY_KEY}
    return json.dumps(data, sort_keys=True).encode("utf-8")


def _digest(data: Any, span: EntrySpan) -> str:
    view = memoryview(data)
    digest = hashlib.sha256()
    digest.update(SCHEME.encode() + b"\0" + struct.pack("<QQ", span.start, len(data) - span.end))
    # hashlib releases the GIL on large buffers, so hashing does not stall decoding threads.
    digest.update(view[: span.start])
    digest.update(view[span.end :])
    digest.update(b"\0" + canonical_metadata(span.value))
    view.release()
    return digest.hexdigest()


def _mapped(path: Path) -> tuple[Any, Any]:
    handle = open(path, "rb")
    try:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ArtifactError(f"{path}: file is empty (0 bytes); re-export it")
        return handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        handle.close()
        raise


def onnx_digest(path: Path | str) -> tuple[str, EntrySpan]:
    """sha256 of an ONNX artifact as :data:`SCHEME` defines it, and its metadata entry.

    Raises:
        ArtifactError: Missing, empty or unparsable file.
    """
    path = Path(path)
    try:
        handle, data = _mapped(path)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the artifact ({exc.strerror or exc}); check the path and permissions") from None
    with handle, data:
        span = find_metadata_entry(data, path)
        return _digest(data, span), span


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a whole file, read in 4 MiB chunks (default)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def seal_onnx(path: Path | str, external_locations: Sequence[str] = ()) -> dict[str, Any]:
    """Record the artifact's digest in its own memexport metadata, rewriting ``path`` in place.

    Call it on the temporary file inside :func:`memexport.core.atomic.atomic_path`, after the last
    ``onnx.save``: any later re-serialisation of the model invalidates the seal.

    Args:
        path: A saved ``.onnx`` file with memexport metadata.
        external_locations: External-data file names, relative to the model's folder (default none).

    Returns:
        The integrity record written (``scheme``, ``sha256``, ``external``).
    """
    path = Path(path)
    digest, span = onnx_digest(path)
    check_external_data_location(path, list(external_locations))
    record = {
        "scheme": SCHEME,
        "sha256": digest,
        "external": {loc: sha256_file(path.parent / loc) for loc in sorted(external_locations)},
    }
    data = json.loads(span.value)
    data.setdefault("extra", {})[INTEGRITY_KEY] = record
    new_entry = metadata_entry_bytes(json.dumps(data, sort_keys=True))
    with open(path, "r+b") as handle:
        handle.seek(span.end)
        tail = handle.read()
        handle.seek(span.start)
        handle.write(new_entry + tail)
        handle.truncate()
        handle.flush()
        os.fsync(handle.fileno())
    return record


# Files this process verified: their identity (see file_identity) -> (integrity record, metadata JSON hashed).
_verified: dict[tuple, tuple[Mapping[str, Any], str]] = {}
_verified_lock = threading.Lock()


def verified_before(key: tuple, parsed_value: str | None = None, same: Callable[[str, str], bool] = str.__eq__) -> Mapping[str, Any] | None:
    """The record of files already verified in this process under identity ``key``, or ``None``.

    Args:
        key: Identity of the files (tuples of :func:`file_identity`), unchanged since they were hashed.
        parsed_value: Metadata JSON a back end parsed, which must be ``same`` as the one hashed
            (default ``None``: no cross-check).
        same: How two metadata values compare (default: equal strings).
    """
    with _verified_lock:
        cached = _verified.get(key)
    if cached is None or (parsed_value is not None and not same(parsed_value, cached[1])):
        return None
    return cached[0]


def remember_verified(key: tuple, record: Mapping[str, Any], value: str) -> None:
    """Record that the files of identity ``key``, with metadata JSON ``value``, matched ``record``."""
    with _verified_lock:
        _verified[key] = (record, value)


def file_identity(path: Path) -> tuple:
    """What identifies a file's contents without reading it: real path, device, inode, size, mtime, ctime."""
    info = path.stat()
    return (os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def check_onnx(path: Path | str, parsed_value: str | None = None, use_cache: bool = True) -> Mapping[str, Any] | None:
    """Verify an ONNX artifact against the digest recorded in its metadata.

    Args:
        path: The ``.onnx`` artifact.
        parsed_value: The memexport metadata JSON as ONNX Runtime read it, to cross-check that the
            bytes hashed are the ones the runtime uses (default ``None``: no cross-check).
        use_cache: Skip re-hashing a file already verified in this process whose size, inode,
            mtime and ctime are unchanged (default ``True``).

    Returns:
        The integrity record, or ``None`` when there is nothing to check: an artifact exported
        without a record, or (with ``parsed_value=None``) no memexport entry at all, which the
        runner then reports when it reads the metadata.

    Raises:
        ArtifactError: The file or an external-data file does not match its recorded sha256, or
            its metadata entry cannot be found.
    """
    path = Path(path)
    try:
        key = file_identity(path) if use_cache else None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the artifact ({exc.strerror or exc}); check the path and permissions") from None
    cached = verified_before(key, parsed_value) if key is not None else None
    if cached is not None:
        return cached
    try:
        digest, span = onnx_digest(path)
    except MissingMetadataEntry:
        if parsed_value is None:
            return None
        raise
    if parsed_value is not None and parsed_value != span.value:
        raise ArtifactError(f"{path}: two different memexport metadata entries in one file (tampered?); re-export it")
    record = json.loads(span.value).get("extra", {}).get(INTEGRITY_KEY)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("scheme") != SCHEME:
        raise ArtifactError(f"{path}: unknown integrity scheme {record!r:.80}; re-export it with this memexport version")
    if digest != record["sha256"]:
        raise ArtifactError(
            f"{path}: sha256 {digest[:16]}... does not match the {record['sha256'][:16]}... recorded at export: "
            "the file was modified or corrupted after export; re-export it or restore the original"
        )
    external = record.get("external", {})
    if external:
        check_external_data_location(path, list(external))
        for location, expected in external.items():
            target = path.parent / location
            try:
                seen = sha256_file(target)
            except OSError as exc:
                raise ArtifactError(f"{target}: external data of {path.name} unreadable ({exc.strerror or exc}); keep it beside the model") from None
            if seen != expected:
                raise ArtifactError(
                    f"{target}: external data sha256 {seen[:16]}... does not match the {expected[:16]}... recorded in {path.name}: "
                    "modified or corrupted after export; re-export the model"
                )
    if key is not None:
        remember_verified(key, record, span.value)
    return record
