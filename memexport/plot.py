"""Bench records as a picture and a CSV: speed against rank fidelity, for choosing a path.

:func:`plot_from_records` draws one PNG: images/s against Spearman (from ``bench --fidelity``)
for every path, each labelled with its back end, precision and artifact kind, the ONNX Runtime
FP32 reference marked, and each path's p50/p99 latency in a second panel; the title names the
CPU and its matrix units. :func:`csv_from_records` writes one row per record, every field.
matplotlib is optional (the ``plot`` extra) and drawn headless, on the Agg canvas.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from memexport.bench import BenchRecord
from memexport.core.atomic import write_bytes_atomic, write_text_atomic
from memexport.core.optional import require

BACKEND_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "tensorrt": "TensorRT", "torch": "torch"}
# The artifact kinds calibrate and export write, by file-name ending (first match wins).
ARTIFACT_KINDS = (
    (".int8-openvino.xml", "INT8 IR"), (".xml", "IR"), (".int8-cpu.onnx", "INT8 U8S8"), (".int8-qdq.onnx", "INT8 Q/DQ"),
    (".int8-openvino.onnx", "INT8 OpenVINO ONNX"), (".fp16.onnx", "FP16 ONNX"), (".onnx", "ONNX"),
    (".plan", "engine"), (".engine", "engine"),
)
NO_FIDELITY = "no Spearman: rerun bench with --fidelity DIR to place each path against ONNX Runtime FP32"


def require_matplotlib() -> Any:
    """matplotlib, or one line (exit 2) saying how to install it; call before a long bench run."""
    return require("matplotlib", "plot", "bench --plot")


def artifact_kind(artifact: str) -> str:
    """``INT8 IR``, ``INT8 U8S8``, ``ONNX``, ``eager`` (torch) ... from an artifact's file name."""
    if artifact.startswith("torch:"):
        return "eager"
    name = Path(artifact).name.lower()
    return next((kind for ending, kind in ARTIFACT_KINDS if name.endswith(ending)), Path(artifact).suffix or "artifact")


def is_reference(record: BenchRecord) -> bool:
    """ONNX Runtime FP32: the exact default every ratio and every Spearman is measured against
    (the first such record of a model and batch size, as bench compares)."""
    return record.backend == "onnxruntime" and record.precision == "fp32"


def path_label(record: BenchRecord, with_model: bool = False) -> str:
    """``OpenVINO INT8, rest BF16 · INT8 IR``: back end, precision computed (and asked for) and artifact kind."""
    precision = record.precision_label.upper()
    if record.backend == "openvino" and record.precision == "int8" and record.precision_option:
        # OpenVINO computes an INT8 artifact's other layers in the precision asked for: say which.
        precision = f"INT8, rest {record.precision_option.upper()}"
    label = f"{BACKEND_NAMES.get(record.backend, record.backend)} {precision} · {artifact_kind(record.artifact)}"
    return f"{record.model}: {label}" if with_model else label


@dataclass(frozen=True)
class PlotPoint:
    """One path as drawn: its largest batch size timed, its speed, fidelity and latency."""

    label: str
    images_per_s: float
    spearman: float | None
    keeps_ranking: bool | None
    p50_ms: float
    p99_ms: float
    batch_size: int
    reference: bool
    ratio: float | None
    fidelity_images: int | None = None
    mean_abs: float | None = None


def plot_points(records: Sequence[BenchRecord]) -> list[PlotPoint]:
    """One point per path (model, artifact, back end, precision), at the largest batch size timed for it,
    in the records' order; ``ratio`` is images/s over ONNX Runtime FP32's of the same model and batch."""
    largest: dict[tuple, BenchRecord] = {}
    for record in records:
        key = (record.model, record.artifact, record.backend, record.precision, record.precision_option)
        if key not in largest or record.batch_size > largest[key].batch_size:
            largest[key] = record
    models = {r.model for r in records}
    points = []
    for record in largest.values():
        reference = next((r for r in records if is_reference(r) and r.model == record.model and r.batch_size == record.batch_size), None)
        points.append(PlotPoint(
            label=path_label(record, len(models) > 1), images_per_s=record.images_per_s, spearman=record.spearman,
            keeps_ranking=record.keeps_ranking, p50_ms=record.p50_ms, p99_ms=record.p99_ms, batch_size=record.batch_size,
            reference=record is reference, ratio=record.images_per_s / reference.images_per_s if reference else None,
            fidelity_images=record.fidelity_images, mean_abs=record.mean_abs,
        ))
    return points


