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

from memexport.errors import ArtifactError, UsageError

from memexport.calibration.artifacts import FEW_HELD_OUT, KINDS, CalibrationContext, HeldOut, Written

OUTPUTS = tuple(KINDS)
__all__ = ["FEW_HELD_OUT", "OUTPUTS", "CalibrationOptions", "CalibrationResult", "calibrate"]


@dataclass(frozen=True)
class CalibrationOptions:
    """How to calibrate.

    Attributes:
        method: ``entropy`` (default), ``minmax`` or ``percentile``.
        max_images: Use at most this many calibration images (default ``None``: all).
        batch_size: Images per ONNX Runtime call while gathering statistics (default 4).
        augment: Extra augmented views (mirror, crops) per calibration image (default 0).
        held_out_fraction: Share of the folder held out for the guard (default 0.25); ignored with ``held_out``.
        held_out: Folder of held-out images for the guard (default ``None``: a split of ``images``);
            with it, every image of ``images`` calibrates.
        max_held_out: Cap on held-out images (default 64).
        min_spearman: Guard target against FP32 on held-out images (default 0.99); 0 disables the guard.
        max_mean_abs: Guard's largest mean absolute score error (default ``None``: half the spec's INT8
            tolerance for the Q/DQ artifact, a margin for TensorRT's kernels; for the CPU artifact the
            full tolerance, halved when fewer than :data:`FEW_HELD_OUT` images are held out, because
            Spearman on a few images is coarse and the ranking must hold beyond them).
        percentile: Percentile of |x| for ``percentile`` (default 99.99).
        cpu_percentile: Percentile of |x| bounding every range of the CPU artifact, whatever
            ``method`` is (default 99.999, :data:`~memexport.calibration.cpu_int8.CPU_PERCENTILE`).
        offset_images: Calibration images that measure the CPU artifact's score offset
            (default 64; 0 disables the correction, :mod:`memexport.calibration.offset`).
        tensorrt_version: Version written into the cache header (default 8.6.1).
        outputs: Which artifacts to write, from ``cache``, ``qdq``, ``cpu``, ``openvino`` (default all;
            ``openvino`` is skipped with one logged line when openvino or nncf is not installed, and
            fails with the install hint when asked for without the default set).
        reuse_stats: Reuse ``<stem>.calib-stats.npz`` when it matches model and images (default ``True``).
    """

    method: str = "entropy"
    max_images: int | None = None
    batch_size: int = 4
    augment: int = 0
    held_out_fraction: float = 0.25
    held_out: Path | None = None
    max_held_out: int = 64
    min_spearman: float = 0.99
    max_mean_abs: float | None = None
    percentile: float = 99.99
    cpu_percentile: float = 99.999
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
        held_out: Held-out images the guard used.
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

    if options.method not in METHODS:
        raise UsageError(f"unknown calibration method {options.method!r}; expected one of {', '.join(METHODS)}")
    unknown = set(options.outputs) - set(OUTPUTS)
    if unknown:
        raise UsageError(f"unknown calibration outputs {sorted(unknown)}; expected some of {', '.join(OUTPUTS)}")
    if options.max_images is not None and options.max_images < 1:
        raise UsageError(f"--max-images must be at least 1, got {options.max_images}")
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
        stats: The activation statistics.
        path: Where they are kept (``<stem>.calib-stats.npz``).
        reused: Whether they were reused rather than gathered.
        skipped: One line per unreadable calibration image.
    """

    stats: Any
    path: Path
    reused: bool
    skipped: tuple[str, ...] = ()


def gather_statistics(
    model: Path, calibration: Sequence[Path], stats_path: Path, preprocess: Any, options: CalibrationOptions, source: Path,
    progress: Callable[[int, int | None], None], log: Callable[[str], None],
) -> Gathered:
    """Stage 2: activation statistics of the calibration images, reused from ``stats_path`` when they match."""
    from memexport.calibration.images import iter_batches
    from memexport.calibration.stats import ActivationStats, activation_stats_from_batches, fingerprint

    key = fingerprint(model, list(calibration), augment=options.augment)
    if options.reuse_stats and stats_path.is_file():
        try:
            loaded = ActivationStats.load(stats_path)
            if loaded.fingerprint == key:
                log(f"reusing activation statistics from {stats_path} ({loaded.images} views)")
                return Gathered(loaded, stats_path, True)
        except ArtifactError as error:
            log(f"ignoring {stats_path}: {error}")
    log(f"gathering activation statistics on {len(calibration)} images (x{1 + options.augment} views) with ONNX Runtime CPU")
    skipped: list[str] = []

    def skip(error: Exception) -> None:
        skipped.append(str(error))
        log(f"skipped {error}")

    batches = iter_batches(list(calibration), preprocess, options.batch_size, options.augment, on_skip=skip)
    stats = activation_stats_from_batches(model, batches, len(calibration) * (1 + options.augment), progress, fingerprint_key=key)
    stats.info.update(calibration_images=len(calibration) - len(skipped), augment=options.augment, source=str(source))
    stats.save(stats_path)
    return Gathered(stats, stats_path, False, tuple(skipped))


def held_out_evidence(model: Path, paths: Sequence[Path], preprocess: Any, images: Path, folder_images: int) -> HeldOut:
    """The held-out images, preprocessed, with their FP32 scores.

    Raises:
        UsageError: Fewer than 3 readable held-out images.
    """
    from memexport.calibration.guard import ort_session, session_scores
    from memexport.calibration.images import load_all

    batch = load_all(list(paths), preprocess)
    if len(batch) < 3:
        raise UsageError(
            f"{images}: the fidelity guard needs at least 3 held-out images, {len(batch)} available from {folder_images}; "
            "pass a folder with more images, or --min-spearman 0 to skip the guard"
        )
    return HeldOut(tuple(paths), batch, session_scores(ort_session(model), batch))


def write_record(path: Path, ctx: CalibrationContext, gathered: Gathered, written: Mapping[str, Written]) -> Path:
    """Stage 4: ``<stem>.calib.json``, what was calibrated on and what each guard found."""
    from memexport.atomic import write_text_atomic

    guards = {kind: w.guard for kind, w in written.items() if w.guard is not None}
    write_text_atomic(path, json.dumps({
        "model": str(ctx.model), "method": ctx.options.method, "calibration_images": ctx.used_images, "calibration_views": ctx.stats.images,
        "held_out_images": len(ctx.held_out.paths) if ctx.held_out is not None else 0, "skipped": list(gathered.skipped),
        "tensorrt_version": ctx.options.tensorrt_version,
        "fallback_layers": {kind: list(r.fallback) for kind, r in guards.items()},
        "fidelity": {kind: {"initial": r.initial.summary(), "final": r.final.summary()} for kind, r in guards.items()},
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
    Each INT8 artifact passes the rank-fidelity guard or is not written.

    Args:
        model: FP32 ONNX written by ``memexport export``.
        images: Folder (or file) of calibration images; a held-out share is split off by file name.
        out_dir: Output folder (created if needed).
        options: See :class:`CalibrationOptions`.
        progress: Called with (images done, total) while statistics are gathered.
        log: Receives one-line progress messages and the guard's findings.

    Raises:
        UsageError: Bad options, or too few images. ArtifactError: Unreadable model.
        CalibrationError: The guard cannot reach its target.
    """
    from memexport.calibration.stats import amax_from_stats
    from memexport.export.onnx_export import load_fp32_artifact
    from memexport.spec import MODELS

    model, images, out_dir = Path(model), Path(images), Path(out_dir)
    check_options(options, images)
    fp32, metadata = load_fp32_artifact(model, "calibration")
    chosen = choose_images(images, options)
    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.stem
    gathered = gather_statistics(
        model, chosen.calibration, out_dir / f"{stem}.calib-stats.npz", metadata.preprocess, options, images, progress, log
    )
    stats = gathered.stats
    guard_on = options.min_spearman > 0 and any(kind in options.outputs for kind in ("qdq", "cpu", "openvino"))
    held = held_out_evidence(model, chosen.held_out, metadata.preprocess, images, chosen.folder_images) if guard_on else None
    ctx = CalibrationContext(
        model, fp32, metadata, MODELS.get(metadata.model), options, stats, amax_from_stats(stats, options.method, options.percentile),
        chosen.calibration, int(stats.info.get("calibration_images", len(chosen.calibration))), held, out_dir, stem, log,
    )
    written: dict[str, Written] = {}
    for kind in (kind for kind in OUTPUTS if kind in options.outputs):
        outcome = KINDS[kind]().write(ctx)
        if outcome is not None:  # None: an optional kind whose back end is not installed, skipped in one line
            written[kind] = outcome
    record = write_record(out_dir / f"{stem}.calib.json", ctx, gathered, written)
    return CalibrationResult(
        written["cache"].path if "cache" in written else None, written["qdq"].path if "qdq" in written else None,
        written["cpu"].path if "cpu" in written else None, gathered.path, record, options.method, ctx.used_images,
        len(chosen.held_out) if guard_on else 0, gathered.reused, {kind: w.guard for kind, w in written.items() if w.guard is not None},
        written["openvino"].path if "openvino" in written else None,
    )
