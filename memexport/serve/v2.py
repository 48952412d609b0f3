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
import re
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from memexport.core.errors import MemexportError

VERSION = "1"
IMAGE, PIXELS, SCORE = "image", "pixels", "score"
HEADER_LENGTH = "inference-header-content-length"
# A V2 request nests a few levels (pixels sent as nested lists: 7); far deeper is an attack on the parser.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


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
    return {"name": "memexport", "version": version, "extensions": ["binary_tensor_data", "model_configuration", "statistics"]}


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


def parse_infer(body: bytes, header_length: str | None, input_shape: Sequence[int], *, max_rows: int) -> InferRequest:
    """Parse an ``infer`` body (JSON, or JSON header + binary tensors).

    Nothing is unpacked before the header's own ``shape`` has been checked against ``max_rows``, so a
    small request cannot declare a million rows and have them built.

    Args:
        body: The whole request body (already inflated).
        header_length: The ``Inference-Header-Content-Length`` header, if sent.
        input_shape: The model's per-image input shape (for ``pixels``).
        max_rows: Rows one request may carry (``--max-rows``).

    Raises:
        RequestError: 400 naming what is wrong and what was expected; 413 past ``max_rows``.
    """
    header, binary = _split(body, header_length)
    return parse_header(header, binary, input_shape, max_rows=max_rows)


def parse_header(header: dict[str, Any], binary: bytes, input_shape: Sequence[int], *, max_rows: int) -> InferRequest:
    """Parse a request's JSON header and the binary data after it (gRPC requests come here as the same pair).

    The row limit lives here, below both protocols: the input's ``shape`` is checked against ``max_rows``
    before any row is unpacked, for REST and gRPC alike.

    Raises:
        RequestError: 400 naming what is wrong and what was expected; 413 past ``max_rows``.
    """
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"expected exactly one input, {IMAGE!r} (BYTES [N,1]) or {PIXELS!r} (FP32 [N,{','.join(map(str, input_shape))}])")
    spec = inputs[0]
    name = spec.get("name")
    if name == IMAGE:
        rows: Any = _image_rows(spec, binary, max_rows)
    elif name == PIXELS:
        rows = _pixel_rows(spec, binary, tuple(input_shape), max_rows)
    else:
        raise RequestError(400, f"unknown input {quoted(name)}; expected {IMAGE!r} or {PIXELS!r}")
    if len(rows) == 0:
        raise RequestError(400, f"input {name!r} has no rows; send at least one")
    return InferRequest(name, rows, _request_id(header), _binary_output(header))


def quoted(value: Any, limit: int = 60) -> str:
    """``repr`` of a request-supplied value, cut short: an error line quotes, it never echoes a body back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def json_depth(text: bytes) -> int:
    """How deeply ``text``'s arrays and objects nest, counted without parsing (strings skipped), so JSON
    nested far too deep is refused before the parser recurses into it."""
    outside = _JSON_STRING.sub(b'""', text).translate(None, _NOT_BRACKET)
    if not outside:
        return 0
    steps = np.frombuffer(outside, np.uint8)
    return int(np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)).max())


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
            raise RequestError(400, f"Inference-Header-Content-Length {quoted(header_length)} is not a length within the {len(body)}-byte body")
    depth = json_depth(body[:size])
    if depth > MAX_JSON_DEPTH:
        raise RequestError(400, f"request header nests {depth} levels deep; a V2 request needs a few, this server reads at most {MAX_JSON_DEPTH}")
    try:
        header = json.loads(body[:size])
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RequestError(400, f"request header is not valid JSON ({' '.join(str(exc).split())[:120]}); send a V2 inference request") from None
    if not isinstance(header, dict):
        raise RequestError(400, "request header must be a JSON object with an 'inputs' list")
    return header, body[size:]


def _object(value: Any, where: str) -> dict[str, Any]:
    """A ``parameters`` object (absent: empty); anything else is a 400 naming where it was."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(400, f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _flag(value: Any, where: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise RequestError(400, f"{where} must be true or false, got {quoted(value)}")
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _request_id(header: dict[str, Any]) -> str | None:
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, f"'id' must be a string, got {type(request_id).__name__}")
    return request_id


def _shape(spec: dict[str, Any], max_rows: int) -> list[int]:
    """The input's ``shape``, its row count checked against ``max_rows`` before anything is unpacked."""
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(_is_count(d) for d in shape):
        raise RequestError(400, f"input {quoted(spec.get('name'))}: shape must be a list of non-negative integers, got {quoted(shape)}")
    if shape[0] > max_rows:
        raise RequestError(413, f"input {quoted(spec.get('name'))} has {shape[0]} rows; this server takes at most {max_rows} per request "
                                "(--max-rows): split it into smaller requests")
    return shape


