"""``calibrate``: an image folder in, INT8 artifacts and their record out, in four stages.

Choose images (:func:`choose_images`) -> gather statistics (:func:`gather_statistics`) -> build
and guard each artifact kind (:mod:`memexport.calibration.artifacts`) -> write the record
(:func:`write_record`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from memexport.core.errors import ArtifactError, CalibrationError, UsageError

from memexport.calibration.artifacts import KINDS, CalibrationContext, Written
from memexport.calibration.cpu_int8 import CPU_PERCENTILE
from memexport.calibration.fidelity import MIN_IMAGES

OUTPUTS = tuple(KINDS)
__all__ = ["OUTPUTS", "CalibrationOptions", "CalibrationResult", "calibrate"]


@dataclass(frozen=True)
class CalibrationOptions:
    """How to calibrate.

    Attributes:
        method: Ranges of the TensorRT calibration cache: ``entropy`` (default), ``minmax`` or ``percentile``.
        qdq_method: Ranges of the Q/DQ artifact (default ``percentile``: cheap enough to recompute for
            every cross-validation fold, and rank-safer than entropy on ResMem, docs/measurements/2026-11-30-xeon-amx.md).
        qdq_percentile: Percentile of |x| for the Q/DQ ranges with ``percentile`` (default 99.99: on the 32
            OpenCV photos, Spearman 0.987 against 0.977 at 99.999 and 0.950 with entropy, before fallback).
        max_images: Use at most this many calibration images (default ``None``: all).
        batch_size: Images per ONNX Runtime call while gathering statistics (default 4).
        augment: Extra augmented views (mirror, crops) per image, for the statistics and for the
            fidelity estimate's evidence (default 3).
        held_out_fraction: Share of the folder held out from calibration as extra evidence (default 0:
            every image calibrates and cross-validation makes them all evidence); ignored with ``held_out``.
        held_out: Folder of images calibration never sees, extra evidence for the estimate (default ``None``).
        max_held_out: Cap on evidence images, held-out and cross-validated together (default 64).
        folds: Cross-validation folds over the calibration images (default 5; 0: evidence from
            held-out images only).
        min_spearman: Target for the estimated Spearman against FP32 on new photos: its 90% interval's
            lower end must reach it (default 0.99); 0 disables the guard.
        max_mean_abs: Target for the estimated mean absolute score error: its interval's upper end
            must stay under it (default ``None``: the spec's INT8 tolerance, else 0.01).
        fallback_rounds: Fallback steps the guard may try for the Q/DQ artifact (default 4: the most
            sensitive 1, 2, 4, 8 units; TensorRT runs FP16 islands cheaply).
        cpu_fallback_rounds: The same for the two CPU artifacts, U8S8 and OpenVINO IR (default 0: none).
            Each FP32 block inside an INT8 network on a CPU costs a dequantise, a layout change and a
            requantise. On ResMem, 8 blocks kept in FP32 raised the U8S8 estimate's lower end only from
            0.958 to 0.969 and cut its speed from 2.6-3.2x to 1.74x ONNX Runtime FP32; 4 blocks in the
            IR cost it about 10% of its speed; and on 45 unseen photos neither kept the ranking better
            than without fallback (docs/measurements/2026-11-30-xeon-amx.md).
        strict: Refuse an artifact whose estimate cannot be verified, instead of writing it marked
            ``verified: false`` (default ``False``).
        percentile: Percentile of |x| for ``percentile`` (default 99.99).
        cpu_percentile: Percentile of |x| bounding every range of the CPU artifact, whatever
            ``method`` is (default 99.99, :data:`~memexport.calibration.cpu_int8.CPU_PERCENTILE`).
        cpu_branch_fold_mean: The CPU artifact's ranges for the residual branches' outputs are the
            mean of each fold's own percentile instead of the percentile of every image pooled
            (default ``True``; :func:`~memexport.calibration.cpu_int8.mean_of_fold_ranges`). With
            ``folds=0`` there is one fold, and the pooled ranges stand.
        offset_images: Calibration images that measure each ONNX artifact's score offset
            (default 64; 0 disables the correction, :mod:`memexport.calibration.offset`).
        tensorrt_version: Version written into the cache header (default 8.6.1).
        outputs: Which artifacts to write, from ``cache``, ``qdq``, ``cpu``, ``openvino`` (default all;
            ``openvino`` is skipped with one logged line when openvino or nncf is not installed, and
            fails with the install hint when asked for without the default set).
        reuse_stats: Reuse ``<stem>.calib-stats.npz`` when it matches model and images (default ``True``).
    """

    method: str = "entropy"
    qdq_method: str = "percentile"
    qdq_percentile: float = 99.99
    max_images: int | None = None
    batch_size: int = 4
    augment: int = 3
    held_out_fraction: float = 0.0
    held_out: Path | None = None
    max_held_out: int = 64
    folds: int = 5
    min_spearman: float = 0.99
    max_mean_abs: float | None = None
    fallback_rounds: int = 4
    cpu_fallback_rounds: int = 0
    strict: bool = False
    percentile: float = 99.99
    cpu_percentile: float = CPU_PERCENTILE
    cpu_branch_fold_mean: bool = True
    offset_images: int = 64
    tensorrt_version: str = "8.6.1"
    outputs: tuple[str, ...] = OUTPUTS
    reuse_stats: bool = True


@dataclass(frozen=True)
class CalibrationResult:
    """What calibration wrote and what the guard found.

    Attributes:
        cache: TensorRT calibration cache, or ``None`` when not asked for.
        qdq: Q/DQ ONNX for TensorRT, or ``None``.
        cpu: U8S8 ONNX for ONNX Runtime CPU, or ``None``.
        stats: The kept activation statistics.
        record: The JSON record beside the cache (method, images, fallback layers).
        method: Range method used.
        images: Calibration images read (before augmentation).
        held_out: Images the fidelity estimate rests on (held-out and cross-validated).
        reused_stats: Whether the statistics were reused rather than gathered.
        guards: Guard report per artifact kind (``qdq``, ``cpu``, ``openvino``).
        openvino: INT8 OpenVINO IR (``.xml`` with its ``.bin``), or ``None`` when not asked for or not installed.
    """

    cache: Path | None
    qdq: Path | None
    cpu: Path | None
    stats: Path
    record: Path
    method: str
    images: int
    held_out: int
    reused_stats: bool
    guards: Mapping[str, Any] = field(default_factory=dict)
    openvino: Path | None = None

    @property
    def fallback_layers(self) -> dict[str, list[str]]:
        return {kind: list(report.fallback) for kind, report in self.guards.items()}


@dataclass(frozen=True)
class ImageChoice:
    """Which images calibrate and which the guard checks on.

    Attributes:
        calibration: Images whose activations set the ranges.
        held_out: Images the guard compares INT8 with FP32 on (never calibration images).
        folder_images: Images found in the calibration folder.
    """

    calibration: tuple[Path, ...]
    held_out: tuple[Path, ...]
    folder_images: int


def check_options(options: CalibrationOptions, images: Path) -> None:
    """Raise :class:`UsageError` for options no stage can run with."""
    from memexport.calibration.stats import METHODS

    for method in (options.method, options.qdq_method):
        if method not in METHODS:
            raise UsageError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    unknown = set(options.outputs) - set(OUTPUTS)
    if unknown:
        raise UsageError(f"unknown calibration outputs {sorted(unknown)}; expected some of {', '.join(OUTPUTS)}")
    if options.max_images is not None and options.max_images < 1:
        raise UsageError(f"--max-images must be at least 1, got {options.max_images}")
    for flag, rounds in (("--fallback-rounds", options.fallback_rounds), ("--cpu-fallback-rounds", options.cpu_fallback_rounds)):
        if rounds < 0:
            raise UsageError(f"{flag} must be 0 or more, got {rounds}")
    if not images.exists():
        raise UsageError(f"{images}: image folder not found; pass a folder of JPEG/PNG images with --images")


def choose_images(images: Path, options: CalibrationOptions) -> ImageChoice:
    """Stage 1: the calibration images and the held-out images.

    With ``options.held_out`` every image of ``images`` calibrates; otherwise a share of the folder
    is split off by file name, independent of which outputs are asked for, so statistics stay reusable.

    Raises:
        UsageError: Missing folders, a file in both folders, or no image at all.
    """
    from memexport.calibration.images import split_images
    from memexport.runtime.files import collect_images

    paths = collect_images([images]).paths
    if options.held_out is not None:
        held_folder = Path(options.held_out)
        if not held_folder.exists():
            raise UsageError(f"{held_folder}: held-out folder not found; pass a folder of images calibration never sees with --held-out")
        calibration = tuple(paths[: options.max_images])
        held_out = tuple(collect_images([held_folder]).paths[: options.max_held_out])
        overlap = {p.resolve() for p in calibration} & {p.resolve() for p in held_out}
        if overlap:
            raise UsageError(f"{sorted(overlap)[0]}: in both --images and --held-out; held-out images must be ones calibration never sees")
    else:
        split = split_images(paths, options.held_out_fraction)
        calibration = tuple(split.calibration[: options.max_images])
        held_out = tuple(split.held_out[: options.max_held_out])
    if not calibration:
        raise UsageError(f"{images}: no images found; pass a folder of JPEG/PNG images")
    return ImageChoice(calibration, held_out, len(paths))


@dataclass(frozen=True)
class Gathered:
    """Stage 2's result.

    Attributes:
        stats: The activation statistics, per cross-validation fold
            (:class:`~memexport.calibration.stats.FoldedStats`).
        path: Where they are kept (``<stem>.calib-stats.npz``).
        reused: Whether they were reused rather than gathered.
        folds: Each calibration image's fold.
        skipped: One line per unreadable calibration image.
    """

    stats: Any
    path: Path
    reused: bool
    folds: tuple[int, ...]
    skipped: tuple[str, ...] = ()


def gather_statistics(
    model: Path, calibration: Sequence[Path], stats_path: Path, preprocess: Any, options: CalibrationOptions, source: Path,
    progress: Callable[[int, int | None], None], log: Callable[[str], None],
) -> Gathered:
    """Stage 2: activation statistics of the calibration images, kept per fold, reused from ``stats_path`` when they match."""
    from memexport.calibration.evidence import fold_of
    from memexport.calibration.images import iter_batches
    from memexport.calibration.stats import FoldedStats, fingerprint, folded_stats_from_batches

    count = min(options.folds, len(calibration)) if options.folds > 0 else 1
    folds = fold_of(list(calibration), count)
    key = fingerprint(model, list(calibration), augment=options.augment, folds=count)
    if options.reuse_stats and stats_path.is_file():
        try:
            loaded = FoldedStats.load(stats_path)
            if loaded.fingerprint == key:
                log(f"reusing activation statistics from {stats_path} ({loaded.images} views)")
                return Gathered(loaded, stats_path, True, folds)
        except ArtifactError as error:
            log(f"ignoring {stats_path}: {error}")
    log(f"gathering activation statistics on {len(calibration)} images (x{1 + options.augment} views) with ONNX Runtime CPU")
    skipped: list[str] = []

    def skip(error: Exception) -> None:
        skipped.append(str(error))
        log(f"skipped {error}")

    members = [[p for p, f in zip(calibration, folds) if f == fold] for fold in range(count)]
    batches = [iter_batches(paths, preprocess, options.batch_size, options.augment, on_skip=skip) for paths in members]
    stats = folded_stats_from_batches(model, batches, len(calibration) * (1 + options.augment), progress, fingerprint_key=key)
    stats.info.update(calibration_images=len(calibration) - len(skipped), augment=options.augment, source=str(source), folds=count)
    stats.save(stats_path)
    return Gathered(stats, stats_path, False, folds, tuple(skipped))


def evidence_for(model: Path, preprocess: Any, chosen: ImageChoice, folds: Sequence[int], options: CalibrationOptions, source: Path, log: Callable[[str], None]) -> Any:
    """Stage 3a: the images the fidelity estimate rests on, with their FP32 scores.

    Held-out images first (scored by the artifact as written), then calibration images fold by
    fold (scored by the artifact rebuilt without their fold), at most ``options.max_held_out`` in all.

    Raises:
        UsageError: Fewer than :data:`~memexport.calibration.fidelity.MIN_IMAGES` evidence images.
    """
    from memexport.calibration.evidence import gather_evidence

    budget = options.max_held_out
    groups: list[tuple[int | None, list[Path]]] = [(None, list(chosen.held_out[:budget]))] if chosen.held_out else []
    budget -= len(groups[0][1]) if groups else 0
    cross = options.folds > 0 and len(set(folds)) > 1
    used: set[Path] = set()
    if cross:
        by_fold = [[p for p, f in zip(chosen.calibration, folds) if f == fold] for fold in range(max(folds) + 1)]
        taken: list[list[Path]] = [[] for _ in by_fold]
        # Round-robin over folds, so a cap still leaves every fold represented.
        for rank in range(max(len(members) for members in by_fold)):
            for fold, members in enumerate(by_fold):
                if rank < len(members) and budget > 0:
                    taken[fold].append(members[rank])
                    budget -= 1
        groups += [(fold, members) for fold, members in enumerate(taken) if members]
        used.update(p for members in taken for p in members)
    others = [p for p in chosen.calibration if p not in used][: options.max_held_out]
    evidence = gather_evidence(model, preprocess, groups, options.augment, others, log)
    if evidence.images < MIN_IMAGES:
        raise UsageError(
            f"{source}: the fidelity estimate needs at least {MIN_IMAGES} images, {evidence.images} available from {chosen.folder_images}; "
            "pass a folder with more images, or --min-spearman 0 to skip the guard"
        )
    log(f"fidelity evidence: {evidence.images} images x{1 + options.augment} views ({len(groups)} build(s) each estimate)")
    return evidence


def write_kinds(ctx: CalibrationContext) -> tuple[dict[str, Written], dict[str, str]]:
    """Stage 3b: every asked-for artifact kind, in :data:`OUTPUTS` order; one refused kind does not stop the others.

    Returns:
        What each kind wrote, and the one-line reason for each refused kind.
    """
    written: dict[str, Written] = {}
    refused: dict[str, str] = {}
    asked = [kind for kind in OUTPUTS if kind in ctx.options.outputs]
    for kind in asked:
        try:
            outcome = KINDS[kind]().write(ctx)
            if outcome is not None:  # None: an optional kind whose back end is not installed, skipped in one line
                written[kind] = outcome
        except CalibrationError as error:
            refused[kind] = str(error)
            if len(asked) > 1:  # said now, while the other kinds run; a lone kind's refusal is the final error itself
                ctx.log(f"refused: {error}")
    return written, refused


def write_record(path: Path, ctx: CalibrationContext, gathered: Gathered, written: Mapping[str, Written], refused: Mapping[str, str]) -> Path:
    """Stage 4: ``<stem>.calib.json``, what was calibrated on and what each estimate shows.

    ``fidelity`` holds each artifact's reported estimate: after a choice among candidates, the
    nested one (its ``selection`` says so); ``fidelity_steps`` keeps every candidate's own estimate
    and, as ``chosen_in_sample``, the shipped one's (optimistic: it won on these very images).
    """
    from memexport.core.atomic import write_text_atomic

    guards = {kind: w.guard for kind, w in written.items() if w.guard is not None}
    write_text_atomic(path, json.dumps({
        "model": str(ctx.model), "method": ctx.options.method, "calibration_images": ctx.used_images, "calibration_views": ctx.stats.images,
        "evidence_images": ctx.evidence.images if ctx.evidence is not None else 0, "folds": len(set(gathered.folds)),
        "skipped": list(gathered.skipped), "tensorrt_version": ctx.options.tensorrt_version,
        "fallback_layers": {kind: list(r.fallback) for kind, r in guards.items()}, "refused": dict(refused),
        "fidelity": {kind: r.final.record(r.target) for kind, r in guards.items()},
        "fidelity_steps": {kind: {"initial": r.initial.record(r.target), **({"chosen_in_sample": r.chosen.record(r.target)} if r.chosen else {}), "steps": [
            {"units": step.units, "layers": step.layers, "taken": step.taken, **step.estimate.record(r.target)} for step in r.steps
        ]} for kind, r in guards.items()},
    }, indent=2))
    return path


def calibrate(
    model: Path | str,
    images: Path | str,
    out_dir: Path | str,
    options: CalibrationOptions = CalibrationOptions(),
    progress: Callable[[int, int | None], None] = lambda done, total: None,
    log: Callable[[str], None] = lambda _: None,
) -> CalibrationResult:
    """Calibrate ``model`` on a folder of images and write the INT8 artifacts into ``out_dir``.

    Writes ``<stem>.calib-stats.npz`` (statistics, reused on the next run), ``<stem>.calib.cache``
    (TensorRT 8.6 implicit INT8), ``<stem>.int8-qdq.onnx`` (explicit Q/DQ for TensorRT),
    ``<stem>.int8-cpu.onnx`` (U8S8 for ONNX Runtime CPU), ``<stem>.int8-openvino.xml`` (INT8 for
    OpenVINO's CPU kernels, when the openvino extra is installed) and ``<stem>.calib.json`` (record).
    Each INT8 artifact carries a fidelity estimate (:mod:`memexport.calibration.fidelity`) and is
    written verified, written marked ``verified: false`` when the evidence is too thin to tell
    (refused instead with ``options.strict``), or refused when it misses the target.

    Args:
        model: FP32 ONNX written by ``memexport export``.
        images: Folder (or file) of calibration images.
        out_dir: Output folder (created if needed).
        options: See :class:`CalibrationOptions`.
        progress: Called with (images done, total) while statistics are gathered.
        log: Receives one-line progress messages and the guard's findings.

    Raises:
        UsageError: Bad options, or too few images. ArtifactError: Unreadable model.
        CalibrationError: An artifact misses its target (or cannot be verified, with ``strict``).
    """
    from memexport.export.onnx_export import load_fp32_artifact
    from memexport.core.spec import MODELS

    model, images, out_dir = Path(model), Path(images), Path(out_dir)
    check_options(options, images)
    fp32, metadata = load_fp32_artifact(model, "calibration")
    chosen = choose_images(images, options)
    guard_on = options.min_spearman > 0 and any(kind in options.outputs for kind in ("qdq", "cpu", "openvino"))
    if guard_on and len(chosen.calibration) + len(chosen.held_out) < MIN_IMAGES:
        raise UsageError(f"{images}: {chosen.folder_images} image(s); calibration with a fidelity estimate needs at least {MIN_IMAGES}, pass a folder with more images")
    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.stem
    gathered = gather_statistics(model, chosen.calibration, out_dir / f"{stem}.calib-stats.npz", metadata.preprocess, options, images, progress, log)
    evidence = evidence_for(model, metadata.preprocess, chosen, gathered.folds, options, images, log) if guard_on else None
    ctx = CalibrationContext(
        model, fp32, metadata, MODELS.get(metadata.model), options, gathered.stats, chosen.calibration, gathered.folds,
        int(gathered.stats.info.get("calibration_images", len(chosen.calibration))), evidence, out_dir, stem, log,
    )
    written, refused = write_kinds(ctx)
    record = write_record(out_dir / f"{stem}.calib.json", ctx, gathered, written, refused)
    if refused:
        # The other kinds are written and recorded; the command still fails, naming the first refusal.
        first = next(iter(refused.values()))
        raise CalibrationError(first if len(refused) == 1 else f"{first} (and {len(refused) - 1} more artifact(s) refused, see {record})")
    return CalibrationResult(
        written["cache"].path if "cache" in written else None, written["qdq"].path if "qdq" in written else None,
        written["cpu"].path if "cpu" in written else None, gathered.path, record, options.method, ctx.used_images,
        evidence.images if evidence is not None else 0, gathered.reused, {kind: w.guard for kind, w in written.items() if w.guard is not None},
        written["openvino"].path if "openvino" in written else None,
    )
