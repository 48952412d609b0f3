"""Several models behind one ``memexport serve``: each artifact under its served name (two of one model: the
non-FP32 one gets its precision appended, or ``-m NAME=PATH``), the V2 routes routing by name (an unknown
name is 404 with one line), metadata saying what each score means, ``/score`` answering every model per
file; over gRPC (``--grpc-port``) every model by name with REST's scores (unknown: NOT_FOUND); each model
its own configuration and statistics; clashing names refused in one line before anything listens. Tiny
scorers on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (test extra)")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (serve extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

from memexport.runtime.predictor import Predictor  # noqa: E402
from tests.models import write_tiny_scorer  # noqa: E402
from tests.serve.server import ROOT, image_tensor, multipart, running  # noqa: E402

# name -> (write_tiny_scorer arguments, what its score means as served)
MODELS = {
    "tiny-scorer": ({"output_meaning": "memorability"}, "memorability"),
    "tiny-scorer_int8": ({"precision": "int8", "sign": -1.0, "output_meaning": "memorability"}, "memorability"),
    "frm": ({"model": "falseresmem", "sign": 0.5}, "false-alarm probability"),  # no record: the spec's meaning
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {name: write_tiny_scorer(folder / f"{name}.onnx", **kwargs) for name, (kwargs, _) in MODELS.items()}


@pytest.fixture(scope="module")
def expected(artifacts, sample_images) -> dict[str, np.ndarray]:
    scores = {}
    for name, path in artifacts.items():
        with Predictor(path) as predictor:
            scores[name] = predictor.score(sample_images[:3])
    return scores


@pytest.fixture(scope="module")
def server(artifacts):
    yield from running(artifacts["tiny-scorer"], "-m", str(artifacts["tiny-scorer_int8"]), "-m", f"frm={artifacts['frm']}",
                       "--max-batch-size", "2", "--grpc-port", "0")


@pytest.fixture()
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def image_input(paths: list[Path], client=httpclient):
    return image_tensor(client, [p.read_bytes() for p in paths])


def test_each_model_answers_under_its_name_with_its_own_scores(server, expected, sample_images):
    client = httpclient.InferenceServerClient(server.url)
    try:
        assert client.is_server_ready()
        for name, (kwargs, meaning) in MODELS.items():
            assert client.is_model_ready(name)
            meta = client.get_model_metadata(name)
            assert meta["name"] == name and meta["properties"]["output_meaning"] == meaning
            assert meta["properties"]["model"] == kwargs.get("model", "tiny-scorer")
            assert meta["properties"]["precision"] == kwargs.get("precision", "fp32")
            result = client.infer(name, [image_input(sample_images[:3])])
            assert result.get_response()["model_name"] == name
            np.testing.assert_allclose(result.as_numpy("score").reshape(-1), expected[name], rtol=0, atol=1e-6)
    finally:
        client.close()
    assert np.abs(expected["tiny-scorer"] - expected["tiny-scorer_int8"]).min() > 1e-3  # routing is visible


def test_an_unknown_model_is_404_naming_the_served_ones(server):
    for method, path in (("GET", "/v2/models/resmem"), ("GET", "/v2/models/resmem/ready"), ("POST", "/v2/models/resmem/infer")):
        status, _, body = server.request(method, path, b"{}" if method == "POST" else None)
        message = json.loads(body)["error"]
        assert status == 404 and "\n" not in message
        assert message == "unknown model 'resmem'; this server serves 'tiny-scorer', 'tiny-scorer_int8', 'frm'"
    status, _, body = server.request("GET", "/v2/models/" + "x" * 5000)
    assert status == 404 and len(json.loads(body)["error"]) < 200  # the name is quoted cut short


def test_score_answers_every_model_per_file_naming_it_and_its_meaning(server, expected, sample_images, data_dir):
    files = [(p.name, p.read_bytes()) for p in sample_images[:3]]
    files.insert(1, ("broken.jpg", (data_dir / "china.jpg").read_bytes()[:500]))
    body, content_type = multipart(files)
    status, _, data = server.request("POST", "/score", body, headers={"Content-Type": content_type})
    rows = json.loads(data)
    assert status == 200 and len(rows) == len(files) * len(MODELS)
    assert [(row["file"], row["model"]) for row in rows] == [(name, model) for name, _ in files for model in MODELS]
    for row in rows:
        if row["file"] == "broken.jpg":
            assert "truncat" in row["error"] and "score" not in row
            continue
        index = [p.name for p in sample_images[:3]].index(row["file"])
        assert row["meaning"] == MODELS[row["model"]][1]
        assert abs(row["score"] - float(expected[row["model"]][index])) <= 1e-6


def test_grpc_routes_by_name_with_rest_s_scores(server, grpc, expected, sample_images):
    """``serve -m A -m B --grpc-port``: tritonclient.grpc scores each model by its served name, the very scores REST
    answers for the same request, each model's own (pieces of --max-batch-size 2 for 3 rows)."""
    rest = httpclient.InferenceServerClient(server.url)
    try:
        assert grpc.is_server_ready()
        for name in MODELS:
            assert grpc.is_model_ready(name) and grpc.get_model_metadata(name).name == name
            by_grpc = grpc.infer(name, [image_input(sample_images[:3], grpcclient)])
            by_rest = rest.infer(name, [image_input(sample_images[:3])])
            assert by_grpc.get_response().model_name == name
            np.testing.assert_array_equal(by_grpc.as_numpy("score").reshape(-1), by_rest.as_numpy("score").reshape(-1))
            np.testing.assert_allclose(by_grpc.as_numpy("score").reshape(-1), expected[name], rtol=0, atol=1e-6)
    finally:
        rest.close()


