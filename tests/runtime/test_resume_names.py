"""``resume`` matches the same files whatever the working directory and whatever bytes their names hold,
for the CSV and for Parquet parts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memexport.runtime.batch import PredictOptions, PredictSummary, plan_job, scores_csv_from_images
from tests.runtime.hostile_images import NON_UTF8_NAME, write_non_utf8
from tests.scoring import rows

CPU = {"device": "cpu", "workers": 0}


@pytest.fixture()
def photos(tmp_path, data_dir) -> Path:
    """A folder with two photos, one of them under a name that is not valid UTF-8."""
    folder = tmp_path / "work" / "photos"
    folder.mkdir(parents=True)
    (folder / "china.jpg").write_bytes((data_dir / "china.jpg").read_bytes())
    write_non_utf8(folder, data_dir)
    return folder


def test_resume_from_another_working_directory_scores_nothing_again(tiny, photos, tmp_path, monkeypatch):
    out = tmp_path / "scores.csv"
    monkeypatch.chdir(photos.parent)  # score `photos/` relative to its parent...
    first = scores_csv_from_images(tiny, [Path("photos")], out, PredictOptions(**CPU))
    assert first.scored == 2
    monkeypatch.chdir(tmp_path)  # ...and resume as `work/photos` from one folder up
    resumed = scores_csv_from_images(tiny, [Path("work/photos")], out, PredictOptions(resume=True, **CPU))
    assert (resumed.skipped, resumed.scored) == (2, 0)
    names = [os.fsencode(row[0]) for row in rows(out)[1:]]
    assert len(names) == 2 and all(Path(os.fsdecode(name)).is_absolute() for name in names)


def test_csv_resume_matches_a_name_that_is_not_utf8(tiny, photos, tmp_path):
    out = tmp_path / "scores.csv"
    scores_csv_from_images(tiny, [photos], out, PredictOptions(**CPU))
    assert NON_UTF8_NAME in {os.fsencode(Path(row[0]).name) for row in rows(out)[1:]}
    resumed = scores_csv_from_images(tiny, [photos], out, PredictOptions(resume=True, **CPU))
    assert (resumed.skipped, resumed.scored) == (2, 0)


def test_parquet_resume_matches_a_name_that_is_not_utf8(photos, tmp_path):
    pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow: pip install 'memexport[ray]'")
    import pyarrow.parquet as pq

    from memexport.distributed.ray import ParquetScores, prepare_parquet

    out = tmp_path / "scores.parquet"
    names = sorted(str(path) for path in photos.iterdir())
    parts = ParquetScores(out)  # what the Ray driver writes as blocks arrive: each row with its model and run
    parts.write([(name, 0.5, "tiny-scorer", ("onnxruntime", "fp32", "exact")) for name in names])
    table = pq.read_table(out)
    assert any("\\xe9" in path for path in table.column("path").to_pylist())  # readable for people
    summary = PredictSummary()
    _, _, todo = plan_job([photos], out, PredictOptions(resume=True), summary, prepare_parquet)
    assert (todo, summary.skipped) == ([], 2)