def plot_title(records: Sequence[BenchRecord]) -> str:
    """The models, batch sizes, and the CPU with its matrix units (from the records, else this machine)."""
    from memexport.runtime.cpu import cpu_units

    cpu = next((r for r in records if r.cpu), None)
    model, flags = (cpu.cpu, cpu.cpu_units) if cpu else (cpu_units().model, cpu_units().flags)
    devices = sorted({r.device for r in records})
    where = f"{model} ({' '.join(flags) or 'no AMX/BF16/VNNI flags'})" if devices == ["cpu"] or not devices else f"{model}; devices {', '.join(devices)}"
    models = ", ".join(dict.fromkeys(r.model for r in records))
    sizes = ", ".join(str(b) for b in sorted({p.batch_size for p in plot_points(records)}))
    return f"memexport bench: {models}, batch {sizes}\n{where}"


def plot_from_records(records: Sequence[BenchRecord], path: Path | str) -> Any:
    """Draw ``records`` into a PNG at ``path`` and return the matplotlib ``Figure``.

    Left panel: images/s against Spearman versus ONNX Runtime FP32 (filled marker: keeps the ranking
    within the model spec's tolerance; hollow: does not; grey: no verdict), the reference starred,
    a right axis in multiples of the reference, and paths without a Spearman (torch eager FP32, or
    every path without ``--fidelity``) drawn as dashed lines at their speed. Right panel: each
    path's p50 latency per image with its p99 as a whisker.

    Raises:
        BackendUnavailableError: matplotlib is not installed (``pip install 'memexport[plot]'``).
        UsageError: No records to draw.
    """
    from memexport.core.errors import UsageError

    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = plot_points(records)
    if not points:
        raise UsageError("no bench records to plot; check that at least one path ran")
    figure = Figure(figsize=(15, 6.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)  # headless: no pyplot, no display, no global state
    speed, latency = figure.subplots(1, 2, width_ratios=(1.5, 1))
    colors = _colors(len(points))
    _draw_speed(speed, points, colors)
    _draw_latency(latency, points, colors)
    figure.suptitle(plot_title(records), fontsize=12)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
    return figure


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _draw_speed(ax: Any, points: Sequence[PlotPoint], colors: Sequence[Any]) -> None:
    """images/s against Spearman; points without one become dashed horizontal lines."""
    scored = [(i, p) for i, p in enumerate(points) if p.spearman is not None]
    if not scored:
        return _draw_speed_only(ax, points, colors)
    for i, point in enumerate(points):
        name = f"{i + 1}  {point.label}" + (" (reference)" if point.reference else "")
        if point.spearman is None:
            ax.axhline(point.images_per_s, color=colors[i], linestyle="--", linewidth=1.5, label=f"{name}: no Spearman")
            continue
        filled = point.keeps_ranking is not False
        fidelity = f": Spearman {point.spearman:.4f}" + (f", mean abs {point.mean_abs:.4f}" if point.mean_abs is not None else "")
        ax.scatter([point.spearman], [point.images_per_s], s=320 if point.reference else 110, marker="*" if point.reference else "o",
                   facecolors=colors[i] if filled else "none", edgecolors="black" if point.keeps_ranking is None else colors[i],
                   linewidths=2, zorder=4 if point.reference else 3, label=name + ("" if point.reference else fidelity))
    # Spearman tops out at 1, where the exact paths sit: show at least 0.99-1 (a scale finer than that
    # would make 0.9999 look far from 1), with plain tick labels rather than an offset.
    span = max(1.0 - min(p.spearman for _, p in scored), 0.01)  # type: ignore[type-var]
    ax.set_xlim(1.0 - 1.15 * span, 1.0 + 0.1 * span)
    ax.ticklabel_format(axis="x", useOffset=False)
    _number_points(ax, scored, span, max(p.images_per_s for p in points))
    images = max((p.fidelity_images or 0) for _, p in scored)
    ax.set_xlabel(f"Spearman against ONNX Runtime FP32 on {images} images (1 = the same ranking)")
    ax.set_ylim(0, max(p.images_per_s for p in points) * 1.15)
    ax.set_ylabel("images/s (higher is faster)")
    ax.grid(True, alpha=0.3)
    reference = next((p for p in points if p.reference), None)
    if reference is not None:
        rate = reference.images_per_s
        ax.axhline(rate, color="gray", linewidth=0.8, zorder=1)
        right = ax.secondary_yaxis("right", functions=(lambda y: y / rate, lambda r: r * rate))
        right.set_ylabel("× ONNX Runtime FP32")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, fontsize=9, frameon=False)
    ax.set_title("speed against rank fidelity (filled: keeps the ranking within spec; hollow: does not)", fontsize=10)


