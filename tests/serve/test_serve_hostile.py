"""The hostile-request suite: one ``memexport serve`` (tiny scorer, a token, small limits) on 127.0.0.1 takes
every kind of request an attacker or a broken client sends. Every answer is a 4xx with an error body (one
short line per problem; uvicorn's own refusals of broken HTTP are plain text), nothing is a 5xx, a valid
request scores correctly after each, and the server's peak RSS (``VmHWM`` in ``/proc/<pid>/status``) stays
within :data:`RSS_BOUND_MB` of its RSS once ready.

Kinds: the token (401, answered before any of the body is read), sizes (413: declared, chunked, inflated,
rows in the header), encodings (415, bad gzip/deflate 400), JSON depth and types (400), protocol fields
(400), routing (404/405), multipart (400/413), slow clients (408 at the deadline, holding no slot) and
broken HTTP (400 from uvicorn). docs/serving.md lists them.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")

from memexport.runtime.predictor import Predictor  # noqa: E402
from memexport.serve.options import ServeOptions  # noqa: E402
from tests.runtime.hostile_images import png_declaring  # noqa: E402
from tests.serve.server import ROOT, RawAnswer, Server, image_request, multipart, request_head  # noqa: E402

MODEL = "tiny-scorer"
TOKEN = "s3cret-hostile-7f"
MAX_BODY_MB, MAX_ROWS, MAX_BATCH, MAX_QUEUE, TIMEOUT_S = 2, 16, 4, 8, 3
CAP = MAX_BODY_MB * 1024 * 1024
INFER = f"/v2/models/{MODEL}/infer"
# Peak RSS over the whole suite, above the RSS once ready and warm (measured: +38 MB on 116 MB). The most an
# accepted request holds here: a 2 MiB body about three times (read, joined, split into rows) and 4 decoded
# rows of 0.6 MB, plus the decoding threads' allocator arenas. The old server decoded every row of a request
# at once (the 1,500 one-pixel PNGs: about 900 MB).
RSS_BOUND_MB = 80


@pytest.fixture(scope="module")
def server(tiny: Path):
    running = Server(tiny, "--token", TOKEN, "--max-body-mb", str(MAX_BODY_MB), "--max-rows", str(MAX_ROWS), "--max-batch-size",
                     str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--timeout", str(TIMEOUT_S), "--max-delay-ms", "1")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def baseline_mb(server, sample_images) -> float:
    for _ in range(3):
        valid(server, sample_images[0])
    return status_mb(server, "VmRSS")


@pytest.fixture(scope="module")
def expected(tiny, sample_images) -> float:
    with Predictor(tiny) as predictor:
        return float(predictor.score(sample_images[:1])[0])


def status_mb(server: Server, key: str) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{server.process.pid}/status")


# --- building requests ------------------------------------------------------------------------------


def head(path: str = INFER, method: str = "POST", auth: str | None = f"Bearer {TOKEN}", **headers: str) -> dict[str, str]:
    out = {"Authorization": auth} if auth is not None else {}
    return {**out, **{k.replace("_", "-"): v for k, v in headers.items()}}


def send(server: Server, body: bytes = b"", path: str = INFER, method: str = "POST", length: bool = True, **headers: str) -> RawAnswer:
    fields = head(path, method, **headers)
    if length and "Transfer-Encoding" not in fields:
        fields["Content-Length"] = str(len(body))
    return server.raw(request_head(method, path, fields), body)


def header_only(server: Server, header: object) -> RawAnswer:
    return send(server, json.dumps(header).encode())


def send_images(server: Server, blobs: list[bytes], shape: list | None = None, **headers: str) -> RawAnswer:
    body, length = image_request(blobs, shape)
    return send(server, body, Inference_Header_Content_Length=length, **headers)


def pixel_input(**spec: object) -> dict:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 227, 227], **spec}]}


def image_input(**spec: object) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": ["x"], **spec}]}


def zeros_compressed(size: int, wbits: int) -> bytes:
    """``size`` zero bytes compressed (a 1000:1 bomb), built in pieces."""
    packer, zero = zlib.compressobj(9, zlib.DEFLATED, wbits), bytes(1 << 20)
    return b"".join(packer.compress(zero) for _ in range(size >> 20)) + packer.flush()


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def chunked(server: Server, pieces: list[bytes], **headers: str) -> RawAnswer:
    body = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    return send(server, body, length=False, Transfer_Encoding="chunked", **headers)


def slow(server: Server, declared: int = 100, path: str = INFER) -> RawAnswer:
    """Declare a body, send one byte of it, wait for the server's answer."""
    return server.raw(request_head("POST", path, {**head(path), "Content-Length": str(declared)}), b"{", timeout=TIMEOUT_S + 30)


