"""``predict`` over folders: real scores, every bad input reported, kill + resume, incremental output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from memexport.core.errors import Interrupted, UsageError
from memexport.runtime.batch import PredictOptions, errors_path_for, read_scores_file, scores_csv_from_images
from tests.scoring import expected_tiny, rows, write_copies
from tests.runtime.hostile_images import BAD_REASONS, GOOD_MODES, NON_UTF8_NAME, write_bad_inputs, write_good_modes, write_non_utf8

CPU = {"device": "cpu"}


def memexport(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memexport", *args], capture_output=True, timeout=600, **kwargs)


@pytest.fixture()
def copies(tmp_path, data_dir) -> Path:
    """300 distinct files holding one real photo: slow enough to kill mid-way, all with one known score."""
    return write_copies(tmp_path / "many", data_dir / "china.jpg", 300)


def test_mixed_folder_scores_good_images_and_lists_every_bad_one(resmem_onnx, data_dir, reference_scores, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in reference_scores:
        (folder / name).write_bytes((data_dir / name).read_bytes())
    write_bad_inputs(folder, data_dir, tmp_path / "outside")
    write_good_modes(folder)
    write_non_utf8(folder, data_dir)
    out = tmp_path / "scores.csv"
    result = memexport("predict", str(folder), str(folder / "china.jpg"), "-m", str(resmem_onnx), "-o", str(out), "--device", "cpu", "--batch-size", "8")
    stdout, stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert result.returncode == 1, stderr
    assert "Traceback" not in stdout + stderr
    scored = {os.fsencode(Path(r[0]).name): float(r[2]) for r in rows(out)[1:]}
    for name, reference in reference_scores.items():
        assert scored[name.encode()] == pytest.approx(reference, abs=1e-4), name
    assert scored[NON_UTF8_NAME] == pytest.approx(reference_scores["phantom.png"], abs=1e-4)
    assert set(scored) == {n.encode() for n in (*reference_scores, *GOOD_MODES)} | {NON_UTF8_NAME}
    assert all(0.0 <= v <= 1.0 for v in scored.values())
    errors = {Path(r[0]).name: r[1] for r in rows(errors_path_for(out))[1:]}
    assert {name: text.split(":")[0] for name, text in errors.items()} == BAD_REASONS
    failures = Counter(BAD_REASONS.values())
    assert f"scored {len(scored)} images" in stdout and f"{sum(failures.values())} failed" in stdout
    assert "1 duplicate inputs were scored once" in stdout


def test_killed_run_resumed_scores_every_image_exactly_once(tiny, copies, tmp_path):
    out = tmp_path / "scores.csv"
    args = ["predict", str(copies), "-m", str(tiny), "-o", str(out), "--device", "cpu", "--batch-size", "1", "--workers", "1"]
    process = subprocess.Popen([sys.executable, "-m", "memexport", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 31):  # header + 30 rows
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    before = rows(out)
    assert 30 <= len(before) - 1 < 300
    # A crash mid-write can cut the last row short: simulate it (drop its newline and two digits).
    with open(out, "r+b") as handle:
        handle.truncate(out.stat().st_size - 3)
    result = memexport(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert b"dropped a torn last row" in result.stdout and b"already scored" in result.stdout
    after = rows(out)
    assert after[0] == ["path", "model", "score", "backend", "precision", "decode"]
    assert {tuple(r[3:]) for r in after[1:]} == {("onnxruntime", "fp32", "exact")}
    names = [Path(r[0]).name for r in after[1:]]
    assert sorted(names) == sorted(p.name for p in copies.iterdir()) and len(names) == len(set(names)) == 300
    expected = expected_tiny(next(copies.iterdir()))
    assert all(float(r[2]) == pytest.approx(expected, abs=1e-6) for r in after[1:])


def test_sigterm_stops_with_exit_130_keeping_finished_rows(tiny, copies, tmp_path):
    out = tmp_path / "s.csv"
    args = ["predict", str(copies), "-m", str(tiny), "-o", str(out), "--device", "cpu", "--batch-size", "1", "--workers", "1"]
    process = subprocess.Popen([sys.executable, "-m", "memexport", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not out.exists() or out.read_bytes().count(b"\n") < 11:  # header + 10 rows
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert b"Traceback" not in stderr and b"--resume" in stderr
    kept = len(rows(out)) - 1
    assert 10 <= kept < 300
    assert read_scores_file(out).valid_bytes == out.stat().st_size  # no torn row after a clean stop


def test_ctrl_c_keeps_rows_and_errors_written_so_far(tiny, copies, tmp_path):
    (copies / "zzz_empty.jpg").write_bytes(b"")
    (copies / "aaa_empty.jpg").write_bytes(b"")
    out = tmp_path / "s.csv"
    seen: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        errors = errors_path_for(out)
        seen.append((done, len(rows(out)) - 1, len(rows(errors)) - 1 if errors.exists() else 0))
        if done >= 40:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as caught:
        scores_csv_from_images(tiny, [copies], out, PredictOptions(batch_size=8, workers=2, **CPU), progress)
    summary = caught.value.summary
    assert summary.interrupted and summary.scored == len(rows(out)) - 1 >= 40
    # Incremental: after each batch, its rows and its errors are already on disk.
    assert all(scored + errors == done for done, scored, errors in seen)
    assert seen[0][2] == 1  # aaa_empty.jpg sorts first: reported with the first batch
    summary = scores_csv_from_images(tiny, [copies], out, PredictOptions(batch_size=8, resume=True, **CPU))
    assert summary.skipped >= 40 and summary.failures == Counter({"empty": 2})
    assert len(rows(out)) - 1 == 300 and len({r[0] for r in rows(out)[1:]}) == 300


def test_parallel_decoding_matches_inline_decoding(tiny, copies, data_dir, tmp_path):
    for name in ("flower.jpg", "logo.png", "chessboard_GRAY.png"):
        (copies / name).write_bytes((data_dir / name).read_bytes())
    inline, parallel = tmp_path / "inline.csv", tmp_path / "parallel.csv"
    scores_csv_from_images(tiny, [copies], inline, PredictOptions(batch_size=7, workers=0, **CPU))
    scores_csv_from_images(tiny, [copies], parallel, PredictOptions(batch_size=7, workers=4, **CPU))
    assert inline.read_bytes() == parallel.read_bytes()
    got = {Path(r[0]).name: float(r[2]) for r in rows(parallel)[1:]}
    assert got["flower.jpg"] == pytest.approx(expected_tiny(data_dir / "flower.jpg"), abs=1e-6)


def test_existing_output_is_never_wiped_by_accident(tiny, copies, tmp_path):
    out = tmp_path / "s.csv"
    out.write_text("path,score\nkeep.jpg,0.5\n")
    result = memexport("predict", str(copies / "img_0000.jpg"), "-m", str(tiny), "-o", str(out), "--device", "cpu")
    assert result.returncode == 2 and b"--resume" in result.stderr and b"Traceback" not in result.stderr
    assert out.read_text() == "path,score\nkeep.jpg,0.5\n"
    result = memexport("predict", str(copies / "img_0000.jpg"), "-m", str(tiny), "-o", str(out), "--device", "cpu", "--overwrite")
    assert result.returncode == 0 and [Path(r[0]).name for r in rows(out)[1:]] == ["img_0000.jpg"]


def test_resume_reader_drops_only_a_torn_tail(tmp_path):
    out = tmp_path / "s.csv"
    good = 'path,score\na.jpg,0.25000000\n"we\nird,name.jpg",0.50000000\n'
    for tail in ("b.jpg,0.12", '"c\n', "b.jpg", "b.jpg,0.75000000"):  # a torn row never ends in \n
        out.write_text(good + tail, newline="")
        state = read_scores_file(out)
        assert state.valid_bytes == len(good.encode()) and len(state.keys) == 2
    out.write_text(good + "garbage row,not a score\nc.jpg,0.1\n", newline="")
    with pytest.raises(UsageError, match="row 4"):
        read_scores_file(out)
    out.write_text("name,value\na.jpg,0.2\n")
    with pytest.raises(UsageError, match="not a memexport scores file"):
        scores_csv_from_images(tmp_path / "any.onnx", [], out, PredictOptions(resume=True, **CPU))


def test_tampered_model_is_refused_before_scoring(tiny, copies, tmp_path):
    model = tmp_path / "tampered.onnx"
    data = bytearray(tiny.read_bytes())
    index = data.find(np.float32(1.5).tobytes())
    data[index : index + 4] = np.float32(1.6).tobytes()
    model.write_bytes(bytes(data))
    result = memexport("predict", str(copies), "-m", str(model), "-o", str(tmp_path / "s.csv"), "--device", "cpu")
    assert result.returncode == 1 and b"Traceback" not in result.stderr
    assert b"tampered.onnx" in result.stderr and b"does not match" in result.stderr
    assert not (tmp_path / "s.csv").exists()
    result = memexport("predict", str(copies / "img_0000.jpg"), "-m", str(model), "-o", str(tmp_path / "s.csv"), "--device", "cpu", "--no-integrity-check")
    assert result.returncode == 0


def test_rows_name_the_back_end_and_precision_and_resume_never_mixes_them(tiny, copies, tmp_path, onnx_backend):
    backend = onnx_backend
    out = tmp_path / "s.csv"
    first = [copies / "img_0000.jpg", copies / "img_0001.jpg"]
    scores_csv_from_images(tiny, first, out, PredictOptions(backend=backend, **CPU))
    assert rows(out)[0] == ["path", "model", "score", "backend", "precision", "decode"]
    assert [r[3:] for r in rows(out)[1:]] == [[backend, "fp32", "exact"]] * 2
    other = "openvino" if backend == "onnxruntime" else "onnxruntime"
    with pytest.raises(UsageError, match=rf"s\.csv holds scores computed by {backend} fp32, exact decode; this run computes {other} fp32, exact decode"):
        scores_csv_from_images(tiny, [copies / "img_0002.jpg"], out, PredictOptions(backend=other, resume=True, **CPU))
    summary = scores_csv_from_images(tiny, [*first, copies / "img_0002.jpg"], out, PredictOptions(backend=backend, resume=True, **CPU))
    assert (summary.skipped, summary.scored, summary.backend, summary.precision) == (2, 1, backend, "fp32")
    assert [r[3:] for r in rows(out)[1:]] == [[backend, "fp32", "exact"]] * 3


def test_an_older_path_score_file_resumes_in_its_own_columns(tiny, copies, tmp_path):
    out = tmp_path / "s.csv"
    out.write_text(f"path,score\n{copies / 'img_0000.jpg'},0.50000000\n")
    summary = scores_csv_from_images(tiny, [copies / "img_0000.jpg", copies / "img_0001.jpg"], out, PredictOptions(resume=True, **CPU))
    assert (summary.skipped, summary.scored) == (1, 1)
    assert [len(r) for r in rows(out)] == [2, 2, 2]
