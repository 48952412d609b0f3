"""The V2 gRPC wire format as pure functions: ``ModelInferRequest`` in, ``ModelInferResponse`` out, errors as codes.

A request is turned into the REST form, a header dict plus the binary data after it, and parsed by
:func:`memexport.serve.v2.parse_header`, so both protocols obey one set of rules and one set of error lines.
An input's values come in ``raw_input_contents`` (what ``tritonclient.grpc`` sends: FP32 little-endian,
BYTES as 4-byte little-endian lengths each followed by the element, Triton's layout) or in the tensor's
``contents`` (``fp32_contents`` for ``pixels``, ``bytes_contents`` for ``image``), never both. ``score``
goes back in ``raw_output_contents``, as Triton answers.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

import numpy as np

from memexport.serve.v2 import SCORE, VERSION, InferRequest, RequestError, parse_header

# The HTTP status a RequestError carries -> the gRPC status code's name (grpc.StatusCode.<name>).
STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# Which contents field holds each datatype's values.
CONTENTS = {"FP32": "fp32_contents", "BYTES": "bytes_contents"}


def status_code(error: RequestError) -> str:
    """The name of the gRPC status code for ``error`` (``INTERNAL`` for a server fault)."""
    return STATUS_CODES.get(error.status, "INTERNAL")


def details(error: RequestError) -> str:
    """The error's text as REST sends it: one line, or for bad image rows one line per row."""
    return error.args[0] if error.status == 400 else str(error)


def parse_request(request: Any, input_shape: Sequence[int], *, max_rows: int) -> InferRequest:
    """A ``ModelInferRequest`` parsed by the REST rules (:func:`memexport.serve.v2.parse_header`), the row
    limit included.

    Raises:
        RequestError: 400 naming what is wrong and what was expected; 413 (``RESOURCE_EXHAUSTED``) past ``max_rows``.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input")
    inputs, blobs = [], []
    for index, tensor in enumerate(request.inputs):
        spec: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": [int(d) for d in tensor.shape]}
        data = _contents(tensor)
        if raw:
            if data is not None:
                raise RequestError(400, f"input {tensor.name!r} has both contents and raw_input_contents; send one of the two")
            data = raw[index]
        if data is not None:
            spec["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        inputs.append(spec)
    header: dict[str, Any] = {"inputs": inputs, "outputs": [{"name": output.name} for output in request.outputs]}
    if request.id:
        header["id"] = request.id
    return parse_header(header, b"".join(blobs), input_shape, max_rows=max_rows)


def _contents(tensor: Any) -> bytes | None:
    """The tensor's ``contents`` in the raw layout, or ``None`` when it has none (or a datatype this server never takes)."""
    fields = tensor.contents.ListFields()
    if not fields:
        return None
    expected = CONTENTS.get(tensor.datatype)
    if expected is None:
        return None  # the datatype itself is refused by parse_header, with the expected one named
    if len(fields) > 1 or fields[0][0].name != expected:
        sent = ", ".join(field.name for field, _ in fields)
        raise RequestError(400, f"input {tensor.name!r} is {tensor.datatype}: send its values in {expected} or raw_input_contents, not {sent}")
    values = fields[0][1]
    if expected == "bytes_contents":
        return b"".join(struct.pack("<I", len(value)) + value for value in values)
    return np.fromiter(values, dtype="<f4", count=len(values)).tobytes()


def infer_response(pb: Any, model: str, request: InferRequest, scores: np.ndarray) -> Any:
    """The ``ModelInferResponse``: ``score`` FP32 ``[N, 1]`` in ``raw_output_contents``, the request's ``id`` echoed."""
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    response = pb.ModelInferResponse(model_name=model, model_version=VERSION, id=request.request_id or "")
    response.outputs.add(name=SCORE, datatype="FP32", shape=[len(scores), 1])
    response.raw_output_contents.append(scores.astype("<f4").tobytes())
    return response