def test_an_unknown_model_over_grpc_is_not_found_naming_the_served_ones(grpc, sample_images):
    with pytest.raises(InferenceServerException) as caught:
        grpc.infer("resmem", [image_input(sample_images[:1], grpcclient)])
    assert str(caught.value.status()) == "StatusCode.NOT_FOUND"
    assert caught.value.message() == "unknown model 'resmem'; this server serves 'tiny-scorer', 'tiny-scorer_int8', 'frm'"
    for call in (lambda: grpc.get_model_metadata("resmem"), lambda: grpc.get_model_config("resmem"),
                 lambda: grpc.get_inference_statistics("resmem")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert str(caught.value.status()) == "StatusCode.NOT_FOUND"
    assert not grpc.is_model_ready("resmem")


def test_each_model_has_its_own_configuration(server, grpc, artifacts):
    for name, (kwargs, meaning) in MODELS.items():
        config = grpc.get_model_config(name).config
        assert (config.name, config.default_model_filename) == (name, artifacts[name].name)
        assert config.parameters["model"].string_value == kwargs.get("model", "tiny-scorer")
        assert config.parameters["output_meaning"].string_value == meaning
        status, rest = server.json("GET", f"/v2/models/{name}/config")
        assert status == 200 and rest["name"] == name and rest["default_model_filename"] == artifacts[name].name


def inference_counts(server) -> dict[str, tuple[int, int]]:
    """``GET /v2/models/stats``: each model's (images scored, successful requests)."""
    status, body = server.json("GET", "/v2/models/stats")
    assert status == 200
    return {entry["name"]: (entry["inference_count"], entry["inference_stats"]["success"]["count"]) for entry in body["model_stats"]}


def test_statistics_are_per_model(server, grpc, sample_images):
    """Each model its own recorder: a request counts only for the model it names (REST or gRPC), ``/score`` once for
    every model it answers; ``/v2/models/stats`` and gRPC's ``ModelStatistics`` with no name list every model."""
    before = inference_counts(server)
    assert list(before) == list(MODELS)
    rest = httpclient.InferenceServerClient(server.url)
    try:
        rest.infer("tiny-scorer", [image_input(sample_images[:3])])
    finally:
        rest.close()
    grpc.infer("tiny-scorer", [image_input(sample_images[:2], grpcclient)])
    grpc.infer("frm", [image_input(sample_images[:1], grpcclient)])
    body, content_type = multipart([(p.name, p.read_bytes()) for p in sample_images[:2]])
    assert server.request("POST", "/score", body, headers={"Content-Type": content_type})[0] == 200
    after = inference_counts(server)
    delta = {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in MODELS}
    assert delta == {"tiny-scorer": (3 + 2 + 2, 3), "tiny-scorer_int8": (2, 1), "frm": (1 + 2, 2)}
    listed = grpc.get_inference_statistics(as_json=True)["model_stats"]
    assert [entry["name"] for entry in listed] == list(MODELS)
    one = grpc.get_inference_statistics("tiny-scorer_int8", as_json=True)["model_stats"]
    assert [entry["name"] for entry in one] == ["tiny-scorer_int8"] and int(one[0]["inference_count"]) == after["tiny-scorer_int8"][0]


def test_clashing_names_are_refused_in_one_line_before_listening(artifacts):
    tiny = str(artifacts["tiny-scorer"])
    for extra, words in ((tiny, "would both be served as 'tiny-scorer'"), ("bad name=" + tiny, "is not a model name")):
        run = subprocess.run([sys.executable, "-m", "memexport", "serve", "-m", tiny, "-m", extra, "--port", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and words in run.stderr, run.stderr
        assert "listening" not in run.stdout + run.stderr
