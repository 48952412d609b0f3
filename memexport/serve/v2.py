"""The KServe V2 (Open Inference Protocol) REST subset ``memexport serve`` speaks, as pure functions.

Bodies in, bodies out, no web framework: the server (:mod:`memexport.serve.app`) only moves bytes.
JSON tensors and the binary tensor data extension are both read (``Inference-Header-Content-Length``
splits the JSON header from the raw tensors; ``binary_data_size`` sizes each input), whatever the
Content-Type says, so ``tritonclient.http`` works unchanged. The model takes one input per request:

* ``image``: BYTES ``[N, 1]``, one encoded image file per row (binary: each element is a 4-byte
  little-endian length then the bytes, as Triton lays out BYTES);
* ``pixels``: FP32 ``[N, *input_shape]``, already preprocessed;

and answers ``score``: FP32 ``[N, 1]``, as JSON ``data`` or binary (``binary_data`` on the output,
or ``binary_data_output`` on the request).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from memexport.core.errors import MemexportError

VERSION = "1"
IMAGE, PIXELS, SCORE = "image", "pixels", "score"
HEADER_LENGTH = "inference-header-content-length"


class RequestError(MemexportError):
    """A request the server answers with an HTTP error status and ``{"error": message}``.

    Attributes:
        status: The HTTP status (400 bad input, 404 unknown model, 413 too large, 503 busy, ...).
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class InferRequest:
    """One parsed ``infer`` request.

    Attributes:
        input_name: ``image`` or ``pixels``.
        rows: For ``image``, one ``bytes`` per row; for ``pixels``, the FP32 batch.
        request_id: The client's ``id``, echoed in the answer (``None`` when absent).
        binary_output: Whether ``score`` goes back as binary data.
    """

    input_name: str
    rows: Any
    request_id: str | None
    binary_output: bool

    @property
    def count(self) -> int:
        return len(self.rows)


def server_metadata(version: str) -> dict[str, Any]:
    """``GET /v2``."""
    return {"name": "memexport", "version": version, "extensions": ["binary_tensor_data"]}


