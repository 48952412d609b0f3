"""``memexport serve``'s limits: the bearer token, loopback by default, a bounded queue (503 with
Retry-After, nothing accepted lost), the per-request timeout (504), and SIGTERM (stop accepting,
finish what was accepted, exit 0). Each case runs its own tiny-scorer server on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (test extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

from memexport.runtime.predictor import Predictor  # noqa: E402
from tests.serve.server import ROOT, Server  # noqa: E402

MODEL = "tiny-scorer"
# uvicorn drains, then re-raises the SIGTERM it caught, so a clean stop is death by SIGTERM (or 0).
CLEAN_EXIT = (0, -signal.SIGTERM)


def infer_body(image: Path) -> bytes:
    blob = image.read_bytes()
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(blob)}}]})
    return header.encode(), len(blob).to_bytes(4, "little") + blob


def post_image(server: Server, image: Path, results: list, **kwargs) -> None:
    header, binary = infer_body(image)
    results.append(server.request("POST", f"/v2/models/{MODEL}/infer", header + binary,
                                  headers={"Inference-Header-Content-Length": str(len(header))}, **kwargs))


def test_token_guards_all_but_health_and_page(tiny, sample_images):
    server = Server(tiny, token="s3cret")
    try:
        assert server.get("/v2/health/ready", headers={"Authorization": ""})[0] == 200
        assert server.get("/", headers={"Authorization": ""})[0] == 200
        status, headers, body = server.get(f"/v2/models/{MODEL}", headers={"Authorization": ""})
        assert status == 401 and headers["www-authenticate"] == "Bearer" and "bearer token" in json.loads(body)["error"]
        assert server.get("/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
        client = httpclient.InferenceServerClient(server.url)
        data = np.array([sample_images[0].read_bytes()], dtype=object).reshape(1, 1)
        tensor = httpclient.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [tensor])
        assert caught.value.status() == "401"
        result = client.infer(MODEL, [tensor], headers={"Authorization": "Bearer s3cret"})
        with Predictor(tiny) as predictor:
            assert abs(result.as_numpy("score")[0, 0] - predictor.score(sample_images[:1])[0]) <= 1e-6
        client.close()
    finally:
        assert server.stop() in CLEAN_EXIT


def test_non_loopback_host_needs_token_or_insecure(tiny):
    run = subprocess.run([sys.executable, "-m", "memexport", "serve", "-m", str(tiny), "--host", "0.0.0.0", "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--token" in run.stderr and "--insecure" in run.stderr


def test_full_queue_is_503_with_retry_after_and_accepted_work_is_answered(tiny, sample_images):
    # One request sits in the batcher for up to 1.5 s (waiting for company); the queue holds one.
    server = Server(tiny, "--max-queue", "1", "--max-delay-ms", "1500")
    try:
        first: list = []
        thread = threading.Thread(target=post_image, args=(server, sample_images[0], first))
        thread.start()
        time.sleep(0.5)
        second: list = []
        post_image(server, sample_images[1], second)
        thread.join(30)
        status, headers, body = second[0]
        assert status == 503 and headers["retry-after"] == "1" and "busy" in json.loads(body)["error"]
        assert first[0][0] == 200
        assert server.get("/v2/health/ready")[0] == 200
    finally:
        assert server.stop() in CLEAN_EXIT


def test_timeout_is_504_and_the_server_stays_up(tiny, sample_images):
    server = Server(tiny, "--timeout", "0.2", "--max-delay-ms", "1000")
    try:
        results: list = []
        post_image(server, sample_images[0], results)
        status, _, body = results[0]
        assert status == 504 and "no answer within 0.2 s" in json.loads(body)["error"]
        assert server.get("/v2/health/live")[0] == 200
    finally:
        assert server.stop() in CLEAN_EXIT


def test_sigterm_answers_new_work_503_finishes_accepted_requests_then_exits(tiny, sample_images):
    server = Server(tiny, "--max-delay-ms", "2500")
    accepted: list = []
    thread = threading.Thread(target=post_image, args=(server, sample_images[0], accepted))
    thread.start()
    time.sleep(0.5)  # the request is now waiting in the batcher
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the signal is handled; the accepted request still waits for its batch
    late: list = []
    post_image(server, sample_images[1], late, timeout=10)
    status, headers, body = late[0]
    assert status == 503 and headers["retry-after"] and "shutting down" in json.loads(body)["error"]  # refused, not dropped
    assert server.get("/v2/health/ready", timeout=5)[0] == 503 and server.process.poll() is None
    assert server.get(f"/v2/models/{MODEL}/ready", timeout=5)[0] == 503  # the model's readiness too
    assert server.stop() in CLEAN_EXIT
    thread.join(30)
    status, _, body = accepted[0]
    assert status == 200 and json.loads(body[: len(body)])  # answered in full before the exit
    with pytest.raises(OSError):  # closed once drained
        server.get("/v2/health/live", timeout=5)


def test_killed_server_restarts_on_the_same_port(tiny, sample_images):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    first = Server(tiny, "--port", port)
    first.process.kill()  # no drain: SIGKILL
    first.process.wait(30)
    second = Server(tiny, "--port", port)
    try:
        results: list = []
        post_image(second, sample_images[0], results)
        assert results[0][0] == 200 and second.url.endswith(":" + port)
    finally:
        assert second.stop() in CLEAN_EXIT


def test_unloadable_artifact_exits_with_one_error_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    run = subprocess.run([sys.executable, "-m", "memexport", "serve", "-m", str(bad), "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 1 and len(errors) == 1 and "bad.onnx" in errors[0] and "Traceback" not in run.stderr
