"""``memexport triton-repo``: repositories that Triton's own config parser accepts, cross-checked offline,
and ``--check`` failing with one line naming the file and the field for each mistake a user can edit in."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from memexport.cli import app
from memexport.core.errors import BackendUnavailableError, UsageError
from memexport.runtime.preprocess import preprocess
from memexport.runtime.triton_python import decode_rows
from memexport.triton.writer import TritonOptions, triton_repo_from_artifacts
from memexport.triton.check import ModelRepositoryError, check_triton_repo, parse_config, tensors
from tests.conftest import have, needs_openvino
from tests.models import scorer_metadata, write_tiny_scorer

pytestmark = pytest.mark.skipif(not have("tritonclient"), reason="tritonclient is not installed (pip install 'memexport[triton]')")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture(scope="module")
def split_tiny(tmp_path_factory) -> Path:
    """The tiny scorer with its weights in an external-data file (the pair must travel together)."""
    return write_tiny_scorer(tmp_path_factory.mktemp("split") / "tiny.onnx", external_data=True)


def config(repo: Path, name: str):
    return parse_config(repo / name / "config.pbtxt")


def test_onnx_repo_parses_passes_the_cross_checks_and_has_the_serve_interface(tmp_path, split_tiny):
    repo = tmp_path / "repo"
    names = triton_repo_from_artifacts([split_tiny], repo, TritonOptions(max_batch_size=8, instances=2))
    assert names == ["tiny-scorer", "tiny-scorer_preprocess", "tiny-scorer_onnx"]
    assert sorted(check_triton_repo(repo)) == sorted(names)
    ensemble = config(repo, "tiny-scorer")
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 8
    assert tensors(ensemble, "input") == {"image": ("TYPE_STRING", (1,))}
    assert tensors(ensemble, "output") == {"score": ("TYPE_FP32", (1,))}
    scorer = config(repo, "tiny-scorer_onnx")
    assert scorer.backend == "onnxruntime" and scorer.instance_group[0].count == 2
    assert tensors(scorer, "input") == {"image": ("TYPE_FP32", (3, 227, 227))}
    # The tiny scorer outputs one value per image ([batch]): served as [1], reshaped to the graph's [].
    assert tuple(scorer.output[0].reshape.shape) == () and scorer.output[0].HasField("reshape")
    assert max(scorer.dynamic_batching.preferred_batch_size) <= 8 and len(scorer.model_warmup) == 2
    version = repo / "tiny-scorer_onnx" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]
    for name in ("tiny.onnx", "tiny.onnx.data"):  # hard-linked (same file system) or copied, byte for byte
        assert (version / name).read_bytes() == (split_tiny.parent / name).read_bytes()
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "tritonclient.http" in readme


def test_two_artifacts_of_one_model_get_the_names_serve_gives_them(tmp_path, tiny):
    """FP32 and INT8 of one model: ``tiny-scorer`` and ``tiny-scorer_int8``; ``NAME=PATH`` names one; each ensemble
    records its model, precision and what its score means; the whole repository passes the checks."""
    int8 = write_tiny_scorer(tmp_path / "tiny.int8.onnx", precision="int8", sign=-1.0, output_meaning="memorability")
    repo = tmp_path / "repo"
    result = CliRunner().invoke(app, ["triton-repo", "-m", str(tiny), "-m", str(int8), "-m", f"third={tiny}", "-o", str(repo)])
    assert result.exit_code == 0, result.output
    names = ["tiny-scorer", "tiny-scorer_int8", "third"]
    assert sorted(check_triton_repo(repo)) == sorted(f"{n}{suffix}" for n in names for suffix in ("", "_preprocess", "_onnx"))
    for name, precision, meaning in zip(names, ("fp32", "int8", "fp32"), ("score", "memorability", "score")):
        ensemble = config(repo, name)
        assert [step.model_name for step in ensemble.ensemble_scheduling.step] == [f"{name}_preprocess", f"{name}_onnx"]
        assert {k: v.string_value for k, v in ensemble.parameters.items()} == {
            "MEMEXPORT_MODEL": "tiny-scorer", "MEMEXPORT_PRECISION": precision, "MEMEXPORT_OUTPUT_MEANING": meaning}
    assert (repo / "tiny-scorer_int8_onnx" / "1" / int8.name).read_bytes() == int8.read_bytes()
    clash = CliRunner().invoke(app, ["triton-repo", "-m", str(tiny), "-m", f"tiny-scorer_preprocess={int8}", "-o", str(tmp_path / "x")])
    assert clash.exit_code == 2 and "model folder 'tiny-scorer_preprocess'" in clash.output and not (tmp_path / "x").exists()


def test_the_preprocess_model_imports_memexport_and_carries_the_artifacts_preprocessing(tmp_path, tiny):
    repo = tmp_path / "repo"
    triton_repo_from_artifacts([tiny], repo, TritonOptions(sys_path=("/opt/memexport-env/site-packages",)))
    model_py = (repo / "tiny-scorer_preprocess" / "1" / "model.py").read_text()
    assert "from memexport.runtime.triton_python import PreprocessModel" in model_py and "def preprocess_image" not in model_py
    pre = config(repo, "tiny-scorer_preprocess")
    assert pre.backend == "python" and pre.parameters["MEMEXPORT_SYS_PATH"].string_value == "/opt/memexport-env/site-packages"
    assert tensors(pre, "output") == {"pixels": ("TYPE_FP32", (3, 227, 227))}
    compile(model_py, "model.py", "exec")  # valid Python as written


def test_decode_rows_matches_predict_preprocessing_and_reports_every_bad_row(sample_images):
    rows = [sample_images[0].read_bytes(), b"not an image", sample_images[1].read_bytes(), sample_images[0].read_bytes()[:300], b""]
    batch, errors = decode_rows(rows, scorer_metadata().preprocess)
    assert batch is None and [line.split(":")[0] for line in errors] == ["row 1", "row 3", "row 4"]
    assert all("\n" not in line for line in errors) and "not a recognised image" in errors[0]
    good, none = decode_rows([np.array([p.read_bytes()], dtype=object) for p in sample_images[:3]], scorer_metadata().preprocess)
    assert none == [] and good.shape == (3, 3, 227, 227)
    np.testing.assert_array_equal(good[2], preprocess(sample_images[2], scorer_metadata().preprocess))


def test_fp16_onnx_on_gpu_gets_the_tensorrt_accelerator_with_its_engine_cache(tmp_path, tiny):
    pytest.importorskip("onnx")
    from memexport.export.fp16 import fp16_onnx_from_onnx

    fp16 = tmp_path / "tiny.fp16.onnx"
    fp16_onnx_from_onnx(tiny, fp16)
    repo = tmp_path / "repo"
    options = TritonOptions(device="gpu", tensorrt="fp16", trt_cache="/var/cache/trt")
    triton_repo_from_artifacts([fp16], repo, options)
    check_triton_repo(repo)
    scorer = config(repo, "tiny-scorer_onnx")
    assert scorer.instance_group[0].kind == 1  # KIND_GPU
    accelerator = scorer.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt"
    params = dict(accelerator.parameters)
    assert {k: params.get(k) for k in ("precision_mode", "trt_engine_cache_enable", "trt_engine_cache_path")} == {
        "precision_mode": "FP16", "trt_engine_cache_enable": "1", "trt_engine_cache_path": "/var/cache/trt"}


@needs_openvino
def test_int8_openvino_ir_is_served_in_the_precision_its_guard_verified(tmp_path):
    import openvino as ov

    from memexport.calibration.openvino_int8 import save_openvino_artifact

    meta = dataclasses.replace(scorer_metadata(), precision="int8").with_extra(inference_precision="bf16")
    model = ov.Core().read_model(str(write_tiny_scorer(tmp_path / "src.onnx")))
    xml = save_openvino_artifact(model, meta, tmp_path / "tiny.int8-openvino.xml")
    repo = tmp_path / "repo"
    triton_repo_from_artifacts([xml], repo)
    check_triton_repo(repo)
    scorer = config(repo, "tiny-scorer_openvino")
    assert scorer.backend == "openvino" and scorer.default_model_filename == xml.name
    assert scorer.parameters["HINT_BF16"].string_value == "YES" and scorer.parameters["MEMEXPORT_PRECISION"].string_value == "int8"
    assert sorted(p.name for p in (repo / "tiny-scorer_openvino" / "1").iterdir()) == [xml.with_suffix(".bin").name, xml.name]


def test_tensorrt_plan_records_where_it_runs_and_caps_the_batch_at_its_profile(tmp_path):
    from tests.runtime.test_tensorrt_runner import write_engine

    plan = write_engine(tmp_path, tensorrt="10.3.0", gpu="NVIDIA L4", cc="8.9", max_batch=4)
    repo = tmp_path / "repo"
    triton_repo_from_artifacts([plan], repo, TritonOptions(max_batch_size=16))
    check_triton_repo(repo)
    scorer = config(repo, "tiny_plan")
    assert scorer.platform == "tensorrt_plan" and scorer.max_batch_size == 4 and scorer.instance_group[0].kind == 1
    assert scorer.parameters["MEMEXPORT_TENSORRT_VERSION"].string_value == "10.3.0"
    assert "NVIDIA L4" in scorer.parameters["MEMEXPORT_GPU"].string_value and "only runs" in scorer.parameters["MEMEXPORT_NOTE"].string_value
    assert tensors(scorer, "input") == {"image": ("TYPE_FP32", (3, 32, 32))}


def test_writing_without_the_triton_extra_is_one_line_and_replaces_nothing(tmp_path, tiny, monkeypatch):
    """The configs are Triton's ModelConfig messages: without tritonclient the writer stops before touching the folder."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("mine")
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.model_config_pb2", None)  # import -> ImportError
    with pytest.raises(BackendUnavailableError) as caught:
        triton_repo_from_artifacts([tiny], repo, overwrite=True)
    assert str(caught.value) == ("writing a Triton config.pbtxt needs tritonclient.grpc.model_config_pb2, which is not installed; "
                                 "install it with pip install 'memexport[triton]'")
    assert sorted(p.name for p in repo.iterdir()) == ["keep.txt"] and (repo / "keep.txt").read_text() == "mine"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