def model_metadata(model: str, platform: str, input_shape: Sequence[int], properties: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``GET /v2/models/{model}``: the interface shared with the Triton repository.

    ``properties`` (strings, as the Open Inference Protocol's ``metadata_model_response`` allows) say which
    model and precision answer and what the score means.
    """
    answer: dict[str, Any] = {
        "name": model,
        "versions": [VERSION],
        "platform": platform,
        "inputs": [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1, 1]},
            {"name": PIXELS, "datatype": "FP32", "shape": [-1, *input_shape]},
        ],
        "outputs": [{"name": SCORE, "datatype": "FP32", "shape": [-1, 1]}],
    }
    if properties:
        answer["properties"] = {key: str(value) for key, value in properties.items()}
    return answer


def check_version(version: str | None) -> None:
    """Only version ``1`` exists; the ``/versions/{v}/`` forms name it or 404."""
    if version is not None and version != VERSION:
        raise RequestError(404, f"model version {version!r} not found; this server has version {VERSION}")


def parse_infer(body: bytes, header_length: str | None, input_shape: Sequence[int]) -> InferRequest:
    """Parse an ``infer`` body (JSON, or JSON header + binary tensors).

    Args:
        body: The whole request body.
        header_length: The ``Inference-Header-Content-Length`` header, if sent.
        input_shape: The model's per-image input shape (for ``pixels``).

    Raises:
        RequestError: 400 naming what is wrong and what was expected.
    """
    header, binary = _split(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"expected exactly one input, {IMAGE!r} (BYTES [N,1]) or {PIXELS!r} (FP32 [N,{','.join(map(str, input_shape))}])")
    spec = inputs[0]
    name = spec.get("name")
    if name == IMAGE:
        rows: Any = _image_rows(spec, binary)
    elif name == PIXELS:
        rows = _pixel_rows(spec, binary, tuple(input_shape))
    else:
        raise RequestError(400, f"unknown input {name!r}; expected {IMAGE!r} or {PIXELS!r}")
    if len(rows) == 0:
        raise RequestError(400, f"input {name!r} has no rows; send at least one")
    request_id = header.get("id")
    return InferRequest(name, rows, None if request_id is None else str(request_id), _binary_output(header))


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary part after it."""
    if header_length is None:
        size = len(body)
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not a length within the {len(body)}-byte body")
    try:
        header = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request header is not valid JSON ({' '.join(str(exc).split())[:120]}); send a V2 inference request") from None
    if not isinstance(header, dict):
        raise RequestError(400, "request header must be a JSON object with an 'inputs' list")
    return header, body[size:]


def _shape(spec: dict[str, Any]) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(400, f"input {spec.get('name')!r}: shape must be a list of non-negative integers, got {shape!r}")
    return shape


def _binary_size(spec: dict[str, Any]) -> int | None:
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise RequestError(400, f"input {spec.get('name')!r}: binary_data_size must be a non-negative integer, got {size!r}")
    return size


def _take(spec: dict[str, Any], binary: bytes) -> bytes | None:
    """The input's binary bytes, or ``None`` when it is sent as JSON ``data``; the whole binary part must be used."""
    size = _binary_size(spec)
    if size is None:
        if binary:
            raise RequestError(400, f"{len(binary)} binary bytes follow the header but input {spec.get('name')!r} has no binary_data_size")
        return None
    if size != len(binary):
        raise RequestError(400, f"input {spec.get('name')!r}: binary_data_size is {size} but {len(binary)} bytes follow the header")
    return binary


def _image_rows(spec: dict[str, Any], binary: bytes) -> list[bytes]:
    if spec.get("datatype") != "BYTES":
        raise RequestError(400, f"input {IMAGE!r} must be BYTES, got {spec.get('datatype')!r}")
    shape = _shape(spec)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise RequestError(400, f"input {IMAGE!r} must have shape [N,1] (one encoded image per row), got {shape}")
    raw = _take(spec, binary)
    rows = _unpack_bytes(raw) if raw is not None else _json_bytes(spec.get("data"))
    if len(rows) != shape[0]:
        raise RequestError(400, f"input {IMAGE!r}: shape says {shape[0]} rows but {len(rows)} elements were sent")
    return rows


def _unpack_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES layout: each element a 4-byte little-endian length, then that many bytes."""
    rows, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise RequestError(400, f"input {IMAGE!r}: binary data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise RequestError(400, f"input {IMAGE!r}: element {len(rows)} declares {length} bytes but only {len(raw) - offset} remain")
        rows.append(raw[offset : offset + length])
        offset += length
    return rows


def _json_bytes(data: Any) -> list[bytes]:
    """BYTES as JSON: a (possibly nested) list of strings, taken as UTF-8."""
    flat = np.asarray(data if data is not None else [], dtype=object).reshape(-1).tolist()
    if not all(isinstance(item, str) for item in flat):
        raise RequestError(400, f"input {IMAGE!r}: JSON data must be strings; send images as binary data (binary_data=True)")
    return [item.encode("utf-8") for item in flat]


def _pixel_rows(spec: dict[str, Any], binary: bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    if spec.get("datatype") != "FP32":
        raise RequestError(400, f"input {PIXELS!r} must be FP32, got {spec.get('datatype')!r}")
    shape = _shape(spec)
    if len(shape) != 1 + len(input_shape) or tuple(shape[1:]) != input_shape:
        raise RequestError(400, f"input {PIXELS!r} must have shape [N,{','.join(map(str, input_shape))}], got {shape}")
    raw = _take(spec, binary)
    expected = int(np.prod(shape))
    if raw is not None:
        if len(raw) != 4 * expected:
            raise RequestError(400, f"input {PIXELS!r}: shape {shape} needs {4 * expected} bytes of FP32, got {len(raw)}")
        array = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            array = np.asarray(spec.get("data"), dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise RequestError(400, f"input {PIXELS!r}: JSON data must be numbers") from None
        if array.size != expected:
            raise RequestError(400, f"input {PIXELS!r}: shape {shape} needs {expected} numbers, got {array.size}")
    array = array.astype(np.float32).reshape(shape)
    if not np.isfinite(array).all():
        raise RequestError(400, f"input {PIXELS!r}: values must be finite (no NaN or infinity)")
    return array


def _binary_output(header: dict[str, Any]) -> bool:
    """Binary ``score`` when the output asks for it, else the request-wide ``binary_data_output``."""
    for output in header.get("outputs") or []:
        if isinstance(output, dict) and output.get("name") == SCORE:
            binary = (output.get("parameters") or {}).get("binary_data")
            if binary is not None:
                return bool(binary)
        elif isinstance(output, dict):
            raise RequestError(400, f"unknown output {output.get('name')!r}; this model has {SCORE!r}")
    return bool((header.get("parameters") or {}).get("binary_data_output", False))


def infer_response(model: str, request: InferRequest, scores: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The ``infer`` answer's body and headers (``Inference-Header-Content-Length`` for binary output)."""
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    output: dict[str, Any] = {"name": SCORE, "datatype": "FP32", "shape": [len(scores), 1]}
    payload = b""
    if request.binary_output:
        payload = scores.astype("<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(payload)}
    else:
        output["data"] = scores.tolist()
    header: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": [output]}
    if request.request_id is not None:
        header["id"] = request.request_id
    text = json.dumps(header).encode()
    if not payload:
        return text, {"content-type": "application/json"}
    return text + payload, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(text))}
