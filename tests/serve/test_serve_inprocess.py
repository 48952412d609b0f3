"""What the hostile suite cannot see from outside, checked on the app in this process (no socket): a request
is decoded and scored in pieces of at most ``--max-batch-size`` rows, and an inference loop that has died
turns readiness (server and model) and liveness 503 and fails new work at once instead of at its deadline."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")

from memexport.serve.app import build_app  # noqa: E402
from memexport.serve.options import ServeOptions  # noqa: E402
from memexport.serve.service import Service  # noqa: E402
from memexport.serve.v2 import parse_infer  # noqa: E402

MODEL = "tiny-scorer"


async def call(app: Any, method: str, path: str, body: bytes = b"", header_length: int | None = None) -> tuple[int, Any]:
    """One request through the ASGI app: its status and JSON answer."""
    headers = [(b"content-length", str(len(body)).encode())]
    if header_length is not None:
        headers.append((b"inference-header-content-length", str(header_length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": headers}
    messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def image_body(blobs: list[bytes]) -> tuple[bytes, int]:
    """A binary ``image`` request and its JSON header's length."""
    binary = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs), 1],
                                     "parameters": {"binary_data_size": len(binary)}}]}).encode()
    return header + binary, len(header)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_a_request_is_decoded_and_scored_in_pieces_of_max_batch_size(tiny, sample_images):
    """10 rows at --max-batch-size 4: decode 4, score 4, decode 4, score 4, decode 2, score 2 (never all decoded first)."""
    async def scenario() -> list[tuple[str, int]]:
        service = Service([(MODEL, tiny)], ServeOptions(max_batch_size=4, max_rows=16, device="cpu"))
        await service.start()
        model, events = service.models[MODEL], []
        decode, infer = model.predictor.preprocess_bytes, model.infer

        def counted_decode(data: bytes, name: str) -> np.ndarray:
            events.append(("decode", 1))
            return decode(data, name)

        async def counted_infer(batch: np.ndarray) -> np.ndarray:
            events.append(("score", len(batch)))
            return await infer(batch)

        model.predictor.preprocess_bytes, model.infer = counted_decode, counted_infer
        body, length = image_body([p.read_bytes() for p in (sample_images * 4)[:10]])
        request = parse_infer(body, str(length), (3, 227, 227), max_rows=16)
        try:
            scores = await service.run(asyncio.get_running_loop().time() + 60, lambda: service.infer(model, request, asyncio.get_running_loop().time() + 60))
            assert scores.shape == (10,)
        finally:
            await service.stop()
        return events

    events = run(scenario())
    merged: list[tuple[str, int]] = []  # consecutive decodes counted together
    for kind, count in events:
        if merged and merged[-1][0] == kind == "decode":
            merged[-1] = (kind, merged[-1][1] + count)
        else:
            merged.append((kind, count))
    assert merged == [("decode", 4), ("score", 4), ("decode", 4), ("score", 4), ("decode", 2), ("score", 2)]


def test_a_dead_inference_loop_turns_ready_and_live_503_and_fails_work_at_once(tiny, sample_images):
    async def scenario() -> dict[str, tuple[int, Any]]:
        service = Service([(MODEL, tiny)], ServeOptions(device="cpu", timeout_s=30))
        app = build_app(lambda: service)
        await service.start()
        answers = {"ready before": await call(app, "GET", "/v2/health/ready")}
        service.models[MODEL].batcher._task.cancel()  # the loop dies (a fault in it would end it the same way)
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        answers["infer"] = await call(app, "POST", f"/v2/models/{MODEL}/infer", *image_body([sample_images[0].read_bytes()]))
        answers["infer took"] = (0, asyncio.get_running_loop().time() - started)
        for path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready", "/v2/health/live"):
            answers[path] = await call(app, "GET", path)
        service.draining = True  # stop() waits for nothing: no request is in flight
        await service.stop()
        return answers

    answers = run(scenario())
    assert answers["ready before"][0] == 200
    status, body = answers["infer"]
    assert status == 503 and "inference loop has stopped" in body["error"] and answers["infer took"][1] < 5
    assert answers["/v2/health/ready"] == (503, {"ready": False})
    assert answers[f"/v2/models/{MODEL}/ready"] == (503, {"name": MODEL, "ready": False})
    assert answers["/v2/health/live"] == (503, {"live": False})
