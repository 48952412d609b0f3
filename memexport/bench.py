"""``bench``: latency and throughput of artifacts, with the torch-eager baseline in the same run.

Latency covers inference on already preprocessed batches (the model's own throughput);
``predict`` reports end-to-end throughput including decoding.

One run can compare back ends and precisions: every applicable combination of artifacts x
back ends x precisions is timed (a back end that cannot read an artifact, or a precision it
cannot compute here, is left out with a note). Every record names the CPU and its matrix units,
since CPU figures mean nothing without them. With a fidelity folder, each path's scores on it
are compared with ONNX Runtime FP32's, under the model spec's tolerance for the precision computed.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from memexport.core.errors import MemexportError, UsageError
from memexport.runtime.base import Runner, RunnerOptions
from memexport.runtime.cpu import cpu_units


@dataclass(frozen=True)
class BenchOptions:
    """Options for :func:`bench_artifacts`.

    Attributes:
        batch_sizes: Batch sizes to time (default ``(1, 16)``).
        iterations: Timed calls per batch size (default 20).
        warmup: Untimed calls first (default 3).
        torch_baseline: Also time eager torch when it is installed (default ``True``).
        device: ``cpu``, ``cuda`` or ``auto`` (default ``cpu``).
        images: Folder of images to build the input from (default ``None``: seeded uniform noise).
        min_seconds: Keep timing past ``iterations`` until this much time was spent (default 0).
        backends: Back ends to time each artifact on, where they read it (default ``()``: the
            artifact's own, by suffix).
        precisions: Compute precisions to ask each back end for (default ``()``: its exact default);
            ``bf16`` applies to OpenVINO only.
        fidelity: Folder of images to score with every path and compare with ONNX Runtime FP32
            (default ``None``: no fidelity columns).
        rounds: Time the paths in turn, this many rounds of ``iterations / rounds`` calls each, all
            runners loaded at once, so that every path sees the same machine load (on a shared
            machine whose speed drifts by 1.5x within a minute, a path timed in one block can gain or
            lose that much against the next); the percentiles pool every round. Default 1: each path
            in one block, one runner loaded at a time.
    """

    batch_sizes: tuple[int, ...] = (1, 16)
    iterations: int = 20
    warmup: int = 3
    torch_baseline: bool = True
    device: str = "cpu"
    images: Path | None = None
    min_seconds: float = 0.0
    backends: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()
    fidelity: Path | None = None
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {self.rounds}")


@dataclass(frozen=True)
class BenchRecord:
    """One back end at one batch size.

    ``images_per_s`` is ``batch_size / p50``. ``peak_rss_mb`` is the process's resident-set
    high-water mark after this record was timed (back ends run in the order listed).
    ``precision`` is what the runner computed; ``precision_option`` what ``--precision`` asked
    for (an INT8 artifact asked for ``bf16`` computes its other layers in BF16). The fidelity
    fields compare this path's scores on the fidelity folder with ONNX Runtime FP32's.
    ``stage`` is ``None`` for inference timings and ``model``, ``decode`` or ``e2e`` for the records of
    :func:`bench_end_to_end`, whose ``decode`` names the decode mode (``exact``, ``fast``), ``pipeline``
    the decoding scheme (``overlap``, ``phases``) and ``run`` the artifacts, back ends and precisions
    pipelined together (the same on every record of one run).
    """

    model: str
    artifact: str
    backend: str
    precision: str
    device: str
    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    peak_rss_mb: float
    iterations: int
    # GPU only: device memory taken by this back end (cudaMemGetInfo delta from before it
    # loaded to after this batch size ran, CUDA context excluded) and the runner's estimate.
    vram_mb: float | None = None
    vram_estimate_mb: float | None = None
    precision_option: str | None = None
    cpu: str = ""
    cpu_units: tuple[str, ...] = ()
    fidelity_images: int | None = None
    spearman: float | None = None
    kendall: float | None = None
    mean_abs: float | None = None
    max_abs: float | None = None
    keeps_ranking: bool | None = None
    stage: str | None = None
    decode: str | None = None
    pipeline: str | None = None
    run: str | None = None

    @property
    def precision_label(self) -> str:
        """``bf16``, or ``int8/bf16`` for an INT8 artifact whose other layers were asked to run in BF16."""
        if self.precision_option in (None, self.precision) or (self.precision_option == "fp32" and self.precision != "bf16"):
            return self.precision
        return f"{self.precision}/{self.precision_option}"

    def as_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def time_calls(call: Callable[[], object], iterations: int, warmup: int, min_seconds: float = 0.0) -> np.ndarray:
    """Wall-clock milliseconds of ``iterations`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    started = time.perf_counter()
    while len(times) < iterations or (time.perf_counter() - started) < min_seconds:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
    return np.asarray(times)


def input_batch(runner: Runner, batch_size: int, images: Path | None) -> np.ndarray:
    """A batch for timing: real preprocessed images tiled to ``batch_size``, or seeded noise."""
    assert runner.metadata is not None
    shape = tuple(runner.metadata.input_shape)
    if images is not None:
        from memexport.runtime.files import collect_images
        from memexport.runtime.preprocess import preprocess

        arrays = []
        paths = collect_images([images]).paths
        for path in paths:
            if len(arrays) >= batch_size:
                break
            try:
                arrays.append(preprocess(path, runner.metadata.preprocess))
            except Exception:  # noqa: BLE001 - a bad file only means one image fewer to tile
                continue
        if not arrays:
            # Timing noise instead, silently, would report figures for inputs nobody asked for.
            found = f"none of its {len(paths)} images could be read" if paths else "no images found"
            raise UsageError(f"--images {images}: {found}; pass a folder of readable JPEG/PNG photos, or drop --images to time seeded noise")
        reps = -(-batch_size // len(arrays))
        return np.ascontiguousarray(np.stack((arrays * reps)[:batch_size]))
    return np.random.default_rng(0).random((batch_size, *shape), dtype=np.float32)


def runner_device(runner: Runner) -> str:
    """``cuda`` when an active runner executes on a GPU (whichever one), else ``cpu``: the records' device column."""
    return "cuda" if runner.device.startswith("cuda") else "cpu"


def bench_runner(runner: Runner, label: str, options: BenchOptions, device: str, free_before: int | None = None) -> list[BenchRecord]:
    """Time an active runner at each batch size, in one block.

    Args:
        free_before: Free device bytes read before the runner loaded (default ``None``: no VRAM columns).
    """
    ms = {size: time_calls(lambda: runner.infer(batch), options.iterations, options.warmup, options.min_seconds)
          for size, batch in bench_batches(runner, options).items()}
    return records_for(runner, label, device, ms, free_before)


def bench_batches(runner: Runner, options: BenchOptions) -> dict[int, np.ndarray]:
    """The input of each batch size timed."""
    return {size: input_batch(runner, size, options.images) for size in options.batch_sizes}


def records_for(runner: Runner, label: str, device: str, ms: dict[int, np.ndarray], free_before: int | None = None) -> list[BenchRecord]:
    """One record per batch size from its call times in milliseconds."""
    from memexport.runtime.budget import MIB, free_vram, vram_delta

    assert runner.metadata is not None
    held = runner.memory_bytes() if device == "cuda" else None
    estimate_mb = held / MIB if held is not None else None
    units = cpu_units()
    records = []
    for batch_size, times in ms.items():
        p50, p90, p99 = (float(np.percentile(times, q)) for q in (50, 90, 99))
        records.append(
            BenchRecord(
                model=runner.metadata.model, artifact=label, backend=runner.backend, precision=runner.precision,
                device=device, batch_size=batch_size, p50_ms=p50, p90_ms=p90, p99_ms=p99,
                images_per_s=batch_size / (p50 / 1000.0), peak_rss_mb=peak_rss_mb(), iterations=len(times),
                vram_mb=_mb(vram_delta(free_before, free_vram() if free_before is not None else None)), vram_estimate_mb=estimate_mb,
                cpu=units.model, cpu_units=units.flags,
            )
        )
    return records


def time_in_rounds(runners: Sequence[Runner], options: BenchOptions, progress: Callable[[str], None] = lambda _: None) -> list[dict[int, np.ndarray]]:
    """Call times of every runner at every batch size, taken in ``options.rounds`` rounds in turn.

    The warm-up calls come in the first round only; each round times ``ceil(iterations / rounds)``
    calls (and ``min_seconds / rounds``) per runner and batch size.
    """
    per_round = -(-options.iterations // options.rounds)
    batches = [bench_batches(runner, options) for runner in runners]
    times: list[dict[int, list[float]]] = [{size: [] for size in options.batch_sizes} for _ in runners]
    for k in range(options.rounds):
        progress(f"round {k + 1} of {options.rounds}: {len(runners)} path(s)")
        for runner, inputs, taken in zip(runners, batches, times):
            for size, batch in inputs.items():
                taken[size] += list(time_calls(lambda: runner.infer(batch), per_round, options.warmup if k == 0 else 0,
                                               options.min_seconds / options.rounds))
    return [{size: np.asarray(ms) for size, ms in taken.items()} for taken in times]


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 1024**2


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def bench_paths(artifacts: Sequence[Path], backends: Sequence[str] = (), precisions: Sequence[str] = (),
                progress: Callable[[str], None] = lambda _: None) -> list[tuple[Path, str, str | None]]:
    """Every applicable ``(artifact, back end, precision)``: each back end listed that reads the artifact
    (default: the artifact's own), at each precision listed that the back end offers. A back end that
    offers none of them (ONNX Runtime and TensorRT compute the artifact's own precision) runs once at its
    default, with a note through ``progress``.

    Raises:
        UsageError: An unknown back end, or an artifact that none of the back ends listed reads.
    """
    from memexport.runtime.registry import BACKENDS, backend_for

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown back end {unknown[0]!r}; choose one of {', '.join(BACKENDS)}")
    paths: list[tuple[Path, str, str | None]] = []
    for artifact in map(Path, artifacts):
        names = [b for b in backends if artifact.suffix.lower() in BACKENDS[b].suffixes] if backends else [backend_for(artifact)]
        if not names:
            raise UsageError(f"{artifact}: none of the back ends asked for ({', '.join(backends)}) reads {artifact.suffix or 'suffix-less'} files")
        for name in names:
            offered = [p for p in dict.fromkeys(precisions) if _offers(BACKENDS[name].load(), p)]
            if len(offered) < len(set(precisions)):
                left = ", ".join(p for p in dict.fromkeys(precisions) if p not in offered)
                progress(f"{artifact} on {name}: no --precision {left} there (it computes the artifact's own precision)")
            paths += [(artifact, name, precision) for precision in (offered or [None])]
    return paths


def _offers(runner_class: type[Runner], precision: str) -> bool:
    try:
        runner_class.options_for_precision(precision)
    except UsageError:
        return False
    return True


def fidelity_scores(runner: Runner, folder: Path, batch_size: int = 16) -> np.ndarray:
    """An active runner's scores for every readable image in ``folder`` (sorted), in batches of ``batch_size``."""
    from memexport.runtime.files import collect_images
    from memexport.runtime.preprocess import preprocess

    assert runner.metadata is not None
    arrays = []
    for path in collect_images([folder]).paths:
        try:
            arrays.append(preprocess(path, runner.metadata.preprocess))
        except Exception:  # noqa: BLE001 - every path skips the same unreadable files
            continue
    if len(arrays) < 2:
        raise UsageError(f"{folder}: fewer than 2 readable images, so no ranking to compare; pass a folder of photos")
    batch = np.stack(arrays)
    return np.concatenate([runner.infer(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)])


def bench_artifacts(
    artifacts: Sequence[Path], options: BenchOptions = BenchOptions(), progress: Callable[[str], None] = lambda _: None
) -> list[BenchRecord]:
    """Benchmark every artifact x back end x precision (see :func:`bench_paths`), then eager torch once
    per model (when installed and asked for). Combinations a back end refuses (``bf16`` on ONNX
    Runtime, or on a CPU without a BF16 unit) are left out with a note through ``progress``.
    With ``options.rounds`` above 1 every path, torch included, is loaded first and timed in turn
    (:func:`time_in_rounds`).

    Args:
        artifacts: ``.onnx``, ``.xml`` or engine files; they may mix models and precisions.
        options: See :class:`BenchOptions`.
        progress: Called with a short line before each back end runs (default: silent).
    """
    paths = bench_paths(artifacts, options.backends, options.precisions, progress)
    skipped: list[Exception] = []
    with ExitStack() as stack:
        if options.rounds > 1:
            opened = [o for o in (_open_path(path, options, progress, skipped, stack) for path in paths) if o is not None]
            references = _open_references([o.runner.metadata for o in opened], options, progress, stack)
            everything = opened + references
            times = time_in_rounds([o.runner for o in everything], options, progress)
            measured = [o.measure(records_for(o.runner, o.label, o.device, ms, o.free_before), options) for o, ms in zip(everything, times)]
        else:
            measured, models = [], []
            for path in paths:
                with ExitStack() as one:
                    o = _open_path(path, options, progress, skipped, one)
                    if o is not None:
                        progress(f"timing {o.what}")
                        measured.append(o.measure(bench_runner(o.runner, o.label, options, o.device, o.free_before), options))
                        models.append(o.runner.metadata)
            for o in _open_references(models, options, progress, stack):
                progress(f"timing {o.what}")
                measured.append(o.measure(bench_runner(o.runner, o.label, options, o.device, o.free_before), options))
    records = [r for timed, _ in measured for r in timed]
    if skipped and not records:
        raise skipped[0]
    scored = [(timed, scores) for timed, scores in measured if scores is not None]
    return with_fidelity(records, scored, progress) if scored else records


@dataclass
class _Opened:
    """An active runner in a bench run, with what its records need."""

    runner: Runner
    label: str
    what: str
    device: str
    precision: str | None = None
    free_before: int | None = None
    reference: bool = False

    def measure(self, timed: list[BenchRecord], options: BenchOptions) -> tuple[list[BenchRecord], np.ndarray | None]:
        """The records (with the precision asked for) and, for artifacts with a fidelity folder, their scores on it."""
        timed = [replace(r, precision_option=self.precision) for r in timed]
        if options.fidelity is None or (self.reference and self.precision is None):
            return timed, None  # torch FP32 is the model itself: nothing to compare
        return timed, fidelity_scores(self.runner, options.fidelity)


def _open_path(path: tuple[Path, str, str | None], options: BenchOptions, progress: Callable[[str], None],
               skipped: list[Exception], stack: ExitStack) -> _Opened | None:
    """Activate one artifact x back end x precision inside ``stack``, or note why it was refused."""
    from memexport.runtime.budget import free_vram
    from memexport.runtime.registry import runner_for

    artifact, backend, precision = path
    what = f"{artifact} on {backend}" + (f" {precision}" if precision else "")
    on_gpu = options.device != "cpu" or Path(artifact).suffix.lower() in (".plan", ".engine", ".trt")
    free_before = free_vram() if on_gpu else None
    try:
        runner = stack.enter_context(runner_for(artifact, RunnerOptions(device=options.device), backend, precision=precision))
    except MemexportError as refusal:
        # One path refused (BF16 without a BF16 unit, an artifact a back end cannot compile): the others still run.
        progress(f"skipped {what}: {refusal}")
        skipped.append(refusal)
        return None
    device = runner_device(runner)
    return _Opened(runner, str(artifact), what, device, precision, free_before if device == "cuda" else None)


def _open_references(metadata: Sequence[Any], options: BenchOptions, progress: Callable[[str], None], stack: ExitStack) -> list[_Opened]:
    """Eager torch inside ``stack``, once per model of the artifacts' ``metadata``, when installed and asked for;
    with ``bf16`` among the precisions, also torch under BF16 autocast on a CPU with a BF16 unit (the
    peer a torch user would try first), sharing the FP32 runner's module."""
    if not (options.torch_baseline and torch_available()):
        return []
    from memexport.export.torch_runner import TorchRunner, reference_runner_for
    from memexport.runtime.budget import free_vram

    models: dict[str, Any] = {}
    for one in metadata:
        models.setdefault(one.model, one)  # the first artifact's metadata of each model
    device = "cuda" if options.device == "cuda" else "cpu"
    autocast = "bf16" in options.precisions and (device == "cuda" or cpu_units().bf16)
    if "bf16" in options.precisions and not autocast:
        progress(f"skipped torch bf16 autocast: this CPU ({cpu_units().model}) has no BF16 unit")
    opened = []
    for model, meta in models.items():
        progress(f"loading torch eager ({model})")
        free_before = free_vram() if device == "cuda" else None
        reference = stack.enter_context(reference_runner_for(meta, device=device))  # type: ignore[arg-type]
        opened.append(_Opened(reference, f"torch:{model}", f"torch eager ({model})", device, None, free_before, reference=True))
        if autocast:
            peer = stack.enter_context(TorchRunner(reference.spec, reference.weights, device, model=reference.model, autocast="bf16"))
            opened.append(_Opened(peer, f"torch:{model}", f"torch bf16 autocast ({model})", device, "bf16", None, reference=True))
    return opened


def with_fidelity(records: list[BenchRecord], scored: Sequence[tuple[list[BenchRecord], np.ndarray]],
                  progress: Callable[[str], None] = lambda _: None) -> list[BenchRecord]:
    """``records`` with the fidelity fields filled: each path's scores against the first ONNX Runtime FP32
    path of the same model, under the model spec's tolerance for the precision the path computed."""
    from memexport.core.parity import compare
    from memexport.core.spec import MODELS, Tolerance

    # Statistics without a verdict, for a model or precision the spec declares no tolerance for.
    no_verdict = Tolerance(atol=float("inf"), min_spearman=-1.0, min_kendall=-1.0)

    references = {}
    for timed, scores in scored:
        first = timed[0]
        if first.backend == "onnxruntime" and first.precision == "fp32":
            references.setdefault(first.model, scores)
    filled: dict[int, BenchRecord] = {}
    for timed, scores in scored:
        first = timed[0]
        reference = references.get(first.model)
        if reference is None:
            progress(f"no fidelity for {first.artifact}: no ONNX Runtime FP32 artifact of {first.model} in this run to compare with")
            continue
        spec = MODELS.get(first.model)
        tolerance = spec.tolerances.get(first.precision) if spec is not None else None
        report = compare(scores, reference, tolerance or no_verdict)
        fields = {"fidelity_images": report.count, "spearman": report.spearman, "kendall": report.kendall,
                  "mean_abs": report.mean_abs, "max_abs": report.max_abs, "keeps_ranking": report.passed if tolerance else None}
        filled.update((id(r), replace(r, **fields)) for r in timed)
    return [filled.get(id(r), r) for r in records]


def fastest_keeping_ranking(records: Sequence[BenchRecord]) -> BenchRecord | None:
    """The fastest record, at the largest batch size timed, whose scores keep the ranking
    (within the model spec's tolerance for its precision), or ``None`` without fidelity."""
    kept = [r for r in records if r.keeps_ranking]
    if not kept:
        return None
    largest = max(r.batch_size for r in kept)
    return max((r for r in kept if r.batch_size == largest), key=lambda r: r.images_per_s)


def ratio_table(records: Sequence[BenchRecord]) -> list[str]:
    """Throughput ratios against the first record of the same model and batch size on ONNX Runtime FP32,
    against torch eager where present, and against the first model listed (same back end, precision,
    device and batch) for the other models, e.g. M3M against ResMem."""
    lines = []
    for record in records:
        peers = [r for r in records if r.model == record.model and r.batch_size == record.batch_size]
        torch_peer = next((r for r in peers if r.backend == "torch"), None)
        ort32 = next((r for r in peers if r.backend == "onnxruntime" and r.precision == "fp32"), None)
        parts = []
        if torch_peer and record is not torch_peer:
            parts.append(f"{record.images_per_s / torch_peer.images_per_s:.2f}x torch")
        if ort32 and record is not ort32:
            parts.append(f"{record.images_per_s / ort32.images_per_s:.2f}x onnxruntime fp32")
        # Across models (M3M against ResMem): the same back end, precision and batch of the first model listed.
        first = records[0].model if records else record.model
        other = next((r for r in records if r.model == first and r.model != record.model and r.backend == record.backend
                      and r.precision == record.precision and r.device == record.device and r.batch_size == record.batch_size), None)
        if other:
            parts.append(f"{record.images_per_s / other.images_per_s:.2f}x {other.model}")
        lines.append(", ".join(parts))
    return lines


def bench_end_to_end(
    artifact: Any, folder: Path, batch_size: int = 16, workers: int | None = None, device: str = "cpu",
    iterations: int = 20, warmup: int = 3, progress: Callable[[str], None] = lambda _: None,
    backend: str | None = None, precision: str | None = None, decode: str = "exact", pipeline: str = "overlap",
) -> list[BenchRecord]:
    """The ``predict`` pipeline's throughput next to each model's own, in one run.

    For one artifact (or several, one per model, as ``predict -m A -m B`` scores them) at one batch
    size, back end and precision each, timed one after the other in this order (``stage``):

    * ``model``: each artifact's inference alone, on an already preprocessed batch of real images
      (as :func:`bench_runner`); one record per artifact;
    * ``decode``: the decoding pool alone (read, decode, resize once, crop for every model) over every image in ``folder``;
    * ``e2e``: the whole pipeline over every image, under ``pipeline``'s scheme, as ``memexport predict``
      runs it minus the CSV writes.

    For the ``decode`` and ``e2e`` records the percentiles are of the wall time between
    consecutive batches; ``images_per_s`` is images over total wall time. When both stages
    share the cores, the best the pipeline can do is :func:`pipeline_bound` of the two stages'.
    With several artifacts the ``decode`` and ``e2e`` records name every model, artifact, back end
    and precision joined by ``+``; every record of one call shares its ``run``.

    Args:
        artifact: ``.onnx``, ``.xml`` or engine file, an :class:`~memexport.runtime.multi.Artifact`, or
            a list of them (one per model).
        folder: Folder of images (e.g. ``make camera-photos``).
        batch_size: Images per inference call (default 16).
        workers: Decoding threads (default: as ``predict``, :func:`~memexport.runtime.batch.split_cpus`).
        device: ``cpu``, ``cuda`` or ``auto`` (default ``cpu``).
        iterations: Timed calls for each ``model`` record (default 20).
        warmup: Untimed calls first (default 3).
        progress: Called with a short line before each stage (default: silent).
        backend: Back end for the artifacts that name none (default ``None``: by suffix).
        precision: Precision to ask for, where the artifact names none (default ``None``: the exact default).
        decode: ``exact`` (default) or ``fast``.
        pipeline: ``overlap`` (default) or ``phases``: see :mod:`memexport.runtime.decoding`.
    """
    from memexport.runtime.batch import split_cpus
    from memexport.runtime.decoding import check_pipeline
    from memexport.runtime.files import collect_images
    from memexport.runtime.multi import Artifact, MultiPredictor

    many = artifact if isinstance(artifact, (list, tuple)) else [artifact]
    artifacts = [Artifact.of(one, backend, precision) for one in many]
    check_pipeline(pipeline)
    paths = collect_images([folder]).paths
    if not paths:
        raise UsageError(f"{folder}: no images to benchmark; create some with `make camera-photos`")
    workers = split_cpus()[0] if workers is None else workers
    run = " + ".join(f"{a.path} {a.backend or 'default'} {a.precision or 'default'}" for a in artifacts)
    with ExitStack() as stack:
        runners = [stack.enter_context(a.runner(RunnerOptions(device=device))) for a in artifacts]
        multi = stack.enter_context(MultiPredictor(runners, batch_size, decode=decode))
        records = []
        for one, runner in zip(artifacts, runners):
            progress(f"timing {one.path} on {runner.backend} {runner.precision}: inference at batch {batch_size}")
            model_options = BenchOptions(batch_sizes=(batch_size,), iterations=iterations, warmup=warmup, images=folder)
            timed = bench_runner(runner, str(one.path), model_options, runner_device(runner))[0]
            records.append(replace(timed, stage="model", decode=decode, precision_option=one.precision, pipeline=pipeline, run=run))
        _warm_page_cache(paths, progress)
        shared = _shared_record(records)
        for stage in ("decode", "e2e"):
            progress(f"timing {stage} over {len(paths)} images with {workers} decoding threads, {decode} decode, {pipeline} pipeline")
            records.append(replace(shared, **_pipeline_record(multi, paths, batch_size, workers, stage == "e2e", pipeline), stage=stage))
    return records


def _warm_page_cache(paths: Sequence[Path], progress: Callable[[str], None]) -> None:
    """Read every image once, untimed, so that both timed stages start from a warm page cache."""
    progress(f"reading {len(paths)} images once, untimed, so both stages start from a warm page cache")
    for path in paths:
        try:
            path.read_bytes()
        except OSError:
            pass


def _shared_record(models: Sequence[BenchRecord]) -> BenchRecord:
    """The template of a run's ``decode`` and ``e2e`` records: its one ``model`` record, or with several
    models every model, artifact, back end and precision joined by ``+`` (a value all share, once)."""
    if len(models) == 1:
        return models[0]

    def joined(values: Sequence[Any]) -> Any:
        return values[0] if len(set(values)) == 1 else "+".join(str(v) for v in values)

    return replace(models[0], model=joined([r.model for r in models]), artifact=joined([r.artifact for r in models]),
                   backend=joined([r.backend for r in models]), precision=joined([r.precision for r in models]),
                   precision_option=joined([r.precision_option for r in models]), vram_mb=None, vram_estimate_mb=None)


def _pipeline_record(multi: Any, paths: Sequence[Path], batch_size: int, workers: int, infer: bool, pipeline: str) -> dict[str, Any]:
    """The timing fields of one pass of the decoding pool over ``paths`` (scoring each batch with every model when ``infer``)."""
    from memexport.runtime.decoding import decoded_batches

    intervals, count = [], 0
    started = last = time.perf_counter()
    for batch in decoded_batches(multi, paths, batch_size, workers, pipeline):
        if infer:
            multi.score_batch(batch)
        count += len(batch)
        now = time.perf_counter()
        intervals.append((now - last) * 1000.0)
        last = now
    total = time.perf_counter() - started
    ms = np.asarray(intervals)
    p50, p90, p99 = (float(np.percentile(ms, q)) for q in (50, 90, 99))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "images_per_s": count / total, "peak_rss_mb": peak_rss_mb(), "iterations": len(ms)}


def pipeline_bound(model_images_per_s: float | Sequence[float], decode_images_per_s: float) -> float:
    """The most images/s a pipeline can reach when decoding and inference share the same cores:
    ``1 / (1/decode + sum_i 1/model_i)``, each stage's images/s alone on all cores (one model, or
    each of several models scoring every decoded image)."""
    models = [model_images_per_s] if isinstance(model_images_per_s, (int, float)) else list(model_images_per_s)
    return 1.0 / (1.0 / decode_images_per_s + sum(1.0 / m for m in models))


def end_to_end_ratios(records: Sequence[BenchRecord]) -> list[str]:
    """Per record of :func:`bench_end_to_end`: ``decode`` and ``e2e`` throughput against the run's
    ``model`` records (against the models in turn, ``1 / sum_i 1/model_i``, with several), and for ``e2e``
    the bound :func:`pipeline_bound` and its share of it."""
    def run_of(r: BenchRecord) -> tuple:
        return (r.run or (r.artifact, r.backend, r.precision_option), r.decode, r.batch_size, r.pipeline)

    lines = []
    for record in records:
        same = [r for r in records if run_of(r) == run_of(record)]
        models = [r.images_per_s for r in same if r.stage == "model"]
        decode = next((r for r in same if r.stage == "decode"), None)
        if not models or record.stage == "model":
            lines.append("")
            continue
        together = 1.0 / sum(1.0 / m for m in models)
        text = f"{record.images_per_s / together:.2f}x {'model' if len(models) == 1 else 'models'}"
        if record.stage == "e2e" and decode is not None:
            bound = pipeline_bound(models, decode.images_per_s)
            text += f", bound {bound:.2f} img/s, {record.images_per_s / bound:.2f}x bound"
        lines.append(text)
    return lines
