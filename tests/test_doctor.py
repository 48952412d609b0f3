"""doctor: which CPU paths the matrix units offer, which measurements it quotes, and what --measure times."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memexport.cli import app
from memexport.doctor import NO_MEASUREMENT, cpu_paths, cpu_report, environment_report, measure_plan, measure_this_cpu
from memexport.measured import MEASUREMENTS
from memexport.runtime.cpu import CpuUnits, cpu_units, parse_cpuinfo
from tests.conftest import have
from tests.models import write_tiny_scorer

ROOT = Path(__file__).resolve().parents[1]
CPUS = {
    "amx": "model name\t: Intel Xeon\nflags\t\t: avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n",
    "avx512-bf16": "model name\t: AMD EPYC\nflags\t\t: avx512f avx512_vnni avx512_bf16\n",
    "vnni": "model name\t: AMD EPYC\nflags\t\t: avx512f avx512_vnni\n",
    "basic": "model name\t: Xeon E5\nflags\t\t: avx2\n",
}


def units(kind: str) -> CpuUnits:
    parsed = parse_cpuinfo(CPUS[kind])
    assert parsed.kind == kind
    return parsed


def offered(kind: str) -> dict[tuple[str, str], str | None]:
    """Path -> the unit it uses, or None where the CPU does not offer it."""
    return {(p.backend, p.precision): p.uses if p.offered else None for p in cpu_paths(units(kind))}


@pytest.mark.parametrize("kind, bf16, int8_ir, int8_ort", [
    ("amx", "AMX-BF16", "AMX-INT8", True),
    ("avx512-bf16", "AVX512-BF16", "VNNI", True),
    ("vnni", None, "VNNI", True),
    ("basic", None, None, False),
])
def test_paths_offered_follow_the_matrix_units(kind, bf16, int8_ir, int8_ort):
    paths = offered(kind)
    assert paths[("onnxruntime", "fp32")] and paths[("openvino", "fp32")]  # FP32 everywhere
    assert paths[("openvino", "bf16")] == bf16
    assert paths[("openvino", "int8")] == int8_ir
    assert (paths[("onnxruntime", "int8")] is not None) == int8_ort


@pytest.mark.parametrize("kind", list(CPUS))
def test_quoted_figures_come_from_a_cpu_like_this_one_with_date_cpu_and_page(kind):
    report = cpu_report(units(kind))
    quoted = [(path, m) for path in report["paths"] for m in path["measured"]]
    for path, m in quoted:
        assert CpuUnits(m["cpu"], tuple(m["flags"])).kind == kind and m["cpu"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", m["date"]) and m["page"].startswith(f"docs/measurements/{m['date']}-")
        assert m["page"].endswith(".md") and re.fullmatch(r"\d+\.\d+(-\d+\.\d+)?x", m["ratio_to_onnxruntime_fp32"])
    table = [row for row in MEASUREMENTS if row.units.kind == kind]
    assert len(quoted) == len(table)  # every row for this kind is quoted, under its own path
    assert (report.get("measurements") == NO_MEASUREMENT) == (not table)


def test_an_amx_cpu_is_quoted_the_amx_measurements_and_no_other():
    report = cpu_report(units("amx"))
    bf16 = next(p for p in report["paths"] if (p["backend"], p["precision"]) == ("openvino", "bf16"))
    assert {m["date"] for m in bf16["measured"]} == {"2026-11-30", "2026-12-04"}
    assert all("amx_bf16" in m["flags"] for p in report["paths"] for m in p["measured"])
    assert "measurements" not in report and not cpu_report(units("basic"))["paths"][0]["measured"]


def test_every_measurement_row_is_dated_and_sourced():
    for row in MEASUREMENTS:
        assert row.page == f"docs/measurements/{row.date}-{Path(row.page).stem[len(row.date) + 1:]}.md" and row.cpu and row.flags
        assert 0 < row.low <= row.high


@pytest.mark.skipif(not (ROOT / "docs" / "measurements").is_dir(), reason="docs/measurements/ is not in this checkout yet")
def test_every_quoted_page_exists():
    missing = sorted({row.page for row in MEASUREMENTS if not (ROOT / row.page).is_file()})
    assert not missing, f"doctor quotes pages that do not exist: {missing}"


def test_report_names_this_cpu_and_its_units():
    report = environment_report()["cpu"]
    assert report["matrix_units"] == list(cpu_units().flags) and report["kind"] == cpu_units().kind
    assert [(p["backend"], p["precision"]) for p in report["paths"]] == [(p.backend, p.precision) for p in cpu_paths(cpu_units())]


def test_measure_plan_picks_the_paths_this_cpu_has():
    notes: list[str] = []
    fp32, u8s8, ir = Path("a/resmem.onnx"), Path("a/resmem.int8-cpu.onnx"), Path("a/resmem.int8-openvino.xml")
    amx = measure_plan([fp32, u8s8, ir], units("amx"), have_openvino=True)
    assert [(g.artifacts, g.backends, g.precisions) for g in amx] == [
        ((fp32,), ("onnxruntime", "openvino"), ("fp32", "bf16")), ((u8s8, ir), (), ())]
    vnni = measure_plan([fp32], units("vnni"), have_openvino=True)
    assert [(g.backends, g.precisions) for g in vnni] == [(("onnxruntime", "openvino"), ("fp32",))]
    bare = measure_plan([fp32, ir], units("amx"), have_openvino=False, note=notes.append)
    assert [(g.artifacts, g.backends, g.precisions) for g in bare] == [((fp32,), ("onnxruntime",), ("fp32",))]
    assert len(notes) == 2 and str(ir) in notes[0]


def test_measure_times_the_paths_this_cpu_has_through_bench(tmp_path):
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    # The tiny scorer under calibrate's INT8 name: timed once, on the back end its suffix picks.
    u8s8 = shutil.copy(model, tmp_path / "tiny.int8-cpu.onnx")
    result = measure_this_cpu([model, Path(u8s8)])
    expected = [("onnxruntime", "fp32", "tiny.onnx")]
    if have("openvino"):
        expected += [("openvino", "fp32", "tiny.onnx")] + ([("openvino", "bf16", "tiny.onnx")] if cpu_units().bf16 else [])
    expected += [("onnxruntime", "fp32", "tiny.int8-cpu.onnx")]
    assert [(r.backend, r.precision, Path(r.artifact).name) for r in result.records] == expected
    assert {(r.batch_size, r.iterations) for r in result.records} == {(result.options.batch_size, result.options.iterations)}
    rows = result.rows()
    assert rows[0]["reference"] and rows[0]["ratio_to_onnxruntime_fp32"] == 1.0
    assert [row["ratio_to_onnxruntime_fp32"] for row in rows] == pytest.approx([r.images_per_s / result.records[0].images_per_s for r in result.records])
    assert result.units == cpu_units() and result.seconds > 0


def test_cli_measure_prints_json_and_refuses_what_does_not_apply(tmp_path):
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    called = CliRunner().invoke(app, ["doctor", "--measure", "-m", str(model), "--json"])
    assert called.exit_code == 0, called.output
    report = json.loads(called.stdout)
    assert report["cpu"] == cpu_units().model and report["matrix_units"] == list(cpu_units().flags)
    assert report["paths"][0]["reference"] and len(report["paths"]) == 1 + (1 + cpu_units().bf16 if have("openvino") else 0)
    refused = CliRunner().invoke(app, ["doctor", "-m", str(model)])
    assert refused.exit_code == 2 and "--measure" in refused.stderr
    missing = CliRunner().invoke(app, ["doctor", "--measure", "-m", str(tmp_path / "none.onnx")])
    assert missing.exit_code == 2 and "none.onnx" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
