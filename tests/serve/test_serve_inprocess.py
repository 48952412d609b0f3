"""What the hostile suite cannot see from outside, checked on the app in this process (no socket): a request
is decoded and scored in pieces of at most ``--max-batch-size`` rows, and an inference loop that has died
turns readiness (server and model) and liveness 503 and fails new work at once instead of at its deadline, over
REST and, through the gRPC servicer, over gRPC (per model, with two models)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")

from memexport.serve.app import build_app  # noqa: E402
from memexport.serve.options import ServeOptions  # noqa: E402
from memexport.serve.service import Service  # noqa: E402
from memexport.serve.v2 import parse_infer  # noqa: E402
from tests.serve.server import image_request  # noqa: E402

MODEL = "tiny-scorer"


async def call(app: Any, method: str, path: str, body: bytes = b"", header_length: str | None = None) -> tuple[int, Any]:
    """One request through the ASGI app: its status and JSON answer."""
    headers = [(b"content-length", str(len(body)).encode())]
    if header_length is not None:
        headers.append((b"inference-header-content-length", header_length.encode()))
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
        body, length = image_request([p.read_bytes() for p in (sample_images * 4)[:10]])
        request = parse_infer(body, length, (3, 227, 227), max_rows=16)
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
        answers["infer"] = await call(app, "POST", f"/v2/models/{MODEL}/infer", *image_request([sample_images[0].read_bytes()]))
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


class Context:
    """The little of a ``grpc.aio`` servicer context the handlers use: no metadata, and ``abort`` recording its status."""

    def __init__(self) -> None:
        self.status: tuple[str, str] | None = None

    def invocation_metadata(self) -> tuple:
        return ()

    async def abort(self, code: Any, details: str) -> None:
        import grpc

        self.status = (code.name, details)
        raise grpc.aio.AbortError()


async def rpc(servicer: Any, name: str, request: Any) -> Any:
    """One RPC on the servicer: its answer, or the ``(code, details)`` it aborted with."""
    import grpc

    context = Context()
    try:
        return await getattr(servicer, name)(request, context)
    except grpc.aio.AbortError:
        return context.status


def test_grpc_readiness_follows_the_rest_rule_per_model(tiny, sample_images):
    """Two models, one inference loop dead: gRPC's ServerReady and ServerLive false, ModelReady false for that model
    only, its ModelInfer UNAVAILABLE at once while the other model still scores; while draining, ModelReady false."""
    pb = pytest.importorskip("tritonclient.grpc.service_pb2", reason="tritonclient[grpc] is not installed (serve extra)")
    from memexport.serve.grpc.servicer import Servicer
    from memexport.serve.lookup import Registry

    def infer_request(name: str) -> Any:
        request = pb.ModelInferRequest(model_name=name)
        request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
        blob = sample_images[0].read_bytes()
        request.raw_input_contents.append(len(blob).to_bytes(4, "little") + blob)  # Triton's BYTES layout
        return request

    async def scenario() -> dict[str, Any]:
        service = Service([("a", tiny), ("b", tiny)], ServeOptions(device="cpu", timeout_s=30))
        servicer = Servicer(Registry(lambda: service), None)
        await service.start()
        answers = {"ready before": (await rpc(servicer, "ServerReady", pb.ServerReadyRequest())).ready}
        service.models["a"].batcher._task.cancel()
        await asyncio.sleep(0.05)
        answers["live"] = (await rpc(servicer, "ServerLive", pb.ServerLiveRequest())).live
        for key, name, request in (("server ready", "ServerReady", pb.ServerReadyRequest()), ("a ready", "ModelReady", pb.ModelReadyRequest(name="a")),
                                   ("b ready", "ModelReady", pb.ModelReadyRequest(name="b"))):
            answers[key] = (await rpc(servicer, name, request)).ready
        answers["a infer"] = await rpc(servicer, "ModelInfer", infer_request("a"))
        answers["b infer"] = await rpc(servicer, "ModelInfer", infer_request("b"))
        service.draining = True
        answers["b ready, draining"] = (await rpc(servicer, "ModelReady", pb.ModelReadyRequest(name="b"))).ready
        await service.stop()
        return answers

    answers = run(scenario())
    assert answers["ready before"] and not answers["server ready"] and not answers["live"]
    assert not answers["a ready"] and answers["b ready"] and not answers["b ready, draining"]
    code, details = answers["a infer"]
    assert code == "UNAVAILABLE" and "model 'a' cannot score: its inference loop has stopped" in details
    assert np.frombuffer(answers["b infer"].raw_output_contents[0], "<f4").shape == (1,)