def slowloris(server: Server, sample: Path) -> list[RawAnswer]:
    """Twice --max-queue connections each holding a one-byte body; a valid request meanwhile is answered at once."""
    answers: list[RawAnswer] = []
    threads = [threading.Thread(target=lambda: answers.append(slow(server))) for _ in range(2 * MAX_QUEUE)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert valid(server, sample) and time.monotonic() - started < TIMEOUT_S  # no slot held by the slow ones
    for thread in threads:
        thread.join(TIMEOUT_S + 30)
    return answers


def raw_http(server: Server, data: bytes) -> RawAnswer:
    return server.raw(data, b"")


def nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


# name -> (the request, the statuses it may get). Each builds real bytes and sends them.
Case = Callable[[Server, list[Path], Path], "RawAnswer | list[RawAnswer]"]
CASES: dict[str, tuple[Case, tuple[int, ...]]] = {
    # access: refused before any of the body is read
    "no token": (lambda s, i, d: send(s, b"{}", auth=None), (401,)),
    "wrong token": (lambda s, i, d: send(s, b"{}", auth="Bearer nope"), (401,)),
    "basic scheme": (lambda s, i, d: send(s, b"{}", auth="Basic czNjcmV0"), (401,)),
    "bearer without token": (lambda s, i, d: send(s, b"{}", auth="Bearer"), (401,)),
    "token prefix": (lambda s, i, d: send(s, b"{}", auth=f"Bearer {TOKEN[:-1]}"), (401,)),
    "token plus more": (lambda s, i, d: send(s, b"{}", auth=f"Bearer {TOKEN}x"), (401,)),
    "latin-1 token": (lambda s, i, d: s.raw(request_head("POST", INFER, {"Content-Length": "2"}).replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"), b"{}"), (401,)),
    "no token, 100-continue, huge": (lambda s, i, d: s.raw(request_head("POST", INFER, {"Expect": "100-continue", "Content-Length": str(50 * CAP)})), (401,)),
    # sizes
    "declared over the cap, 100-continue": (lambda s, i, d: s.raw(request_head("POST", INFER, {**head(), "Expect": "100-continue", "Content-Length": str(CAP + 1)})), (413,)),
    "chunked over the cap": (lambda s, i, d: chunked(s, [b"x" * (1 << 20)] * (MAX_BODY_MB + 1)), (413,)),
    "gzip bomb": (lambda s, i, d: send(s, zeros_compressed(256 << 20, 16 + zlib.MAX_WBITS), Content_Encoding="gzip"), (413,)),
    "deflate bomb": (lambda s, i, d: send(s, zeros_compressed(256 << 20, zlib.MAX_WBITS), Content_Encoding="deflate"), (413,)),
    "1500 one-pixel PNGs": (lambda s, i, d: send_images(s, [tiny_png()] * 1500), (413,)),
    "rows over the limit, JSON": (lambda s, i, d: header_only(s, image_input(shape=[MAX_ROWS + 1, 1], data=["x"] * (MAX_ROWS + 1))), (413,)),
    "pixel rows over the limit": (lambda s, i, d: header_only(s, pixel_input(shape=[MAX_ROWS + 1, 3, 227, 227])), (413,)),
    "a trillion rows declared": (lambda s, i, d: header_only(s, image_input(shape=[10**12, 1])), (413,)),
    "score: files over the limit": (lambda s, i, d: send_multipart(s, [(f"{n}.png", tiny_png()) for n in range(MAX_ROWS + 1)]), (413,)),
    "one row declared, 5000 sent": (lambda s, i, d: send_images(s, [b"x"] * 5000, shape=[1, 1]), (400,)),
    # encodings
    "brotli": (lambda s, i, d: send(s, b"{}", Content_Encoding="br"), (415,)),
    "gzip twice": (lambda s, i, d: send(s, gzip.compress(gzip.compress(b"{}")), Content_Encoding="gzip, gzip"), (415,)),
    "compress": (lambda s, i, d: send(s, b"{}", Content_Encoding="compress"), (415,)),
    "truncated gzip": (lambda s, i, d: send(s, gzip.compress(b'{"inputs": []}' * 50)[:-12], Content_Encoding="gzip"), (400,)),
    "not gzip": (lambda s, i, d: send(s, b'{"inputs": []}', Content_Encoding="gzip"), (400,)),
    "gzip with trailing bytes": (lambda s, i, d: send(s, gzip.compress(b"{}") + b"junk", Content_Encoding="gzip"), (400,)),
    "not deflate": (lambda s, i, d: send(s, b"\xff" * 64, Content_Encoding="deflate"), (400,)),
    "gzip of nonsense": (lambda s, i, d: send(s, gzip.compress(b"\x00not json"), Content_Encoding="gzip"), (400,)),
    # JSON depth and types
    "nested 100,000 deep": (lambda s, i, d: send(s, nested(100_000)), (400,)),
    "nested 40 deep": (lambda s, i, d: send(s, nested(40)), (400,)),
    "brackets inside a string, no inputs": (lambda s, i, d: header_only(s, {"id": "[" * 5000, "inputs": []}), (400,)),
    "not JSON": (lambda s, i, d: send(s, b"{not json"), (400,)),
    "JSON array": (lambda s, i, d: send(s, b"[1, 2]"), (400,)),
    "invalid UTF-8": (lambda s, i, d: send(s, b'{"inputs": "\xff\xfe"}'), (400,)),
    "no inputs": (lambda s, i, d: header_only(s, {}), (400,)),
    "inputs a string": (lambda s, i, d: header_only(s, {"inputs": "image"}), (400,)),
    "inputs an object": (lambda s, i, d: header_only(s, {"inputs": {"name": "image"}}), (400,)),
    "two inputs": (lambda s, i, d: header_only(s, {"inputs": image_input()["inputs"] * 2}), (400,)),
    "input a number": (lambda s, i, d: header_only(s, {"inputs": [7]}), (400,)),
    "request parameters a list": (lambda s, i, d: header_only(s, {**image_input(), "parameters": [1]}), (400,)),
    "request parameters a string": (lambda s, i, d: header_only(s, {**image_input(), "parameters": "binary"}), (400,)),
    "input parameters a list": (lambda s, i, d: header_only(s, image_input(parameters=[1])), (400,)),
    "input parameters a string": (lambda s, i, d: header_only(s, image_input(parameters="x")), (400,)),
    "output parameters a list": (lambda s, i, d: header_only(s, {**image_input(), "outputs": [{"name": "score", "parameters": [1]}]}), (400,)),
    "outputs a number": (lambda s, i, d: header_only(s, {**image_input(), "outputs": 3}), (400,)),
    "outputs strings": (lambda s, i, d: header_only(s, {**image_input(), "outputs": ["score"]}), (400,)),
    "unknown output": (lambda s, i, d: header_only(s, {**image_input(), "outputs": [{"name": "logits"}]}), (400,)),
    "binary_data a string": (lambda s, i, d: header_only(s, {**image_input(), "outputs": [{"name": "score", "parameters": {"binary_data": "yes"}}]}), (400,)),
    "binary_data_output a number": (lambda s, i, d: header_only(s, {**image_input(), "parameters": {"binary_data_output": 2}}), (400,)),
    "id an object": (lambda s, i, d: header_only(s, {**image_input(), "id": {"a": 1}}), (400,)),
    "shape a string": (lambda s, i, d: header_only(s, image_input(shape="1,1")), (400,)),
    "shape negative": (lambda s, i, d: header_only(s, image_input(shape=[-1, 1])), (400,)),
    "shape of booleans": (lambda s, i, d: header_only(s, image_input(shape=[True, True])), (400,)),
    "shape of floats": (lambda s, i, d: header_only(s, image_input(shape=[1.0, 1])), (400,)),
    "image as FP32": (lambda s, i, d: header_only(s, image_input(datatype="FP32")), (400,)),
    "a 100 kB input name": (lambda s, i, d: header_only(s, {"inputs": [{"name": "n" * 100_000, "datatype": "BYTES", "shape": [1, 1]}]}), (400,)),
    "pixels as strings": (lambda s, i, d: header_only(s, pixel_input(data=["a"] * 154587)), (400,)),
    "pixels NaN": (lambda s, i, d: send(s, json.dumps(pixel_input(data=[float("nan")] * 154587)).encode()), (400,)),
    "pixels too few": (lambda s, i, d: header_only(s, pixel_input(data=[0.5] * 10)), (400,)),
    "image data numbers": (lambda s, i, d: header_only(s, image_input(data=[1])), (400,)),
    "image data a lone surrogate": (lambda s, i, d: send(s, b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": ["\\ud800"]}]}'), (400,)),
    "header length past the body": (lambda s, i, d: send(s, b"{}", Inference_Header_Content_Length="99999999999999999999"), (400,)),
    "header length negative": (lambda s, i, d: send(s, b"{}", Inference_Header_Content_Length="-2"), (400,)),
    "header length not a number": (lambda s, i, d: send(s, b"{}", Inference_Header_Content_Length="two"), (400,)),
    "binary_data_size off": (lambda s, i, d: send(s, image_request([b"abc"])[0] + b"x", Inference_Header_Content_Length=image_request([b"abc"])[1]), (400,)),
    "element overruns": (lambda s, i, d: send_raw_binary(s, struct.pack("<I", 1000) + b"abc"), (400,)),
    "binary ends inside a length": (lambda s, i, d: send_raw_binary(s, b"\x01\x00"), (400,)),
    "binary without binary_data_size": (lambda s, i, d: send(s, b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1]}]}xyz',
                                                              Inference_Header_Content_Length="70"), (400,)),
    "empty body": (lambda s, i, d: send(s, b""), (400,)),
    "no rows": (lambda s, i, d: header_only(s, image_input(shape=[0, 1], data=[])), (400,)),
    "rows that are not images": (lambda s, i, d: send_images(s, [b"%PDF-1.4", b"", (d / "china.jpg").read_bytes()[:300]]), (400,)),
    "decompression-bomb PNG": (lambda s, i, d: send_images(s, [png_declaring(40_000, 40_000)]), (400,)),
    # routing
    "unknown model": (lambda s, i, d: send(s, b"{}", path="/v2/models/resmem/infer"), (404,)),
    "unknown version": (lambda s, i, d: send(s, b"{}", path=f"/v2/models/{MODEL}/versions/2/infer"), (404,)),
    "GET on infer": (lambda s, i, d: send(s, method="GET"), (405,)),
    "path traversal": (lambda s, i, d: send(s, method="GET", path="/v2/models/../../etc/passwd"), (404,)),
    "a 10 kB model name": (lambda s, i, d: send(s, method="GET", path="/v2/models/" + "m" * 10_000), (404,)),
    # /score
    "score: not multipart": (lambda s, i, d: send(s, b"x", path="/score", Content_Type="text/plain"), (400,)),
    "score: no files": (lambda s, i, d: send_multipart(s, [], fields=[("note", b"hi")]), (400,)),
    "score: no boundary": (lambda s, i, d: send(s, b"--x\r\n\r\n", path="/score", Content_Type="multipart/form-data"), (400,)),
    "score: fields over the limit": (lambda s, i, d: send_multipart(s, [], fields=[(f"f{n}", b"v") for n in range(MAX_ROWS + 1)]), (400, 413)),
    # slow clients and broken HTTP
    "slow body": (lambda s, i, d: slow(s), (408,)),
    "slowloris": (lambda s, i, d: slowloris(s, i[0]), (408,)),
    "garbage request line": (lambda s, i, d: raw_http(s, b"\x16\x03\x01\x02\x00 hello\r\n\r\n"), (400,)),
    "content-length not a number": (lambda s, i, d: raw_http(s, request_head("POST", INFER, {**head(), "Content-Length": "abc"})), (400,)),
}


def send_multipart(server: Server, files: list[tuple[str, bytes]], fields: list[tuple[str, bytes]] = ()) -> RawAnswer:
    body, content_type = multipart(files)
    extra = b"".join(f'--memexport-test-boundary-7d1f\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
                     for name, value in fields)
    return send(server, extra + body, path="/score", Content_Type=content_type)


def send_raw_binary(server: Server, binary: bytes) -> RawAnswer:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(binary)}}]}).encode()
    return send(server, header + binary, Inference_Header_Content_Length=str(len(header)))


