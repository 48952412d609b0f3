"""The CLI end to end: predict, verify, bench, inspect, doctor, and user errors without tracebacks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from memexport.export.onnx_export import set_metadata
from memexport.runtime.metadata import metadata_from_map
from tests.conftest import have


def memexport(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memexport", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture()
def bad_inputs(tmp_path: Path, data_dir: Path) -> dict[str, Path]:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.jpg").write_bytes((data_dir / "china.jpg").read_bytes())
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("hello, not an image")
    jpeg = (data_dir / "flower.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    return {"folder": folder, "missing": tmp_path / "nowhere.jpg"}


def test_predict_scores_good_images_and_reports_every_bad_one(resmem_onnx, bad_inputs, reference_scores, tmp_path):
    out = tmp_path / "scores.csv"
    result = memexport("predict", str(bad_inputs["folder"]), str(bad_inputs["missing"]), "--model", str(resmem_onnx), "-o", str(out), "--device", "cpu")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["path", "model", "score", "backend", "precision", "decode"] and rows[1][1:2] + rows[1][3:] == ["resmem", "onnxruntime", "fp32", "exact"]
    scored = {Path(r[0]).name: float(r[2]) for r in rows[1:]}
    assert list(scored) == ["good.jpg"]
    assert scored["good.jpg"] == pytest.approx(reference_scores["china.jpg"], abs=1e-4)
    errors = {Path(r["path"]).name: r["error"] for r in csv.DictReader((tmp_path / "scores.errors.csv").open())}
    assert set(errors) == {"zero.jpg", "text.png", "truncated.jpg", "nowhere.jpg"}
    assert errors["zero.jpg"].startswith("empty") and errors["text.png"].startswith("not-an-image")
    assert errors["nowhere.jpg"].startswith("missing")
    assert "scored 1 images" in result.stdout and "with resmem (memorability)" in result.stdout and "(onnxruntime fp32, exact decode); 4 failed" in result.stdout


def test_predict_folder_is_recursive_and_sorted(resmem_onnx, data_dir, tmp_path):
    folder = tmp_path / "nested"
    (folder / "b").mkdir(parents=True)
    (folder / "a.jpg").write_bytes((data_dir / "china.jpg").read_bytes())
    (folder / "b" / "c.png").write_bytes((data_dir / "phantom.png").read_bytes())
    (folder / "b" / "notes.txt").write_text("skipped: not an image suffix")
    out = tmp_path / "s.csv"
    result = memexport("predict", str(folder), "-m", str(resmem_onnx), "-o", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert [Path(r["path"]).relative_to(folder).as_posix() for r in csv.DictReader(out.open())] == ["a.jpg", "b/c.png"]


def test_export_with_wrong_checkpoint_is_one_line(tmp_path):
    import torch

    bad = tmp_path / "wrong.pt"
    torch.save({"layer.weight": torch.zeros(3)}, bad)
    result = memexport("export", "resmem", "-o", str(tmp_path / "x.onnx"), "--weights", str(bad))
    assert result.returncode == 1
    assert_one_line_error(result, str(bad), "missing keys", "unexpected keys")
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_model_and_missing_artifact_are_usage_errors(tmp_path, sample_images):
    result = memexport("export", "alexnet", "-o", str(tmp_path / "x.onnx"))
    assert result.returncode == 2
    assert_one_line_error(result, "unknown model 'alexnet'")
    result = memexport("predict", str(sample_images[0]), "-m", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "s.csv"))
    assert result.returncode == 1
    assert_one_line_error(result, "none.onnx", "not found")


def test_verify_passes_for_the_export(resmem_onnx, data_dir, tmp_path):
    report = tmp_path / "report.json"
    result = memexport("verify", "--model", str(resmem_onnx), "--images", str(data_dir), "--json", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: PASS" in result.stdout
    data = json.loads(report.read_text())
    assert data["passed"] and data["max_abs"] <= 1e-4 and data["spearman"] >= 0.9999
    assert (data["backend"], data["precision"], data["artifact"]) == ("onnxruntime", "fp32", str(resmem_onnx))


@pytest.mark.slow
@pytest.mark.covers("resmem", "parity:bf16")
def test_verify_bf16_on_openvino_against_torch(resmem_onnx, data_dir, tmp_path):
    """OpenVINO BF16 within the spec's bf16 tolerance of the torch FP32 reference on tests/data."""
    from memexport.runtime.cpu import cpu_units

    if not have("openvino") or not cpu_units().bf16:
        pytest.skip("needs openvino and a CPU with a BF16 unit (amx_bf16 or avx512_bf16)")
    report = tmp_path / "report.json"
    args = ["verify", "--model", str(resmem_onnx), "--images", str(data_dir), "--backend", "openvino", "--precision", "bf16", "--json", str(report)]
    result = memexport(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "openvino bf16 vs torch fp32" in result.stdout and "spearman >= 0.999" in result.stdout
    data = json.loads(report.read_text())
    assert (data["backend"], data["precision"], data["passed"]) == ("openvino", "bf16", True)
    assert 1e-5 < data["max_abs"] <= 0.01 and data["tolerance"]["min_spearman"] == 0.999


def test_verify_failure_exits_1_and_prints_what_would_pass(resmem_onnx, data_dir, tmp_path):
    model = onnx.load(str(resmem_onnx))
    bias = next(t for t in model.graph.initializer if t.name == "fc12.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.5), "fc12.bias"))
    tampered = tmp_path / "shifted.onnx"
    # A deliberate re-weighting, not tampering: re-set the metadata so the stale integrity digest goes.
    set_metadata(model, metadata_from_map({p.key: p.value for p in model.metadata_props}, tampered))
    onnx.save(model, str(tampered))
    result = memexport("verify", "--model", str(tampered), "--images", str(data_dir))
    assert result.returncode == 1
    assert "result: FAIL" in result.stdout and "would pass with: max abs err <=" in result.stdout
    assert_one_line_error(result, "parity FAILED", "would pass with")


def test_bench_writes_the_documented_records(resmem_onnx, tmp_path):
    out = tmp_path / "bench.json"
    result = memexport("bench", "-m", str(resmem_onnx), "--batch-sizes", "1,2", "--iterations", "2", "--warmup", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())
    assert {(r["backend"], r["batch_size"]) for r in records} == {("onnxruntime", 1), ("onnxruntime", 2), ("torch", 1), ("torch", 2)}
    for record in records:
        assert {"backend", "precision", "batch_size", "p50_ms", "p90_ms", "p99_ms", "images_per_s"} <= set(record)
        assert record["p50_ms"] <= record["p90_ms"] <= record["p99_ms"] and record["images_per_s"] > 0
    assert "x torch" in result.stdout


def test_bench_rejects_bad_batch_sizes(resmem_onnx):
    result = memexport("bench", "-m", str(resmem_onnx), "--batch-sizes", "1,x")
    assert result.returncode == 2
    assert_one_line_error(result, "--batch-sizes")


def test_inspect_json_reads_the_embedded_metadata(resmem_onnx):
    result = memexport("inspect", str(resmem_onnx), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    model = onnx.load(str(resmem_onnx), load_external_data=False)
    meta = metadata_from_map({p.key: p.value for p in model.metadata_props}, resmem_onnx)
    assert info["model"] == meta.model == "resmem" and info["precision"] == "fp32" and info["opset"] == 17


def test_doctor_reports_backends_without_a_gpu():
    result = memexport("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    import onnxruntime

    assert report["onnxruntime_providers"] == onnxruntime.get_available_providers()
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))


def test_predict_several_models_decodes_once_names_each_and_resumes_per_model(tmp_path, data_dir):
    from tests.models import write_tiny_scorer

    resmem = write_tiny_scorer(tmp_path / "r.onnx", model="resmem")
    falseresmem = write_tiny_scorer(tmp_path / "f.onnx", model="falseresmem")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("china.jpg", "flower.jpg"):
        (folder / name).write_bytes((data_dir / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "s.csv"
    first = memexport("predict", str(folder / "china.jpg"), "-m", str(resmem), "-o", str(out), "--device", "cpu", "--decode", "fast")
    assert first.returncode == 0, first.stderr
    kept = list(csv.reader(out.open()))[1]
    # --decode fast given: on its own, --fast decodes FalseResMem (and so every model sharing its decode) exactly.
    both = ["predict", str(folder), "-m", str(resmem), "-m", str(falseresmem), "-o", str(out), "--device", "cpu", "--fast", "--backend", "onnxruntime",
            "--decode", "fast"]
    result = memexport(*both, "--resume")
    assert result.returncode == 1, result.stderr  # one bad image
    assert ("scored 2 images into " in result.stdout and " with resmem (memorability) on onnxruntime fp32, falseresmem (false-alarm probability) "
            "on onnxruntime fp32; fast decode; 1 failed" in result.stdout)
    assert "resmem: --fast: onnxruntime fp32, fast decode" in result.stdout and "falseresmem: --fast: onnxruntime fp32, fast decode" in result.stdout
    rows = list(csv.reader(out.open()))[1:]
    assert rows[0] == kept and sorted((Path(r[0]).name, r[1]) for r in rows) == [  # resmem's china.jpg row was not scored again
        ("china.jpg", "falseresmem"), ("china.jpg", "resmem"), ("flower.jpg", "falseresmem"), ("flower.jpg", "resmem")]
    assert {tuple(r[3:]) for r in rows} == {("onnxruntime", "fp32", "fast")}
    errors = list(csv.reader((tmp_path / "s.errors.csv").open()))[1:]
    assert [Path(r[0]).name for r in errors] == ["broken.jpg"]  # once, not once per model
    refused = memexport("predict", str(folder), "-m", str(resmem), "-o", str(out), "--device", "cpu", "--decode", "fast", "--resume")
    assert refused.returncode == 2
    assert_one_line_error(refused, "holds scores of falseresmem; this run scores resmem")
