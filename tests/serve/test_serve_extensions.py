"""Triton's statistics and model-configuration extensions over REST, read by ``tritonclient.http`` as Triton's
own tools read them: the config of what the server really does, and statistics that count what it served."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (test extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.serve.server import image_tensor, running  # noqa: E402

MODEL = "tiny-scorer"


@pytest.fixture(scope="module")
def server(tiny: Path):
    yield from running(tiny, "--max-batch-size", "4", "--max-delay-ms", "3", "--max-queue", "9", "--timeout", "12.5")


def image_input(blobs: list[bytes]):
    return image_tensor(httpclient, blobs)


def test_config_says_what_the_server_does(client):
    config = client.get_model_config(MODEL)
    assert config == client.get_model_config(MODEL, "1")
    assert (config["name"], config["backend"], config["platform"], config["max_batch_size"]) == (MODEL, "memexport", "memexport_onnxruntime", 4)
    assert [(t["name"], t["data_type"], t["dims"], t["optional"]) for t in config["input"]] == [
        ("image", "TYPE_STRING", [1], True), ("pixels", "TYPE_FP32", [3, 227, 227], True)]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [("score", "TYPE_FP32", [1])]
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 3000
    assert batching["default_queue_policy"] == {"max_queue_size": 9, "default_timeout_microseconds": 12_500_000,
                                                "timeout_action": "REJECT", "allow_timeout_override": False}
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["instance_group"][0]["count"] == 1
    assert config["default_model_filename"] == "tiny.onnx"
    for call in (lambda: client.get_model_config("nope"), lambda: client.get_model_config(MODEL, "2")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "404"


def inference(stats: dict, key: str) -> tuple[int, int]:
    entry = stats["inference_stats"][key]
    return entry["count"], entry["ns"]


def test_statistics_count_requests_entries_and_batches(client, server, sample_images):
    before = client.get_inference_statistics(MODEL)["model_stats"][0]
    blobs = [p.read_bytes() for p in sample_images[:3]]
    client.infer(MODEL, [image_input(blobs)])
    client.infer(MODEL, [image_input(blobs * 2)])  # 6 rows past --max-batch-size 4: two entries
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [image_input([b"not an image"])])
    after = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert (after["name"], after["version"]) == (MODEL, "1")
    assert after["inference_count"] - before["inference_count"] == 9
    assert inference(after, "success")[0] - inference(before, "success")[0] == 2
    assert inference(after, "fail")[0] - inference(before, "fail")[0] == 1
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference(after, key)[0] - inference(before, key)[0] == 3, key
    assert inference(after, "compute_infer")[1] > inference(before, "compute_infer")[1]
    # every execution is in one batch size's count, never above --max-batch-size
    assert after["execution_count"] == sum(b["compute_infer"]["count"] for b in after["batch_stats"])
    assert all(1 <= b["batch_size"] <= 4 for b in after["batch_stats"])
    assert after["last_inference"] >= max(before["last_inference"], 1)
    assert client.get_inference_statistics()["model_stats"][0]["name"] == MODEL
    assert client.get_inference_statistics(MODEL, "1")["model_stats"][0]["inference_count"] == after["inference_count"]
    status, body = server.json("GET", "/v2/models/nope/stats")
    assert status == 404 and "unknown model" in body["error"]


def asgi_get(app, path: str) -> tuple[int, dict]:
    """One GET straight through the ASGI app (no server, no HTTP client)."""
    import asyncio
    import json

    sent: list[dict] = []
    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"", "headers": [],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_without_the_generated_modules_the_routes_answer_501(monkeypatch):
    """The recorder needs no protobuf; only the answer does, and its absence is one line naming the extra."""
    import sys
    from types import SimpleNamespace

    import fastapi

    from memexport.serve.extensions import add_extension_routes
    from memexport.serve.gate import error_response
    from memexport.serve.stats import Statistics
    from memexport.serve.v2 import RequestError

    served = SimpleNamespace(name=MODEL, stats=Statistics())
    models = SimpleNamespace(service_for=lambda name, version=None: served, services=lambda: [served])
    app = fastapi.FastAPI()
    app.add_exception_handler(RequestError, lambda request, exc: error_response(exc))
    add_extension_routes(app, models)
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.service_pb2", None)
    assert asgi_get(app, f"/v2/models/{MODEL}/stats") == (501, {"error": "the statistics extension needs tritonclient.grpc.service_pb2, "
                                                               "which is not installed; install it with pip install 'memexport[serve]'"})
    monkeypatch.undo()  # the module as imported before, not a second copy
    status, body = asgi_get(app, "/v2/models/stats")
    assert status == 200 and body["model_stats"][0]["name"] == MODEL
