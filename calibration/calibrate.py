"""``calibration_cache_from_images``: one pass over an image folder, three INT8 artifacts, one guard."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from memexport.errors import ArtifactError, UsageError

OUTPUTS = ("cache", "qdq", "cpu")
# Below this many held-out images one adjacent swap moves Spearman by more than 0.001 (15 images:
# 0.0036), so the guard also halves its mean-error bound as a stand-in for rank stability.
FEW_HELD_OUT = 30


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
        outputs: Which artifacts to write, from ``cache``, ``qdq``, ``cpu`` (default all three).
        reuse_stats: Reuse ``<stem>.calib-stats.npz`` when it matches model and images (default ``True``).
    """

    method: str = "entropy"
    max_images: int | None = None
    batch_size: int = 4
    augment: int = 0
    held_out_fraction: float = 0.25
    held_out: str | None = None
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
        guards: Guard report per artifact kind (``qdq``, ``cpu``).
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

    @property
    def fallback_layers(self) -> dict[str, list[str]]:
        return {kind: list(report.fallback) for kind, report in self.guards.items()}


def _read_fp32(model: Path) -> tuple[Any, Any]:
    from memexport.export.onnx_export import load_fp32_artifact

    return load_fp32_artifact(model, "calibration")


def calibration_cache_from_images(
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
    ``<stem>.int8-cpu.onnx`` (U8S8 for ONNX Runtime CPU) and ``<stem>.calib.json`` (record).
    Each ONNX artifact passes the rank-fidelity guard or is not written.

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
    from memexport.atomic import write_text_atomic
    from memexport.calibration import cache as cache_mod
    from memexport.calibration.guard import Guard, GuardTarget, ort_session, session_scores
    from memexport.calibration.images import iter_batches, load_all, split_images
    from memexport.calibration.qdq import QdqOptions, qdq_proto_from_ranges, quantizable_layers, require_tensorrt_qdq
    from memexport.calibration.stats import METHODS, ActivationStats, activation_stats_from_batches, amax_from_stats, fingerprint
    from memexport.export.onnx_export import save_onnx_artifact
    from memexport.runtime.files import collect_images
    from memexport.spec import MODELS

    model, out_dir = Path(model), Path(out_dir)
    if options.method not in METHODS:
        raise UsageError(f"unknown calibration method {options.method!r}; expected one of {', '.join(METHODS)}")
    unknown = set(options.outputs) - set(OUTPUTS)
    if unknown:
        raise UsageError(f"unknown calibration outputs {sorted(unknown)}; expected some of {', '.join(OUTPUTS)}")
    if options.max_images is not None and options.max_images < 1:
        raise UsageError(f"--max-images must be at least 1, got {options.max_images}")
    if not Path(images).exists():
        raise UsageError(f"{images}: image folder not found; pass a folder of JPEG/PNG images with --images")
    fp32, metadata = _read_fp32(model)
    spec = MODELS.get(metadata.model)  # None for a model without a declared spec (tests' tiny models)
    guard_on = options.min_spearman > 0 and any(kind in options.outputs for kind in ("qdq", "cpu"))
    paths = collect_images([Path(images)]).paths
    if options.held_out is not None:
        if not Path(options.held_out).exists():
            raise UsageError(f"{options.held_out}: held-out folder not found; pass a folder of images calibration never sees with --held-out")
        calibration = list(paths[: options.max_images])
        held_out = list(collect_images([Path(options.held_out)]).paths[: options.max_held_out])
        overlap = {p.resolve() for p in calibration} & {p.resolve() for p in held_out}
        if overlap:
            raise UsageError(f"{sorted(overlap)[0]}: in both --images and --held-out; held-out images must be ones calibration never sees")
    else:
        # The split never depends on which outputs are asked for, so statistics stay reusable.
        split = split_images(paths, options.held_out_fraction)
        calibration = list(split.calibration[: options.max_images])
        held_out = list(split.held_out[: options.max_held_out])
    if not calibration:
        raise UsageError(f"{images}: no images found; pass a folder of JPEG/PNG images")
    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.stem
    stats_path = out_dir / f"{stem}.calib-stats.npz"

    key = fingerprint(model, calibration, augment=options.augment)
    stats = None
    if options.reuse_stats and stats_path.is_file():
        try:
            loaded = ActivationStats.load(stats_path)
            stats = loaded if loaded.fingerprint == key else None
        except ArtifactError as error:
            log(f"ignoring {stats_path}: {error}")
    reused = stats is not None
    skipped: list[str] = []
    if stats is None:
        log(f"gathering activation statistics on {len(calibration)} images (x{1 + options.augment} views) with ONNX Runtime CPU")

        def skip(error: Exception) -> None:
            skipped.append(str(error))
            log(f"skipped {error}")

        batches = iter_batches(calibration, metadata.preprocess, options.batch_size, options.augment, on_skip=skip)
        stats = activation_stats_from_batches(model, batches, len(calibration) * (1 + options.augment), progress, fingerprint_key=key)
        stats.info.update(calibration_images=len(calibration) - len(skipped), augment=options.augment, source=str(images))
        stats.save(stats_path)
    else:
        log(f"reusing activation statistics from {stats_path} ({stats.images} views)")
    used_images = int(stats.info.get("calibration_images", len(calibration)))
    amax = amax_from_stats(stats, options.method, options.percentile)

    cache_path = out_dir / f"{stem}.calib.cache" if "cache" in options.outputs else None
    if cache_path is not None:
        cache_mod.write_calibration_cache(cache_path, amax, options.method, options.tensorrt_version)
        log(f"wrote {cache_path} ({len(amax)} tensors, {options.method})")

    guards: dict[str, Any] = {}
    written: dict[str, Path] = {}
    if guard_on:
        held = load_all(held_out, metadata.preprocess)
        if len(held) < 3:
            raise UsageError(
                f"{images}: the fidelity guard needs at least 3 held-out images, {len(held)} available from {len(paths)}; "
                "pass a folder with more images, or --min-spearman 0 to skip the guard"
            )
        reference = session_scores(ort_session(model), held)
        # Without a declared INT8 tolerance, the default INT8 bound.
        atol = spec.tolerances["int8"].atol if spec is not None and "int8" in spec.tolerances else 0.01
        # The Q/DQ artifact is checked on ONNX Runtime's emulation but deployed on TensorRT's
        # kernels, so its bound keeps a 2x margin whatever the held-out count.
        default_error = {"cpu": atol * (0.5 if len(held) < FEW_HELD_OUT else 1.0), "qdq": 0.5 * atol}
        targets = {
            kind: GuardTarget(options.min_spearman, options.max_mean_abs if options.max_mean_abs is not None else error)
            for kind, error in default_error.items()
        }
        import hashlib

        held_key = hashlib.sha256("\n".join(p.name for p in held_out).encode("utf-8", "surrogateescape")).hexdigest()

        # What the quantised ranges depend on: the method for Q/DQ, the fixed percentile for CPU.
        ranges_key = {"qdq": options.method, "cpu": f"percentile@{options.cpu_percentile}"}

        def make_guard(kind: str, layers: list[str], u8_ranges: Any = None) -> Guard:
            return Guard(
                fp32, amax, layers, held, reference, targets[kind], log, u8_ranges=u8_ranges,
                cache=out_dir / f"{stem}.sensitivity-{kind}.json", cache_key=f"{stats.fingerprint}|{ranges_key[kind]}|{held_key}",
            )

    def int8_metadata(kind: str, fallback: tuple[str, ...], report: Any) -> Any:
        extra: dict[str, Any] = {
            "calibration_method": options.method,
            "calibration_images": used_images,
            "calibration_views": stats.images,
            "fallback_layers": list(fallback),
            "quantization": "tensorrt-qdq-s8s8-symmetric" if kind == "qdq" else "onnxruntime-qoperator-u8s8",
        }
        if kind == "cpu":
            extra.update(pinned_fp32_layers=list(pinned_prefixes), range_percentile=options.cpu_percentile, score_offset_logit=cpu_offset.get("value"))
        if report is not None:
            extra["fidelity_guard"] = {"held_out_images": report.final.images, "target": dataclasses.asdict(report.target), **report.final.as_dict()}
        return dataclasses.replace(metadata, precision="int8").with_extra(**extra)

    builders: dict[str, Callable[[frozenset[str]], Any]] = {}
    guards_by_kind: dict[str, Guard] = {}
    if "qdq" in options.outputs:
        builders["qdq"] = lambda exclude: qdq_proto_from_ranges(fp32, amax, QdqOptions(exclude=exclude))
        if guard_on:
            guards_by_kind["qdq"] = make_guard("qdq", quantizable_layers(fp32))
    pinned_prefixes: tuple[str, ...] = ()
    cpu_offset: dict[str, float | None] = {}
    if "cpu" in options.outputs:
        from memexport.calibration.cpu_int8 import CPU_OP_TYPES, CpuInt8Options, cpu_int8_proto_from_ranges, cpu_ranges, pinned_layers
        from memexport.calibration.offset import offset_corrected

        pinned_prefixes = spec.int8_cpu_fp32_layers if spec is not None else ()
        pinned = frozenset(pinned_layers(fp32, pinned_prefixes))
        ranges = cpu_ranges(stats, options.cpu_percentile)
        offset_batch = load_all(calibration[: options.offset_images], metadata.preprocess) if options.offset_images > 0 else None
        offset_reference = session_scores(ort_session(model), offset_batch) if offset_batch is not None and len(offset_batch) else None

        def build_cpu(exclude: frozenset[str]) -> Any:
            proto = cpu_int8_proto_from_ranges(model, ranges, CpuInt8Options(exclude=pinned | exclude))
            if offset_reference is None:
                return proto
            proto, cpu_offset["value"] = offset_corrected(proto, offset_batch, offset_reference)
            return proto

        builders["cpu"] = build_cpu
        if guard_on:
            layer_ops = [op for op in CPU_OP_TYPES if op in ("Conv", "Gemm", "MatMul")]
            convs = [name for name in quantizable_layers(fp32, layer_ops) if name not in pinned]
            guards_by_kind["cpu"] = make_guard("cpu", convs, ranges)
    suffix = {"qdq": "int8-qdq", "cpu": "int8-cpu"}
    for kind, build in builders.items():
        if kind in guards_by_kind:
            proto, report = guards_by_kind[kind].run(build, f"{stem}.{suffix[kind]}.onnx")
            guards[kind] = report
        else:
            proto, report = build(frozenset()), None
        if kind == "qdq":
            require_tensorrt_qdq(proto, f"{stem}.int8-qdq.onnx")
        path = save_onnx_artifact(proto, int8_metadata(kind, report.fallback if report else (), report), out_dir / f"{stem}.{suffix[kind]}.onnx")
        written[kind] = path
        log(f"wrote {path}")

    record = out_dir / f"{stem}.calib.json"
    write_text_atomic(record, json.dumps({
        "model": str(model), "method": options.method, "calibration_images": used_images, "calibration_views": stats.images,
        "held_out_images": len(held_out) if guard_on else 0, "skipped": skipped, "tensorrt_version": options.tensorrt_version,
        "fallback_layers": {kind: list(r.fallback) for kind, r in guards.items()},
        "fidelity": {kind: {"initial": r.initial.as_dict(), "final": r.final.as_dict()} for kind, r in guards.items()},
    }, indent=2))
    return CalibrationResult(cache_path, written.get("qdq"), written.get("cpu"), stats_path, record, options.method, used_images, len(held_out) if guard_on else 0, reused, guards)
