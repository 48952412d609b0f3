"""The gRPC codec without a server: ``raw_input_contents`` and tensor ``contents`` parse to the same request as
REST, every malformed request is a 400 (INVALID_ARGUMENT) naming the fix, and the answer is Triton's layout."""

from __future__ import annotations

import struct

import numpy as np
import pytest

pb = pytest.importorskip("tritonclient.grpc.service_pb2", reason="tritonclient[grpc] is not installed (serve extra)")

from memexport.serve.grpc.codec import details, infer_response, parse_request, status_code  # noqa: E402
from memexport.serve.v2 import RequestError  # noqa: E402

SHAPE = (3, 4, 4)


def request(name: str, datatype: str, shape: list[int], raw: bytes | None = None, **contents) -> "pb.ModelInferRequest":
    message = pb.ModelInferRequest(model_name="m", id="r1")
    tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    if raw is not None:
        message.raw_input_contents.append(raw)
    return message


def parse(message: "pb.ModelInferRequest", max_rows: int = 64):
    return parse_request(message, SHAPE, max_rows=max_rows)


def packed(blobs: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def test_pixels_raw_and_contents_agree():
    pixels = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
    raw = parse(request("pixels", "FP32", [2, *SHAPE], raw=pixels.astype("<f4").tobytes()))
    listed = parse(request("pixels", "FP32", [2, *SHAPE], fp32_contents=pixels.reshape(-1).tolist()))
    assert raw.input_name == listed.input_name == "pixels" and raw.request_id == "r1"
    np.testing.assert_array_equal(raw.rows, pixels)
    np.testing.assert_array_equal(listed.rows, pixels)


def test_image_raw_and_contents_agree():
    blobs = [b"\x89PNG first", b"\xff\xd8 second", b""]
    raw = parse(request("image", "BYTES", [3, 1], raw=packed(blobs)))
    listed = parse(request("image", "BYTES", [3, 1], bytes_contents=blobs))
    assert raw.rows == listed.rows == blobs


@pytest.mark.parametrize("build, fragment", [
    (lambda: request("pixels", "FP32", [1, *SHAPE], raw=b"\0" * 8), "needs 192 bytes of FP32"),
    (lambda: request("pixels", "FP32", [1, 3, 4, 5], raw=b"\0" * 240), "must have shape [N,3,4,4]"),
    (lambda: request("pixels", "FP32", [1, *SHAPE], fp32_contents=[float("nan")] * 48), "finite"),
    (lambda: request("pixels", "INT32", [1, *SHAPE], int_contents=[0] * 48), "must be FP32"),
    (lambda: request("pixels", "FP32", [1, *SHAPE], int_contents=[0] * 48), "send its values in fp32_contents or raw_input_contents, not int_contents"),
    (lambda: request("image", "BYTES", [1, 1], raw=packed([b"x"]), bytes_contents=[b"x"]), "both contents and raw_input_contents"),
    (lambda: request("image", "BYTES", [2, 1], raw=packed([b"x"])), "shape says 2 rows but 1 elements"),
    (lambda: request("image", "BYTES", [1, 1], raw=b"\x05\0\0\0ab"), "declares 5 bytes"),
    (lambda: request("image", "BYTES", [0, 1], raw=b""), "has no rows"),
    (lambda: request("photo", "BYTES", [1, 1], raw=packed([b"x"])), "unknown input 'photo'"),
    (lambda: pb.ModelInferRequest(model_name="m"), "expected exactly one input"),
])
def test_malformed_requests_are_400(build, fragment):
    with pytest.raises(RequestError) as caught:
        parse(build())
    assert caught.value.status == 400 and fragment in str(caught.value)
    assert status_code(caught.value) == "INVALID_ARGUMENT"


@pytest.mark.parametrize("build", [
    lambda: request("image", "BYTES", [1_000_000, 1], raw=packed([b"x"])),
    lambda: request("image", "BYTES", [5, 1], bytes_contents=[b"x"] * 5),
    lambda: request("pixels", "FP32", [5, *SHAPE], raw=b"\0" * 4),
])
def test_rows_past_max_rows_are_413_from_the_shape(build):
    """The REST row limit, in parse_header below both protocols: judged from the declared shape before any row is
    unpacked (a million declared rows with one sent is 413, not the 400 for a count that differs), RESOURCE_EXHAUSTED."""
    with pytest.raises(RequestError) as caught:
        parse(build(), max_rows=4)
    assert caught.value.status == 413 and "at most 4 per request (--max-rows)" in str(caught.value)
    assert status_code(caught.value) == "RESOURCE_EXHAUSTED"


def test_two_inputs_and_counts_of_raw_contents():
    message = request("image", "BYTES", [1, 1], raw=packed([b"x"]))
    message.inputs.add(name="pixels", datatype="FP32", shape=[1, *SHAPE])
    with pytest.raises(RequestError, match="raw_input_contents has 1 entries for 2 inputs"):
        parse(message)
    message.raw_input_contents.append(b"\0" * 192)
    with pytest.raises(RequestError, match="expected exactly one input"):
        parse(message)


def test_unknown_output_is_400():
    message = request("image", "BYTES", [1, 1], raw=packed([b"x"]))
    message.outputs.add(name="logits")
    with pytest.raises(RequestError, match="unknown output 'logits'"):
        parse(message)


def test_answer_is_raw_fp32_with_the_id():
    parsed = parse(request("image", "BYTES", [2, 1], raw=packed([b"a", b"b"])))
    answer = infer_response(pb, "m", parsed, np.array([[0.25], [0.5]], np.float32))
    assert (answer.model_name, answer.model_version, answer.id) == ("m", "1", "r1")
    assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [("score", "FP32", [2, 1])]
    assert np.frombuffer(answer.raw_output_contents[0], "<f4").tolist() == [0.25, 0.5]


def test_status_codes_and_details():
    codes = {status: status_code(RequestError(status, "x")) for status in (400, 401, 404, 413, 501, 503, 504, 500)}
    assert codes == {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
                     501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED", 500: "INTERNAL"}
    assert details(RequestError(400, "row 0: bad\nrow 2: bad")) == "row 0: bad\nrow 2: bad"  # one line per bad row, as REST
    assert details(RequestError(503, "busy\n now")) == "busy now"
