"""``memexport serve --engine ray``: the same app under Ray Serve 2.60 on a local Ray instance,
answering as the plain server does (tritonclient scores equal ``Predictor``'s, one line per bad row,
``/score``), batched by ``@serve.batch``; SIGTERM shuts Serve and Ray down."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")
pytest.importorskip("ray.serve", reason="ray[serve] is not installed (memexport[ray])")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (test extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

from memexport.runtime.predictor import Predictor  # noqa: E402
from memexport.serve.ray import RayServeOptions, app_builder, builder_options  # noqa: E402
from memexport.core.errors import UsageError  # noqa: E402
from tests.models import write_tiny_scorer  # noqa: E402
from tests.serve.server import Server, multipart  # noqa: E402

MODEL = "tiny-scorer"


def one_file(path) -> tuple[bytes, dict[str, str]]:
    """``/score`` request arguments for one file."""
    body, content_type = multipart([(path.name, path.read_bytes())])
    return body, {"Content-Type": content_type}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_replica_options_parse():
    assert RayServeOptions.parse(None, 0, None).replicas == 1
    assert RayServeOptions.parse("auto", 3, None) == RayServeOptions("auto", 3)
    assert RayServeOptions.parse(None, 0, "1:4").autoscale == (1, 4)
    for replicas, autoscale in ((2, "1:3"), (0, "4:1"), (0, "x")):
        with pytest.raises(UsageError):
            RayServeOptions.parse(None, replicas, autoscale)


@pytest.mark.slow
def test_ray_serve_answers_like_the_plain_server(tiny, sample_images, tmp_path):
    second = write_tiny_scorer(tmp_path / "second.onnx", precision="int8", sign=-1.0)  # served as tiny-scorer_int8
    server = Server(tiny, "-m", str(second), "--engine", "ray", "--port", str(free_port()), "--max-batch-size", "4",
                    "--max-queue", "1", "--max-delay-ms", "1500", ready_timeout=240)
    try:
        client = httpclient.InferenceServerClient(server.url)
        data = np.array([p.read_bytes() for p in sample_images], dtype=object).reshape(-1, 1)
        tensor = httpclient.InferInput("image", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data, binary_data=True)
        for name, artifact in ((MODEL, tiny), (f"{MODEL}_int8", second)):
            result = client.infer(name, [tensor], outputs=[httpclient.InferRequestedOutput("score", binary_data=True)])
            with Predictor(artifact) as predictor:
                np.testing.assert_allclose(result.as_numpy("score").reshape(-1), predictor.score(sample_images), rtol=0, atol=1e-6)
        assert client.get_model_metadata(MODEL)["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [-1, 1]}
        bad = httpclient.InferInput("image", [1, 1], "BYTES")
        bad.set_data_from_numpy(np.array([[b"not an image"]], dtype=object), binary_data=True)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [bad])
        assert caught.value.status() == "400" and caught.value.message().startswith("row 0: not a recognised image")
        body, content_type = multipart([(p.name, p.read_bytes()) for p in sample_images[:2]])
        status, _, answer = server.request("POST", "/score", body, headers={"Content-Type": content_type})
        assert status == 200 and [(row["file"], row["model"]) for row in json.loads(answer)] == [
            (p.name, name) for p in sample_images[:2] for name in (MODEL, f"{MODEL}_int8")]
        metrics = server.get("/metrics")[2].decode()
        assert 'memexport_batch_size_bucket{le="4.0"}' in metrics
        # Triton's statistics from the replica's @serve.batch: each image one entry; and the model config
        stats = client.get_inference_statistics(MODEL)["model_stats"][0]
        images = len(sample_images) + 2
        assert stats["inference_count"] == images == stats["inference_stats"]["queue"]["count"]
        assert (stats["inference_stats"]["success"]["count"], stats["inference_stats"]["fail"]["count"]) == (2, 1)
        assert all(1 <= b["batch_size"] <= 4 for b in stats["batch_stats"]) and stats["execution_count"] >= images / 4
        assert client.get_model_config(MODEL)["max_batch_size"] == 4
        client.close()
        # Full (--max-queue 1, a request waiting for its batch): the app's own 503, with Retry-After.
        waiting: list = []
        thread = threading.Thread(target=lambda: waiting.append(server.request("POST", "/score", *one_file(sample_images[0]))))
        thread.start()
        time.sleep(0.7)
        status, headers, answer = server.request("POST", "/score", *one_file(sample_images[1]))
        thread.join(60)
        assert status == 503 and headers["retry-after"] and "busy" in json.loads(answer)["error"]
        assert waiting[0][0] == 200  # the accepted one is still answered
    finally:
        server.stop(timeout=120)
    assert server.process.returncode is not None


def test_app_builder_for_kuberay(tiny, monkeypatch):
    from ray import serve

    monkeypatch.setenv("MEMEXPORT_SERVE_TOKEN", "s3cret")
    app = app_builder(
        {"model": str(tiny), "max_batch_size": "8", "max_delay_ms": "2.5", "check_integrity": "true", "autoscale": "1:3"})
    assert isinstance(app, serve.Application)
    assert isinstance(app_builder({"model": [str(tiny), f"second={tiny}"]}), serve.Application)
    with pytest.raises(UsageError, match="unknown serve option"):
        app_builder({"model": str(tiny), "max_batchsize": "8"})
    with pytest.raises(UsageError, match="args.model"):
        app_builder({})


def test_app_builder_reads_typed_options_and_applies_the_access_rules(tiny, monkeypatch):
    """KubeRay hands every argument over as YAML: "4" is the integer 4, a bad value is one line; the builder cannot
    see where Serve listens, so beyond loopback (its default assumption) it needs the token, as `serve --host` does."""
    monkeypatch.setenv("MEMEXPORT_SERVE_TOKEN", "s3cret")
    models, options, ray_options = builder_options({"model": [str(tiny), f"b={tiny}"], "workers": "4", "max_rows": 8, "timeout_s": "2.5",
                                                    "check_integrity": "off", "backend": "openvino", "replicas": "2"})
    assert [m.name for m in models] == [None, "b"] and ray_options.replicas == 2
    assert (options.workers, options.max_rows, options.timeout_s, options.check_integrity, options.backend) == (4, 8, 2.5, False, "openvino")
    assert options.token == "s3cret" and "s3cret" not in repr(options)
    for name, value, words in (("workers", "four", "args.workers must be an integer or null"), ("max_rows", 4.5, "args.max_rows must be an integer"),
                               ("check_integrity", "maybe", "must be true or false"), ("max_queue", True, "must be an integer"),
                               ("max_rows", "0", "--max-rows must be >= 1")):
        with pytest.raises(UsageError, match=words) as caught:
            builder_options({"model": str(tiny), name: value})
        assert "\n" not in str(caught.value)
    monkeypatch.delenv("MEMEXPORT_SERVE_TOKEN")
    with pytest.raises(UsageError, match="beyond this machine, and no token is set"):
        app_builder({"model": str(tiny)})
    assert builder_options({"model": str(tiny), "host": "127.0.0.1"})[1].token is None
    assert builder_options({"model": str(tiny), "insecure": "true"})[1].token is None