def valid(server: Server, image: Path) -> float:
    answer = send_images(server, [image.read_bytes()])
    assert answer.status == 200, answer.body
    return json.loads(answer.body)["outputs"][0]["data"][0]


def check_refusal(name: str, answer: RawAnswer, allowed: tuple[int, ...]) -> None:
    assert answer.status in allowed, (name, answer.status, answer.body[:300])
    message = ""
    if answer.headers.get("content-type", "").startswith("application/json"):
        message = json.loads(answer.body)["error"]
        assert message and all(0 < len(line) < 400 for line in message.splitlines()), message[:600]
    else:  # uvicorn's own answer to HTTP it cannot parse
        assert answer.status == 400 and answer.body
    assert len(answer.lines) == 1, (name, answer.lines)  # never a 100 Continue first
    if answer.status in (401, 415, 408) or "request body" in message:  # answered before the body was read: then closed
        assert answer.closed, (name, answer.lines)


def test_docs_list_every_case():
    text = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    section = text[text.index("## Hostile requests") :]
    section = section[: section.index("\n## ", 1)]
    assert [name for name in CASES if f"`{name}`" not in section] == []


def test_the_suite_is_big_enough():
    requests = len(CASES) - 1 + 2 * MAX_QUEUE  # slowloris sends 2 x --max-queue
    assert requests >= 60 and {status for _, statuses in CASES.values() for status in statuses} >= {400, 401, 404, 405, 408, 413, 415}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request_is_a_4xx_and_a_valid_request_still_scores(server, baseline_mb, expected, sample_images, data_dir, name):
    build, allowed = CASES[name]
    answers = build(server, sample_images, data_dir)
    for answer in answers if isinstance(answers, list) else [answers]:
        check_refusal(name, answer, allowed)
    assert abs(valid(server, sample_images[0]) - expected) <= 1e-6
    assert server.process.poll() is None