def _draw_speed_only(ax: Any, points: Sequence[PlotPoint], colors: Sequence[Any]) -> None:
    """Without any Spearman (no ``--fidelity``): one bar of images/s per path, and a title saying so."""
    rows = list(range(len(points)))[::-1]  # path 1 on top, as in the latency panel
    ax.barh(rows, [p.images_per_s for p in points], color=colors)
    ax.set_yticks(rows, [f"{i + 1}" for i in range(len(points))])
    ax.set_xlim(0, max(p.images_per_s for p in points) * 1.3)
    for row, point in zip(rows, points):
        ratio = "" if point.ratio is None else (" (reference)" if point.reference else f" ({point.ratio:.2f}×)")
        ax.text(point.images_per_s, row, f"  {point.images_per_s:.1f}{ratio}", va="center", fontsize=9)
    ax.set_xlabel("images/s (higher is faster)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(NO_FIDELITY, fontsize=10, color="firebrick")


def _number_points(ax: Any, scored: Sequence[tuple[int, PlotPoint]], x_span: float, y_top: float) -> None:
    """Each marker's path number beside it; markers that (nearly) coincide share one label, ``1, 2``."""
    groups: list[list[tuple[int, PlotPoint]]] = []
    for i, point in scored:
        near = next((g for g in groups if abs(g[0][1].spearman - point.spearman) < 0.03 * x_span  # type: ignore[operator]
                     and abs(g[0][1].images_per_s - point.images_per_s) < 0.04 * y_top), None)
        if near is None:
            groups.append([(i, point)])
        else:
            near.append((i, point))
    for group in groups:
        first = group[0][1]
        ax.annotate(", ".join(str(i + 1) for i, _ in group), (first.spearman, first.images_per_s), xytext=(9, 6),
                    textcoords="offset points", fontsize=10, weight="bold")


def _draw_latency(ax: Any, points: Sequence[PlotPoint], colors: Sequence[Any]) -> None:
    """One bar per path: p50 per batch call, with p99 as a whisker and both written beside it."""
    rows = list(range(len(points)))[::-1]  # path 1 on top, as in the legend
    p50 = [p.p50_ms for p in points]
    whisker = [[0.0] * len(points), [max(p.p99_ms - p.p50_ms, 0.0) for p in points]]
    ax.barh(rows, p50, xerr=whisker, color=colors, capsize=4, error_kw={"elinewidth": 1.2})
    ax.set_yticks(rows, [f"{i + 1}  {p.label}" for i, p in enumerate(points)], fontsize=9)
    ax.set_xlabel("latency per batch call, ms (bar p50, whisker p99)")
    ax.set_xlim(0, max(p.p99_ms for p in points) * 2.3)
    for row, point in zip(rows, points):
        ratio = "" if point.ratio is None else (", reference" if point.reference else f", {point.ratio:.2f}×")
        ax.text(point.p99_ms, row, f"  p50 {point.p50_ms:.0f} / p99 {point.p99_ms:.0f} ms{ratio}", va="center", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("latency at each path's batch size", fontsize=10)


def csv_from_records(records: Sequence[BenchRecord], path: Path | str) -> None:
    """Write one CSV row per record with every :class:`BenchRecord` field (``cpu_units`` space-separated,
    ``None`` as an empty cell); :func:`records_from_csv` reads it back."""
    names = [f.name for f in fields(BenchRecord)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for record in records:
        row = record.as_dict()
        writer.writerow({k: " ".join(v) if k == "cpu_units" else ("" if v is None else v) for k, v in row.items()})
    write_text_atomic(path, out.getvalue())


def records_from_csv(path: Path | str) -> list[BenchRecord]:
    """The records a :func:`csv_from_records` file holds."""
    # The annotations' text (``float | None``, ``tuple[str, ...]``), so this reads on Python 3.9 too.
    types = {f.name: str(f.type) for f in fields(BenchRecord)}
    with open(path, newline="", encoding="utf-8") as handle:
        return [BenchRecord(**{k: _parse(v, types[k]) for k, v in row.items()}) for row in csv.DictReader(handle)]


PARSERS = {"int": int, "float": float, "str": str, "bool": lambda text: text == "True", "tuple": lambda text: tuple(text.split())}


def _parse(text: str, annotation: str) -> Any:
    """A CSV cell back into its field's type: ``int``, ``float``, ``bool``, ``str``, ``tuple[str, ...]``, each maybe ``| None``."""
    if text == "" and "None" in annotation:
        return None
    return PARSERS[annotation.split("[")[0].split("|")[0].strip()](text)
