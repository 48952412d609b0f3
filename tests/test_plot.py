"""bench --plot and --csv: the figure is drawn from the records, the CSV reads back as them."""

from __future__ import annotations

import sys
from dataclasses import fields, replace

import pytest
from typer.testing import CliRunner

from memexport.bench import BenchRecord
from memexport.cli import app
from memexport.plot import NO_FIDELITY, csv_from_records, path_label, plot_from_records, plot_points, records_from_csv
from tests.conftest import have
from tests.models import write_tiny_scorer

needs_matplotlib = pytest.mark.skipif(not have("matplotlib"), reason="the plot extra is not installed (pip install 'memexport[plot]')")

CPU, FLAGS = "Test CPU 9000", ("avx512_bf16", "avx512_vnni")


def record(backend: str, precision: str, ips: float, spearman: float | None, artifact: str = "m/resmem.onnx", batch: int = 16,
           option: str | None = None, keeps: bool | None = True) -> BenchRecord:
    p50 = 1000.0 * batch / ips
    return BenchRecord(
        model="resmem", artifact=artifact, backend=backend, precision=precision, device="cpu", batch_size=batch,
        p50_ms=p50, p90_ms=p50 * 1.1, p99_ms=p50 * 1.3, images_per_s=ips, peak_rss_mb=900.0, iterations=3,
        precision_option=option, cpu=CPU, cpu_units=FLAGS, fidelity_images=None if spearman is None else 8,
        spearman=spearman, kendall=None if spearman is None else spearman - 0.01, mean_abs=None if spearman is None else 1e-3,
        max_abs=None if spearman is None else 3e-3, keeps_ranking=None if spearman is None else keeps,
    )


def bench_records() -> list[BenchRecord]:
    return [
        record("onnxruntime", "fp32", 14.0, 1.0),
        record("openvino", "fp32", 14.5, 1.0, option="fp32"),
        record("openvino", "bf16", 30.0, 0.9999, option="bf16"),
        record("openvino", "int8", 50.0, 0.9938, artifact="m/int8/resmem.int8-openvino.xml", option="bf16"),
        record("onnxruntime", "int8", 40.0, 0.95, artifact="m/int8/resmem.int8-cpu.onnx", keeps=False),
        record("torch", "fp32", 8.0, None, artifact="torch:resmem"),
    ]


def figure_texts(figure) -> str:
    texts = [t.get_text() for t in figure.texts] + [figure._suptitle.get_text()]
    for ax in figure.axes:
        texts += [t.get_text() for t in ax.texts] + [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
        legend = ax.get_legend()
        texts += [t.get_text() for t in legend.get_texts()] if legend else []
    return "\n".join(texts)


def check_png(path) -> tuple[int, int]:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


@needs_matplotlib
def test_the_figure_is_drawn_from_the_records(tmp_path):
    records = bench_records()
    out = tmp_path / "bench.png"
    figure = plot_from_records(records, out)
    width, height = check_png(out)
    assert 1000 <= width <= 2500 and 500 <= height <= 1500 and out.stat().st_size > 20_000
    speed, latency = figure.axes[:2]
    # Every path with a Spearman is one marker at (Spearman, images/s); the reference is the star.
    drawn = sorted(tuple(map(float, c.get_offsets()[0])) for c in speed.collections)
    assert drawn == sorted((r.spearman, r.images_per_s) for r in records if r.spearman is not None)
    star = next(c for c in speed.collections if tuple(c.get_offsets()[0]) == (1.0, 14.0))
    assert star.get_sizes()[0] > max(c.get_sizes()[0] for c in speed.collections if c is not star)
    # torch eager has no Spearman: a dashed line at its speed.
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == 8.0 for line in speed.lines)
    # The latency panel: one bar per path, its p50, in the legend's order (path 1 on top).
    assert [bar.get_width() for bar in latency.patches] == pytest.approx([r.p50_ms for r in records])
    assert latency.patches[0].get_y() > latency.patches[-1].get_y()
    text = figure_texts(figure)
    assert CPU in text and " ".join(FLAGS) in text
    for r in records:
        assert path_label(r) in text
    assert "OpenVINO INT8, rest BF16 · INT8 IR" in text and "ONNX Runtime FP32 · ONNX (reference)" in text
    assert NO_FIDELITY not in text


@needs_matplotlib
def test_without_fidelity_it_plots_speed_and_says_so(tmp_path):
    records = [replace(r, spearman=None, kendall=None, keeps_ranking=None, fidelity_images=None) for r in bench_records()]
    figure = plot_from_records(records, tmp_path / "speed.png")
    check_png(tmp_path / "speed.png")
    speed = figure.axes[0]
    assert not speed.collections and speed.get_title() == NO_FIDELITY
    assert [bar.get_width() for bar in speed.patches] == [r.images_per_s for r in records]


def test_one_point_per_path_at_its_largest_batch_with_its_ratio():
    records = bench_records()
    small = [replace(r, batch_size=1, images_per_s=r.images_per_s / 2) for r in records]
    points = plot_points(small + records)
    assert [p.label for p in points] == [path_label(r) for r in records] and {p.batch_size for p in points} == {16}
    assert [p.ratio for p in points] == pytest.approx([r.images_per_s / 14.0 for r in records])
    assert [p.reference for p in points] == [True] + [False] * (len(records) - 1)


def test_csv_round_trips_the_records(tmp_path):
    records = bench_records()
    csv_from_records(records, tmp_path / "bench.csv")
    header = (tmp_path / "bench.csv").read_text().splitlines()[0].split(",")
    assert header == [f.name for f in fields(BenchRecord)]
    assert records_from_csv(tmp_path / "bench.csv") == records


@needs_matplotlib
def test_cli_writes_the_plot_and_the_csv_of_a_real_run(tmp_path, data_dir):
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    png, table = tmp_path / "out" / "bench.png", tmp_path / "bench.csv"
    called = CliRunner().invoke(app, ["bench", "-m", str(model), "--batch-sizes", "1,2", "--iterations", "2", "--warmup", "0", "--no-torch",
                                      "--fidelity", str(data_dir), "--plot", str(png), "--csv", str(table)])
    assert called.exit_code == 0, called.output
    assert f"wrote {png}" in called.stdout and f"wrote {table}" in called.stdout
    records = records_from_csv(table)
    assert [(r.backend, r.batch_size, r.spearman) for r in records] == [("onnxruntime", 1, 1.0), ("onnxruntime", 2, 1.0)]
    check_png(png)


def test_missing_matplotlib_is_one_line_and_exit_2_before_the_run(tmp_path, monkeypatch):
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    called = CliRunner().invoke(app, ["bench", "-m", str(model), "--batch-sizes", "1", "--iterations", "1", "--no-torch",
                                      "--plot", str(tmp_path / "b.png")])
    assert called.exit_code == 2
    assert called.stderr.strip().splitlines() == ["error: bench --plot needs matplotlib, which is not installed; install it with pip install 'memexport[plot]'"]
    assert called.stdout == "" and not (tmp_path / "b.png").exists()
