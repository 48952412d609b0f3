"""The ``memexport`` command line: thin typer commands over the library calls.

Every command maps its options onto one library function, so the CLI can do nothing the
library cannot. :class:`~memexport.errors.MemexportError` becomes one line on stderr and
the error's exit code; no traceback is printed for user errors.
"""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from memexport.errors import MemexportError

app = typer.Typer(
    name="memexport",
    help="Export, verify and run image-memorability models (ResMem, M3M) on ONNX Runtime and TensorRT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Exit codes, documented in the README.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def err(message: str) -> None:
    typer.echo(message, err=True)


def command(*args: Any, **kwargs: Any) -> Callable:
    """``app.command`` that turns memexport errors into one line and an exit code."""

    def decorate(func: Callable) -> Callable:
        @wraps(func)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                return func(*a, **kw)
            except MemexportError as error:
                err(f"error: {error}")
                raise typer.Exit(error.exit_code) from None
            except KeyboardInterrupt:
                err("interrupted")
                raise typer.Exit(EXIT_INTERRUPTED) from None

        return app.command(*args, **kwargs)(wrapper)

    return decorate


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    from memexport.errors import UsageError

    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--batch-sizes expects comma-separated integers such as 1,16, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes expects positive integers, got {text!r}")
    return sizes


@command("export")
def export_cmd(
    model: str = typer.Argument(..., help="Model name: resmem or m3m."),
    output: Path = typer.Option(..., "-o", "--output", help="Destination .onnx file."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint (default: the installed `resmem` package's published weights)."),
    segmentation_weights: Optional[Path] = typer.Option(None, "--segmentation-weights", help="M3M only: segmentation branch checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed for any randomly initialised part."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset; 17 is the highest TensorRT 8.6 parses."),
) -> None:
    """Trace MODEL from torch into an ONNX file with dynamic batch and embedded metadata."""
    from memexport.export import export_model

    metadata = export_model(model, output, weights=weights, segmentation_weights=segmentation_weights, seed=seed, opset=opset, warn=err)
    typer.echo(f"wrote {output} ({metadata.model}, opset {metadata.opset}, {metadata.extra.get('parameters', 0):,} parameters)")


@command("predict")
def predict_cmd(
    paths: List[Path] = typer.Argument(..., help="Image files and folders (folders recursively, sorted)."),
    model: Path = typer.Option(..., "--model", "-m", help="Artifact: .onnx or a TensorRT engine."),
    output: Path = typer.Option(Path("scores.csv"), "-o", "--output", help="CSV with header path,score."),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    exif_transpose: bool = typer.Option(False, "--exif-transpose/--no-exif-transpose", help="Honour EXIF orientation (the original code does not)."),
) -> None:
    """Score images into a CSV. Bad inputs go to <stem>.errors.csv; exit 1 if any failed."""
    from memexport.runtime.batch import PredictOptions, scores_csv_from_images

    bar: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        if total >= 32 and "bar" not in bar:
            bar["bar"] = typer.progressbar(length=total, label="scoring", file=sys.stderr, show_eta=True)
            bar["bar"].__enter__()
        if "bar" in bar:
            bar["bar"].update(1)

    try:
        summary = scores_csv_from_images(model, paths, output, PredictOptions(batch_size, device, exif_transpose), progress)
    finally:
        if "bar" in bar:
            bar["bar"].__exit__(None, None, None)
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(summary.failures.items()))
    typer.echo(f"scored {summary.scored} images into {output}; {summary.failed} failed" + (f" ({reasons}), see {summary.errors_path}" if summary.failed else ""))
    if summary.duplicates:
        typer.echo(f"{summary.duplicates} duplicate inputs were scored once")
    if summary.failed:
        raise typer.Exit(EXIT_ERROR)


@command("verify")
def verify_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="Artifact to check."),
    images: Path = typer.Option(..., "--images", help="Folder of images."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Reference checkpoint (default: the one the artifact was exported from)."),
    device: str = typer.Option("cpu", "--device"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
) -> None:
    """Compare the artifact with the torch reference; exit 1 and print what would pass on failure."""
    from memexport.parity import require
    from memexport.runtime.files import collect_images
    from memexport.verify import VerifyOptions, verify_artifact

    result = verify_artifact(model, collect_images([images]).paths, VerifyOptions(weights=weights, device=device))
    for error in result.bad_inputs:
        err(f"skipped {error}")
    typer.echo(f"{model}: {result.backend} {result.precision} vs torch fp32")
    for line in result.report.lines():
        typer.echo(f"  {line}")
    if json_out:
        from memexport.atomic import write_text_atomic

        write_text_atomic(json_out, json.dumps(result.report.as_dict(), indent=2))
    require(result.report, str(model))


@command("bench")
def bench_cmd(
    model: List[Path] = typer.Option(..., "--model", "-m", help="Artifact(s) to time; repeat to compare in one run."),
    batch_sizes: str = typer.Option("1,16", "--batch-sizes"),
    iterations: int = typer.Option(20, "--iterations"),
    warmup: int = typer.Option(3, "--warmup"),
    torch_baseline: bool = typer.Option(True, "--torch/--no-torch", help="Time eager torch too, when installed."),
    device: str = typer.Option("cpu", "--device"),
    images: Optional[Path] = typer.Option(None, "--images", help="Build inputs from these images (default: seeded noise)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the records as a JSON list."),
) -> None:
    """Latency (p50/p90/p99), images/s and peak RSS per back end and batch size."""
    from memexport.bench import BenchOptions, bench_artifacts, ratio_table

    options = BenchOptions(parse_batch_sizes(batch_sizes), iterations, warmup, torch_baseline, device, images)
    records = bench_artifacts(model, options, progress=err)
    typer.echo(f"{'model':8} {'backend':12} {'prec':5} {'dev':4} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>8} {'rss MB':>7}  ratio")
    for record, ratio in zip(records, ratio_table(records)):
        typer.echo(
            f"{record.model:8} {record.backend:12} {record.precision:5} {record.device:4} {record.batch_size:>5} {record.p50_ms:>9.2f} "
            f"{record.p90_ms:>9.2f} {record.p99_ms:>9.2f} {record.images_per_s:>8.2f} {record.peak_rss_mb:>7.0f}  {ratio}"
        )
    if json_out:
        from memexport.atomic import write_text_atomic

        write_text_atomic(json_out, json.dumps([r.as_dict() for r in records], indent=2))


@command("inspect")
def inspect_cmd(
    artifact: Path = typer.Argument(..., help=".onnx or engine file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show what an artifact is: model, precision, inputs, weights, versions, calibration."""
    from memexport.inspect import inspect_artifact

    info = inspect_artifact(artifact)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        typer.echo(f"{key:24} {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")


@command("doctor")
def doctor_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Python, torch, onnx, ONNX Runtime and providers, TensorRT, CUDA GPUs, and FP16/INT8 advice."""
    from memexport.doctor import environment_report

    report = environment_report()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if key == "gpus":
            for gpu in value:
                typer.echo(f"gpu {gpu['index']:<20} {gpu['name']} (sm {gpu['compute_capability']}, {gpu['memory_gib']} GiB)")
                typer.echo(f"{'':24} {gpu['advice']}")
        else:
            typer.echo(f"{key:24} {value if value is not None else 'not installed'}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
