"""``memexport serve --grpc-port`` through ``tritonclient.grpc``, unmodified, and the generated stub: health,
metadata, config and statistics round trips (the same messages REST answers), ``ModelInfer`` with ``image``
and ``pixels`` in ``raw_input_contents`` and in tensor contents (every score equal to ``Predictor``'s), the
statistics counting what was served, bad requests mapped to gRPC status codes with the server staying up,
the row limit as REST's (RESOURCE_EXHAUSTED for REST's 413),
busy / deadline / draining, the token rule, the CLI's refusals, and the real ResMem on the 15 shared photos."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (serve extra)")
import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from memexport.runtime.predictor import Predictor  # noqa: E402
from tests.serve.server import ROOT, Server, check_example_client, image_request, image_tensor, running  # noqa: E402

MODEL = "tiny-scorer"
BODY_CAP_MB = 8
SHARED_IMAGES = ROOT.parent / "shared" / "images"


@pytest.fixture(scope="module")
def server(tiny: Path):
    yield from running(tiny, "--grpc-port", "0", "--max-batch-size", "4", "--max-delay-ms", "2", "--max-body-mb", str(BODY_CAP_MB))


@pytest.fixture()
def client(server):
    triton = grpcclient.InferenceServerClient(server.grpc_url)
    yield triton
    triton.close()


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def image_input(blobs: list[bytes]):
    return image_tensor(grpcclient, blobs)


def pixels_input(batch: np.ndarray):
    tensor = grpcclient.InferInput("pixels", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch.astype(np.float32))
    return tensor


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()).removeprefix("StatusCode."), caught.value.message()


def test_listens_on_loopback_beside_http(server):
    assert server.grpc_url.startswith("127.0.0.1:") and server.grpc_url != server.url


def test_health_and_metadata_are_rest_s(client, server, predictor):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("resmem-not-here") and not client.is_model_ready(MODEL, "2")
    status, rest = server.json("GET", f"/v2/models/{MODEL}")
    properties = rest.pop("properties")  # REST only: KServe's gRPC ModelMetadataResponse has no such field
    assert status == 200 and client.get_model_metadata(MODEL, as_json=True) == json_format.MessageToDict(
        json_format.ParseDict(rest, service_pb2.ModelMetadataResponse()))
    parameters = client.get_model_config(MODEL).config.parameters  # where gRPC clients read the same facts
    assert {key: parameters[key].string_value for key in ("model", "output_meaning")} == {
        key: properties[key] for key in ("model", "output_meaning")}
    meta = client.get_model_metadata(MODEL)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("image", "BYTES", [-1, 1]), ("pixels", "FP32", [-1, *predictor.metadata.input_shape])]
    server_meta = client.get_server_metadata()
    assert server_meta.name == "memexport" and {"binary_tensor_data", "statistics", "model_configuration"} <= set(server_meta.extensions)
    assert server.json("GET", "/v2")[1]["extensions"] == list(server_meta.extensions)


def test_config_is_one_message_over_both_protocols(client, server, predictor):
    config = client.get_model_config(MODEL).config
    assert (config.name, config.max_batch_size, config.backend, config.platform) == (MODEL, 4, "memexport", "memexport_onnxruntime")
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in config.input] == [
        ("image", model_config_pb2.TYPE_STRING, [1], True), ("pixels", model_config_pb2.TYPE_FP32, list(predictor.metadata.input_shape), True)]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("score", model_config_pb2.TYPE_FP32, [1])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert config.parameters["precision"].string_value == "fp32" and config.parameters["decode"].string_value == "exact"
    assert client.get_model_config(MODEL, as_json=True)["config"]["name"] == MODEL
    # REST: Triton's JSON form (dims as numbers, every field), the very same message
    status, rest = server.json("GET", f"/v2/models/{MODEL}/config")
    assert status == 200 and rest["input"][1]["dims"] == list(predictor.metadata.input_shape)
    assert json_format.ParseDict(rest, model_config_pb2.ModelConfig()) == config
    assert server.json("GET", f"/v2/models/{MODEL}/versions/1/config")[1] == rest
    assert server.json("GET", "/v2/models/nope/config")[0] == 404


def test_infer_pixels_and_images_equal_predictor(client, predictor, sample_images):
    expected = predictor.score(sample_images)
    result = client.infer(MODEL, [image_input([p.read_bytes() for p in sample_images])], request_id="g-1")
    assert result.get_response().id == "g-1" and result.as_numpy("score").shape == (len(sample_images), 1)
    np.testing.assert_allclose(result.as_numpy("score").reshape(-1), expected, rtol=0, atol=1e-6)
    pixels = np.stack([predictor.preprocess(p) for p in sample_images])
    result = client.infer(MODEL, [pixels_input(pixels)], model_version="1", outputs=[grpcclient.InferRequestedOutput("score")])
    np.testing.assert_allclose(result.as_numpy("score").reshape(-1), expected, rtol=0, atol=1e-6)


def test_tensor_contents_equal_raw_contents(stub, predictor, sample_images):
    photos = sample_images[:3]
    expected = predictor.score(photos)
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="contents")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(photos), 1])
    tensor.contents.bytes_contents.extend(p.read_bytes() for p in photos)
    answer = stub.ModelInfer(request)
    assert answer.id == "contents" and list(answer.outputs[0].shape) == [3, 1]
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], "<f4"), expected, rtol=0, atol=1e-6)
    pixels = np.stack([predictor.preprocess(p) for p in photos])
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    tensor.contents.fp32_contents.extend(pixels.reshape(-1).tolist())
    np.testing.assert_allclose(np.frombuffer(stub.ModelInfer(request).raw_output_contents[0], "<f4"), expected, rtol=0, atol=1e-6)


def stats_of(client) -> dict:
    return client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]


def count(entry: dict, *keys: str) -> int:
    for key in keys:
        entry = entry.get(key, {})
    return int(entry or 0)


def test_statistics_count_what_was_served(client, server, sample_images):
    before = stats_of(client)
    blobs = [p.read_bytes() for p in sample_images[:3]]
    client.infer(MODEL, [image_input(blobs)])  # 3 images: one entry
    client.infer(MODEL, [image_input(blobs * 2)])  # 6 images, over --max-batch-size 4: two entries
    status_of(lambda: client.infer(MODEL, [image_input([b"not an image"])]))
    after = stats_of(client)

    def delta(*keys: str) -> int:
        return count(after, *keys) - count(before, *keys)

    assert delta("inference_count") == 9 and delta("inference_stats", "success", "count") == 2
    assert delta("inference_stats", "fail", "count") == 1 and delta("inference_stats", "queue", "count") == 3
    assert delta("inference_stats", "compute_infer", "count") == 3 and delta("inference_stats", "compute_infer", "ns") > 0
    assert delta("execution_count") == sum(count(b, "compute_infer", "count") for b in after["batch_stats"]) - sum(
        count(b, "compute_infer", "count") for b in before.get("batch_stats", []))
    assert all(1 <= int(b["batch_size"]) <= 4 for b in after["batch_stats"])
    assert int(after["last_inference"]) >= int(before.get("last_inference", 0))
    # the REST answer is the same message: Triton's JSON, 64-bit numbers as numbers
    status, rest = server.json("GET", f"/v2/models/{MODEL}/stats")
    assert status == 200 and isinstance(rest["model_stats"][0]["inference_count"], int)
    assert rest["model_stats"][0]["inference_count"] == count(after, "inference_count")
    assert server.json("GET", "/v2/models/stats")[1]["model_stats"][0]["name"] == MODEL
    assert client.get_inference_statistics(as_json=True)["model_stats"][0]["name"] == MODEL


def test_bad_requests_get_status_codes(client, stub, server, sample_images):
    blob = sample_images[0].read_bytes()
    assert status_of(lambda: client.infer("nope", [image_input([blob])]))[0] == "NOT_FOUND"
    assert status_of(lambda: client.infer(MODEL, [image_input([blob])], model_version="2"))[0] == "NOT_FOUND"
    assert status_of(lambda: client.get_model_metadata("nope"))[0] == "NOT_FOUND"
    assert status_of(lambda: client.get_model_config(MODEL, "3"))[0] == "NOT_FOUND"
    assert status_of(lambda: client.get_inference_statistics("nope"))[0] == "NOT_FOUND"
    code, message = status_of(lambda: client.infer(MODEL, [image_input([blob, b"", b"GIF89a"])]))
    assert code == "INVALID_ARGUMENT" and message.startswith("row 1: file is empty") and "\nrow 2: " in message
    assert status_of(lambda: client.infer(MODEL, [pixels_input(np.zeros((1, 3, 5, 5)))]))[0] == "INVALID_ARGUMENT"
    wrong_type = grpcclient.InferInput("image", [1, 1], "INT32")
    wrong_type.set_data_from_numpy(np.zeros((1, 1), np.int32))
    assert status_of(lambda: client.infer(MODEL, [wrong_type]))[0] == "INVALID_ARGUMENT"
    code, message = status_of(lambda: client.infer(MODEL, [image_input([blob])], outputs=[grpcclient.InferRequestedOutput("logits")]))
    assert code == "INVALID_ARGUMENT" and "unknown output 'logits'" in message
    too_big = np.zeros((int(BODY_CAP_MB * 2**20 / (4 * 3 * 227 * 227)) + 1, 3, 227, 227), np.float32)
    assert status_of(lambda: client.infer(MODEL, [pixels_input(too_big)]))[0] == "RESOURCE_EXHAUSTED"
    # gRPC's own compression: capped after inflating (zeros shrink to a few KB on the wire)
    code, message = status_of(lambda: client.infer(MODEL, [pixels_input(too_big)], compression_algorithm="gzip"))
    assert code == "RESOURCE_EXHAUSTED" and "Decompressed message larger than max" in message
    assert client.infer(MODEL, [pixels_input(too_big[:1])], compression_algorithm="gzip").as_numpy("score").shape == (1, 1)
    code, message = status_of(lambda: client.get_model_repository_index())
    assert code == "UNIMPLEMENTED" and message == "RepositoryIndex is not served by memexport; see docs/serving.md for the RPCs it serves"
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ModelStreamInfer(iter([service_pb2.ModelInferRequest(model_name=MODEL)])))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # still serving, over both protocols
    assert client.is_server_ready() and server.get("/v2/health/ready")[0] == 200
    assert client.infer(MODEL, [image_input([blob])]).as_numpy("score").shape == (1, 1)


def test_rows_over_max_rows_are_resource_exhausted_with_rest_s_line(client, stub, server, sample_images):
    """--max-rows (64 by default) reaches gRPC: RESOURCE_EXHAUSTED, as REST's 413 and gRPC's own message cap, with
    REST's line, judged from the shape before any row is unpacked (a million rows declared, one sent)."""
    blobs = [b"x"] * 65
    code, message = status_of(lambda: client.infer(MODEL, [image_input(blobs)]))
    assert code == "RESOURCE_EXHAUSTED" and message == (f"input 'image' has 65 rows; this server takes at most 64 per request "
                                                        "(--max-rows): split it into smaller requests")
    assert rest_infer_error(server, blobs) == (413, message)
    declared = service_pb2.ModelInferRequest(model_name=MODEL)
    declared.inputs.add(name="image", datatype="BYTES", shape=[1_000_000, 1])
    declared.raw_input_contents.append(b"\x01\0\0\0x")
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(declared)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "has 1000000 rows" in caught.value.details()
    declared = service_pb2.ModelInferRequest(model_name=MODEL)  # pixels too: the shape is judged, not the 4 bytes sent
    declared.inputs.add(name="pixels", datatype="FP32", shape=[65, 3, 227, 227])
    declared.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(declared)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "(--max-rows)" in caught.value.details()
    # 64 rows is within the limit and scores, in pieces of --max-batch-size
    good = client.infer(MODEL, [image_input([sample_images[0].read_bytes()] * 64)]).as_numpy("score")
    assert good.shape == (64, 1) and np.ptp(good) == 0