MISTAKES = {
    # (file, text, replacement, words the one line must hold: the field)
    "misspelt field": ("tiny-scorer_onnx", "max_batch_size: 16", "max_batch_sise: 16", "max_batch_sise"),
    "dim off by one": ("tiny-scorer_onnx", "dims: [3, 227, 227]", "dims: [3, 227, 226]", "input 'image' dims"),
    "wrong ensemble key": ("tiny-scorer", 'key: "image"\n      value: "pixels"', 'key: "input"\n      value: "pixels"', "input_map: key 'input'"),
    "preferred batch over the max": ("tiny-scorer_preprocess", "preferred_batch_size: [4, 8, 16]", "preferred_batch_size: [4, 8, 32]", "preferred_batch_size"),
    "folder and name differ": ("tiny-scorer_preprocess", 'name: "tiny-scorer_preprocess"', 'name: "preprocess"', "name: 'preprocess'"),
    "wrong data type": ("tiny-scorer_onnx", "data_type: TYPE_FP32\n  dims: [3, 227, 227]", "data_type: TYPE_FP16\n  dims: [3, 227, 227]", "data_type"),
    "bad enum": ("tiny-scorer_onnx", "kind: KIND_CPU", "kind: KIND_TPU", "KIND_TPU"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_check_fails_with_one_line_naming_the_file_and_the_field(tmp_path, tiny, mistake):
    repo = tmp_path / "repo"
    triton_repo_from_artifacts([tiny], repo)
    model, old, new, field = MISTAKES[mistake]
    edit(repo / model / "config.pbtxt", old, new)
    with pytest.raises(ModelRepositoryError) as caught:
        check_triton_repo(repo)
    assert len(caught.value.problems) == 1, caught.value.problems
    line = caught.value.problems[0]
    assert str(repo / model / "config.pbtxt") in line and field in line and "\n" not in line
    result = CliRunner().invoke(app, ["triton-repo", "--check", str(repo)])
    assert result.exit_code == 1 and result.output.strip() == f"error: {line}"


def test_check_finds_missing_files_per_back_end(tmp_path, split_tiny):
    repo = tmp_path / "repo"
    triton_repo_from_artifacts([split_tiny], repo)
    (repo / "tiny-scorer_onnx" / "1" / "tiny.onnx.data").unlink()
    (repo / "tiny-scorer_preprocess" / "1" / "model.py").unlink()
    with pytest.raises(ModelRepositoryError) as caught:
        check_triton_repo(repo)
    text = "\n".join(caught.value.problems)
    assert "tiny.onnx.data" in text and "model.py" in text


def test_cli_writes_a_python_scorer_repo_and_refuses_bad_requests(tmp_path, tiny):
    repo = tmp_path / "repo"
    result = CliRunner().invoke(app, ["triton-repo", "-m", str(tiny), "-o", str(repo), "--python-scorer", "--max-batch-size", "4",
                                      "--sys-path", "/a", "--sys-path", "/b"])
    assert result.exit_code == 0, result.output
    scorer = config(repo, "tiny-scorer_python")
    assert scorer.backend == "python" and scorer.parameters["MEMEXPORT_ARTIFACT"].string_value == "tiny.onnx"
    assert scorer.parameters["MEMEXPORT_SYS_PATH"].string_value == os.pathsep.join(["/a", "/b"])
    assert "ScorerModel" in (repo / "tiny-scorer_python" / "1" / "model.py").read_text()
    assert CliRunner().invoke(app, ["triton-repo", "--check", str(repo)]).exit_code == 0
    again = CliRunner().invoke(app, ["triton-repo", "-m", str(tiny), "-o", str(repo)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    with pytest.raises(UsageError, match="would both be served as 'tiny-scorer'"):
        triton_repo_from_artifacts([tiny, tiny], tmp_path / "two")
    assert not (tmp_path / "two").exists()
    with pytest.raises(UsageError, match="--device gpu"):
        TritonOptions(tensorrt="fp16")


@pytest.mark.slow
@pytest.mark.skipif(not (ARTIFACTS / "resmem.onnx").is_file(), reason="artifacts/resmem.onnx is not there (make demo)")
def test_repositories_for_the_real_artifacts_pass_the_checks(tmp_path):
    """The FP32 ResMem ONNX, and the INT8 OpenVINO IR from the default calibration when it has been built."""
    artifacts = [ARTIFACTS / "resmem.onnx"]
    ir = ARTIFACTS / "int8" / "resmem.int8-openvino.xml"
    if ir.is_file() and have("openvino"):
        artifacts.append(ir)
    for index, artifact in enumerate(artifacts):
        repo = tmp_path / f"repo{index}"
        triton_repo_from_artifacts([artifact], repo)
        assert sorted(check_triton_repo(repo))[0] == "resmem"
        assert tensors(config(repo, "resmem"), "output") == {"score": ("TYPE_FP32", (1,))}


class FakePbUtils:
    """The slice of Triton's ``triton_python_backend_utils`` the generated models use, for runs without a server."""

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class TritonError:
        def __init__(self, message):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.get(name)


def model_args(repo: Path, name: str) -> dict[str, str]:
    """The ``args`` Triton passes to ``initialize``: the config as JSON, as Triton renders it."""
    from google.protobuf import json_format

    rendered = json_format.MessageToDict(config(repo, name), preserving_proto_field_name=True)
    return {"model_config": json.dumps(rendered), "model_repository": str(repo / name), "model_version": "1"}


def test_the_python_models_score_request_batches_as_predict_does(tmp_path, tiny, sample_images):
    from memexport import Predictor
    from memexport.runtime.triton_python import PreprocessModel, ScorerModel

    repo = tmp_path / "repo"
    triton_repo_from_artifacts([tiny], repo, TritonOptions(python_scorer=True))
    pre = PreprocessModel(FakePbUtils, model_args(repo, "tiny-scorer_preprocess"))
    scorer = ScorerModel(FakePbUtils, model_args(repo, "tiny-scorer_python"))
    try:
        rows = [np.array([[p.read_bytes()] for p in group], dtype=object) for group in (sample_images[:3], sample_images[3:5])]
        bad = np.array([[sample_images[0].read_bytes()], [b"junk"]], dtype=object)
        answers = pre.execute([{"image": FakePbUtils.Tensor("image", r)} for r in (rows[0], bad, rows[1])])
        assert answers[1].output_tensors == [] and answers[1].error.message.startswith("row 1: ")
        pixels = [{"image": FakePbUtils.Tensor("image", a.output_tensors[0].array)} for a in (answers[0], answers[2])]
        scores = [r.output_tensors[0].array for r in scorer.execute(pixels)]  # two requests, one inference
        assert [s.shape for s in scores] == [(3,), (2,)]  # the config reshapes [] to [1] for clients
        with Predictor(tiny) as predictor:
            np.testing.assert_array_equal(np.concatenate(scores), predictor.score(sample_images[:5]))
    finally:
        scorer.finalize()
