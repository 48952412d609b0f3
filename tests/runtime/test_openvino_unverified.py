"""An INT8 OpenVINO IR whose guard verified BF16 outside its INT8 layers, on a CPU without a BF16 unit,
runs in FP32: a path nobody measured. It says so in one line and its scores are marked
``int8-unverified`` (runner, CSV precision column, summary, CLI)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memexport.cli import app
from memexport.runtime.base import RunnerOptions
from memexport.runtime.batch import PredictOptions, scores_csv_from_images
from memexport.runtime.cpu import CpuUnits
from memexport.runtime.registry import runner_for
from tests.conftest import needs_openvino
from tests.models import scorer_metadata, write_tiny_scorer
from tests.scoring import rows

CPU = RunnerOptions(device="cpu")
NO_BF16 = CpuUnits("AMD EPYC 7B12", ("avx512_vnni", "avx512f"))  # AVX-512 and VNNI, no BF16 unit, as /proc/cpuinfo lists them


def int8_ir(folder: Path, verified: str) -> Path:
    """A tiny scorer saved as an OpenVINO IR whose metadata says: INT8, guard verified with ``verified`` outside INT8."""
    import onnx
    import openvino as ov

    from memexport.export.onnx_export import set_metadata
    from memexport.runtime.integrity import seal_onnx

    path = write_tiny_scorer(folder / "tiny.int8-openvino.onnx", seal=False)
    proto = onnx.load(str(path))
    set_metadata(proto, dataclasses.replace(scorer_metadata(), precision="int8", extra={"inference_precision": verified}))
    onnx.save(proto, str(path))
    seal_onnx(path, [])
    xml = path.with_suffix(".xml")
    ov.save_model(ov.Core().read_model(str(path)), str(xml))
    return xml


@pytest.fixture()
def no_bf16_unit(monkeypatch):
    """This process's CPU, as the runner reads it, has no BF16 unit (the flags come from /proc/cpuinfo)."""
    from memexport.runtime import openvino_runner

    monkeypatch.setattr(openvino_runner, "cpu_units", lambda: NO_BF16)


@needs_openvino
def test_a_bf16_verified_int8_ir_on_a_cpu_without_bf16_is_marked_unverified(tmp_path, no_bf16_unit):
    xml = int8_ir(tmp_path, "bf16")
    with runner_for(xml, CPU) as runner:
        assert runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"  # what runs
        warning = runner.unverified
        assert runner.precision == "int8" and runner.recorded_precision == "int8-unverified"
        assert runner.describe()["unverified"] == warning
    assert warning and "\n" not in warning and warning.startswith("warning: tiny.int8-openvino.xml:")
    assert "BF16" in warning and "FP32" in warning and "no BF16 unit" in warning


@needs_openvino
def test_the_mark_reaches_the_csv_the_summary_and_the_cli(tmp_path, sample_images, no_bf16_unit):
    xml = int8_ir(tmp_path, "bf16")
    out = tmp_path / "scores.csv"
    summary = scores_csv_from_images(xml, sample_images[:3], out, PredictOptions(device="cpu", workers=0))
    assert (summary.backend, summary.precision) == ("openvino", "int8-unverified")
    assert len(summary.warnings) == 1 and "never measured" in summary.warnings[0]
    assert {tuple(row[3:5]) for row in rows(out)[1:]} == {("openvino", "int8-unverified")}
    called = CliRunner().invoke(app, ["predict", *map(str, sample_images[:2]), "-m", str(xml), "-o", str(tmp_path / "cli.csv"), "--device", "cpu"])
    assert called.exit_code == 0, called.output
    assert "(openvino int8-unverified, exact decode)" in called.output and "warning: tiny.int8-openvino.xml:" in called.output


@needs_openvino
def test_a_run_in_the_verified_precision_is_not_marked(tmp_path, no_bf16_unit):
    xml = int8_ir(tmp_path, "f32")  # verified in FP32: runs in FP32 everywhere
    with runner_for(xml, CPU) as runner:
        assert runner.unverified is None and runner.recorded_precision == "int8"
    with runner_for(write_tiny_scorer(tmp_path / "fp32.onnx"), CPU, "openvino") as runner:
        assert runner.unverified is None and runner.recorded_precision == "fp32"