def rest_infer_error(server, blobs: list[bytes]) -> tuple[int, str]:
    """The same ``image`` request over REST: its status and error line."""
    body, length = image_request(blobs)
    status, _, answer = server.request("POST", f"/v2/models/{MODEL}/infer", body, headers={"Inference-Header-Content-Length": length})
    return status, json.loads(answer)["error"]


def test_example_client_over_grpc(server, predictor, sample_images, tmp_path):
    check_example_client(server.grpc_url, MODEL, sample_images, predictor.score(sample_images), tmp_path, "--protocol", "grpc")


def call_later(delay: float, call, out: list) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        try:
            out.append(("OK", call()))
        except InferenceServerException as error:
            out.append((str(error.status()).removeprefix("StatusCode."), error.message()))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_busy_deadline_and_drain(tiny, sample_images):
    """One slot, a long batching delay and a short timeout: the first request holds the slot, a second is
    UNAVAILABLE, the first gets DEADLINE_EXCEEDED; on SIGTERM new work is UNAVAILABLE and ready turns false."""
    server = Server(tiny, "--grpc-port", "0", "--max-queue", "1", "--max-delay-ms", "600", "--timeout", "0.3")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        blob = [sample_images[0].read_bytes()]
        first: list = []
        holder = call_later(0, lambda: client.infer(MODEL, [image_input(blob)]), first)
        time.sleep(0.15)
        code, message = status_of(lambda: client.infer(MODEL, [image_input(blob)]))
        assert code == "UNAVAILABLE" and "busy" in message and "--max-queue 1" in message
        holder.join()
        assert first[0][0] == "DEADLINE_EXCEEDED" and "no answer within 0.3 s" in first[0][1]
        time.sleep(0.8)  # the slot comes back once its batch has run
        # a client's own deadline: the client gives up, its work still holds the slot until its batch has run
        assert status_of(lambda: client.infer(MODEL, [image_input(blob)], client_timeout=0.05))[0] == "DEADLINE_EXCEEDED"
        assert status_of(lambda: client.infer(MODEL, [image_input(blob)]))[0] == "UNAVAILABLE"
        time.sleep(0.8)
        late: list = []
        holder = call_later(0, lambda: client.infer(MODEL, [image_input(blob)]), late)
        time.sleep(0.1)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        code, message = status_of(lambda: client.infer(MODEL, [image_input(blob)]))
        assert code == "UNAVAILABLE" and "shutting down" in message
        assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready(MODEL)
        holder.join()
        assert late[0][0] == "DEADLINE_EXCEEDED"  # answered, not dropped
        assert server.process.wait(30) == -signal.SIGTERM
        client.close()
    finally:
        server.stop()