def test_bearer_is_case_insensitive_and_gzip_deflate_bodies_score(server, expected, sample_images):
    body, length = image_request([sample_images[0].read_bytes()])
    for scheme in ("bearer", "BEARER", "Bearer "):
        answer = send(server, body, auth=f"{scheme} {TOKEN}", Inference_Header_Content_Length=length)
        assert answer.status == 200, answer.body
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)), ("deflate", zlib.compress(body)[2:-4])):
        answer = send(server, packed, Content_Encoding=encoding, Inference_Header_Content_Length=length)
        assert answer.status == 200 and abs(json.loads(answer.body)["outputs"][0]["data"][0] - expected) <= 1e-6


def test_tritonclient_compressed_requests_score(server, tiny, sample_images):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (test extra)")
    data = np.array([p.read_bytes() for p in sample_images[:MAX_ROWS]], dtype=object).reshape(-1, 1)
    tensor = httpclient.InferInput("image", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data, binary_data=True)
    client = httpclient.InferenceServerClient(server.url)
    with Predictor(tiny) as predictor:
        reference = predictor.score(sample_images[:MAX_ROWS])
    try:
        for algorithm in ("gzip", "deflate"):
            result = client.infer(MODEL, [tensor], headers={"Authorization": f"Bearer {TOKEN}"}, request_compression_algorithm=algorithm)
            np.testing.assert_allclose(result.as_numpy("score").reshape(-1), reference, rtol=0, atol=1e-6)
    finally:
        client.close()


def test_the_token_is_never_printed(server):
    assert TOKEN not in repr(ServeOptions(token=TOKEN)) and TOKEN not in str(ServeOptions(token=TOKEN))
    assert server.lines and not any(TOKEN in line for line in server.lines)


def test_peak_rss_stays_bounded(server, baseline_mb):
    """Run last: the peak over every request above."""
    peak = status_mb(server, "VmHWM")
    assert peak - baseline_mb <= RSS_BOUND_MB, f"peak RSS {peak:.0f} MB, {peak - baseline_mb:.0f} MB over the {baseline_mb:.0f} MB once ready"
    print(f"server RSS once ready {baseline_mb:.0f} MB, peak {peak:.0f} MB (+{peak - baseline_mb:.0f} MB; bound +{RSS_BOUND_MB} MB)")