def _binary_size(spec: dict[str, Any]) -> int | None:
    size = _object(spec.get("parameters"), f"input {quoted(spec.get('name'))}: parameters").get("binary_data_size")
    if size is not None and not _is_count(size):
        raise RequestError(400, f"input {quoted(spec.get('name'))}: binary_data_size must be a non-negative integer, got {quoted(size)}")
    return size


def _take(spec: dict[str, Any], binary: bytes) -> bytes | None:
    """The input's binary bytes, or ``None`` when it is sent as JSON ``data``; the whole binary part must be used."""
    size = _binary_size(spec)
    if size is None:
        if binary:
            raise RequestError(400, f"{len(binary)} binary bytes follow the header but input {quoted(spec.get('name'))} has no binary_data_size")
        return None
    if size != len(binary):
        raise RequestError(400, f"input {quoted(spec.get('name'))}: binary_data_size is {size} but {len(binary)} bytes follow the header")
    return binary


def _image_rows(spec: dict[str, Any], binary: bytes, max_rows: int) -> list[bytes]:
    if spec.get("datatype") != "BYTES":
        raise RequestError(400, f"input {IMAGE!r} must be BYTES, got {quoted(spec.get('datatype'))}")
    shape = _shape(spec, max_rows)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise RequestError(400, f"input {IMAGE!r} must have shape [N,1] (one encoded image per row), got {quoted(shape)}")
    raw = _take(spec, binary)
    rows = _unpack_bytes(raw, shape[0]) if raw is not None else _json_bytes(spec.get("data"))
    if len(rows) != shape[0]:
        raise RequestError(400, f"input {IMAGE!r}: shape says {shape[0]} rows but {len(rows)} elements were sent")
    return rows


def _unpack_bytes(raw: bytes, count: int) -> list[bytes]:
    """Triton's BYTES layout: each element a 4-byte little-endian length, then that many bytes; at most ``count``
    elements are taken (more is the 400 the caller gives for a count that differs from the shape)."""
    rows, offset = [], 0
    while offset < len(raw) and len(rows) <= count:
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
    flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else [] if data is None else [data]
    if not all(isinstance(item, str) for item in flat):
        raise RequestError(400, f"input {IMAGE!r}: JSON data must be strings; send images as binary data (binary_data=True)")
    try:
        return [item.encode("utf-8") for item in flat]
    except UnicodeEncodeError:
        raise RequestError(400, f"input {IMAGE!r}: JSON data holds text that is not valid UTF-8; send images as binary data") from None


def _pixel_rows(spec: dict[str, Any], binary: bytes, input_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    if spec.get("datatype") != "FP32":
        raise RequestError(400, f"input {PIXELS!r} must be FP32, got {quoted(spec.get('datatype'))}")
    shape = _shape(spec, max_rows)
    if len(shape) != 1 + len(input_shape) or tuple(shape[1:]) != input_shape:
        raise RequestError(400, f"input {PIXELS!r} must have shape [N,{','.join(map(str, input_shape))}], got {quoted(shape)}")
    raw = _take(spec, binary)
    expected = int(np.prod(shape))
    if raw is not None:
        if len(raw) != 4 * expected:
            raise RequestError(400, f"input {PIXELS!r}: shape {shape} needs {4 * expected} bytes of FP32, got {len(raw)}")
        array = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            array = np.asarray(spec.get("data"), dtype=np.float32).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise RequestError(400, f"input {PIXELS!r}: JSON data must be numbers") from None
        if array.size != expected:
            raise RequestError(400, f"input {PIXELS!r}: shape {shape} needs {expected} numbers, got {array.size}")
    array = array.astype(np.float32).reshape(shape)
    if not np.isfinite(array).all():
        raise RequestError(400, f"input {PIXELS!r}: values must be finite (no NaN or infinity)")
    return array


def _binary_output(header: dict[str, Any]) -> bool:
    """Binary ``score`` when the output asks for it, else the request-wide ``binary_data_output``."""
    outputs = header.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise RequestError(400, f"'outputs' must be a list of objects, got {type(outputs).__name__}")
    for output in outputs or []:
        if not isinstance(output, dict):
            raise RequestError(400, f"each of 'outputs' must be an object, got {type(output).__name__}")
        if output.get("name") != SCORE:
            raise RequestError(400, f"unknown output {quoted(output.get('name'))}; this model has {SCORE!r}")
        binary = _flag(_object(output.get("parameters"), "output 'score': parameters").get("binary_data"), "output 'score': binary_data")
        if binary is not None:
            return binary
    request = _object(header.get("parameters"), "request parameters")
    return bool(_flag(request.get("binary_data_output"), "request parameters: binary_data_output"))


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