def test_token_rule_over_metadata(tiny, sample_images):
    for server in running(tiny, "--grpc-port", "0", token="s3cret"):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_server_live() and client.is_server_ready()  # probes need no token, as on REST
        code, message = status_of(lambda: client.get_model_metadata(MODEL))
        assert code == "UNAUTHENTICATED" and "bearer token" in message
        assert status_of(lambda: client.get_model_metadata(MODEL, headers={"authorization": "Bearer wrong"}))[0] == "UNAUTHENTICATED"
        assert status_of(lambda: client.infer(MODEL, [image_input([b"x"])]))[0] == "UNAUTHENTICATED"
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert client.get_model_metadata(MODEL, headers={"authorization": f"{scheme} s3cret"}).name == MODEL
        result = client.infer(MODEL, [image_input([sample_images[0].read_bytes()])], headers={"authorization": "Bearer s3cret"})
        assert result.as_numpy("score").shape == (1, 1)
        client.close()


def serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memexport", "serve", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_refusals_are_one_line(tiny):
    ray = serve_cli("-m", str(tiny), "--engine", "ray", "--grpc-port", "0")
    assert ray.returncode == 2 and "--grpc-port is not served with --engine ray" in ray.stderr and len(ray.stderr.strip().splitlines()) == 1
    wide = serve_cli("-m", str(tiny), "--host", "0.0.0.0", "--port", "0", "--grpc-port", "0")
    assert wide.returncode == 2 and "--host 0.0.0.0 lets other machines in" in wide.stderr and len(wide.stderr.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = serve_cli("-m", str(tiny), "--port", "0", "--grpc-port", str(port))
    assert busy.returncode == 2, busy.stdout + busy.stderr
    errors = [line for line in busy.stderr.splitlines() if "listening on" not in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: --grpc-port {port}: cannot listen on 127.0.0.1:{port}"), busy.stderr


@pytest.mark.slow
def test_real_resmem_over_grpc_equals_predictor(resmem_artifact, sample_images):
    """The 15 shared photos (../shared/images; tests/data where absent) as ``image`` BYTES and as ``pixels``."""
    photos = sorted(p for p in SHARED_IMAGES.glob("*") if p.suffix in (".jpg", ".png")) or sample_images
    with Predictor(resmem_artifact, device="cpu") as reference:
        expected = reference.score(photos)
        pixels = np.stack([reference.preprocess(p) for p in photos])
    for server in running(resmem_artifact, "--grpc-port", "0", "--device", "cpu", "--max-batch-size", "8", "--max-body-mb", "32"):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        by_image = client.infer("resmem", [image_input([p.read_bytes() for p in photos])]).as_numpy("score").reshape(-1)
        by_pixels = client.infer("resmem", [pixels_input(pixels)]).as_numpy("score").reshape(-1)
        client.close()
    assert len(photos) == (15 if SHARED_IMAGES.is_dir() else len(sample_images))
    np.testing.assert_allclose(by_image, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(by_pixels, expected, rtol=0, atol=1e-6)
