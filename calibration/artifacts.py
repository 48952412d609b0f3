"""The artifact kinds calibration writes, one object each, and the registry that lists them.

A kind turns the shared :class:`CalibrationContext` (model, statistics, held-out images) into
one file. Adding a kind (an OpenVINO INT8 model, say) is one class here, or in its own module,
plus one entry in :data:`KINDS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# Below this many held-out images one adjacent swap moves Spearman by more than 0.001 (15 images:
# 0.0036), so the guard also halves its mean-error bound as a stand-in for rank stability.
FEW_HELD_OUT = 30


@dataclass(frozen=True)
class HeldOut:
    """The guard's evidence: held-out images and their FP32 scores.

    Attributes:
        paths: Held-out image files.
        batch: Their preprocessed pixels (float32 NCHW).
        reference: FP32 scores of ``batch``.
    """

    paths: tuple[Path, ...]
    batch: np.ndarray
    reference: np.ndarray

    @property
    def key(self) -> str:
        """Identifies the held-out set for the sensitivity cache."""
        return hashlib.sha256("\n".join(p.name for p in self.paths).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class CalibrationContext:
    """Everything an artifact kind needs, gathered once by :func:`~memexport.calibration.stages.calibrate`.

    Attributes:
        model: FP32 ONNX file.
        fp32: Its ``onnx.ModelProto``.
        metadata: Its :class:`~memexport.runtime.metadata.ArtifactMetadata`.
        spec: The declared model spec, or ``None`` (tests' tiny models).
        options: The :class:`~memexport.calibration.stages.CalibrationOptions`.
        stats: Activation statistics of the calibration images.
        amax: Symmetric range per tensor by ``options.method``.
        calibration: Calibration image files.
        used_images: Calibration images that were read (before augmentation).
        held_out: The guard's evidence, or ``None`` when the guard is off.
        out_dir: Output folder.
        stem: Output file stem (``resmem`` for ``resmem.onnx``).
        log: Receives one-line progress messages.
    """

    model: Path
    fp32: Any
    metadata: Any
    spec: Any
    options: Any
    stats: Any
    amax: Mapping[str, float]
    calibration: tuple[Path, ...]
    used_images: int
    held_out: HeldOut | None
    out_dir: Path
    stem: str
    log: Callable[[str], None]

    def int8_tolerance(self) -> float:
        """The spec's INT8 mean-error bound (0.01 without a declared one)."""
        spec = self.spec
        return spec.tolerances["int8"].atol if spec is not None and "int8" in spec.tolerances else 0.01

    def guard(self, kind: str, layers: Sequence[str], max_mean_abs: float, ranges_key: str, u8_ranges: Any = None) -> Any:
        """A :class:`~memexport.calibration.guard.Guard` for ``kind`` on the held-out images."""
        from memexport.calibration.guard import Guard, GuardTarget

        held = self.held_out
        bound = self.options.max_mean_abs if self.options.max_mean_abs is not None else max_mean_abs
        return Guard(
            self.fp32, self.amax, list(layers), held.batch, held.reference, GuardTarget(self.options.min_spearman, bound), self.log,
            u8_ranges=u8_ranges, cache=self.out_dir / f"{self.stem}.sensitivity-{kind}.json",
            cache_key=f"{self.stats.fingerprint}|{ranges_key}|{held.key}",
        )

    def int8_metadata(self, quantization: str, report: Any, **extra: Any) -> Any:
        """The artifact metadata of an INT8 ONNX derived from the FP32 model."""
        record: dict[str, Any] = {
            "calibration_method": self.options.method,
            "calibration_images": self.used_images,
            "calibration_views": self.stats.images,
            "fallback_layers": list(report.fallback) if report is not None else [],
            "quantization": quantization,
            **extra,
        }
        if report is not None:
            record["fidelity_guard"] = {"held_out_images": report.final.count, "target": dataclasses.asdict(report.target), **report.final.summary()}
        return dataclasses.replace(self.metadata, precision="int8").with_extra(**record)


@dataclass(frozen=True)
class Written:
    """One artifact kind's outcome.

    Attributes:
        path: The file written.
        guard: The guard's report, or ``None`` when the kind has no guard or it was off.
    """

    path: Path
    guard: Any = None


class CacheKind:
    """TensorRT 8.6's implicit-INT8 calibration cache: ranges only, no guard."""

    name = "cache"

    def write(self, ctx: CalibrationContext) -> Written:
        from memexport.calibration.cache import write_calibration_cache

        path = ctx.out_dir / f"{ctx.stem}.calib.cache"
        write_calibration_cache(path, ctx.amax, ctx.options.method, ctx.options.tensorrt_version)
        ctx.log(f"wrote {path} ({len(ctx.amax)} tensors, {ctx.options.method})")
        return Written(path)


class GuardedOnnxKind:
    """An INT8 ONNX built from the ranges, guarded against FP32, then written with its metadata.

    Subclasses say how to build (:meth:`builder`), which layers the guard may keep in FP32
    (:meth:`layers`), and what goes into the metadata.
    """

    name = ""
    suffix = ""
    quantization = ""

    def builder(self, ctx: CalibrationContext) -> Callable[[frozenset[str]], Any]:
        raise NotImplementedError

    def layers(self, ctx: CalibrationContext) -> list[str]:
        raise NotImplementedError

    def default_bound(self, ctx: CalibrationContext) -> float:
        raise NotImplementedError

    def ranges_key(self, ctx: CalibrationContext) -> str:
        """What the quantised ranges depend on (part of the sensitivity cache's key)."""
        return ctx.options.method

    def u8_ranges(self, ctx: CalibrationContext) -> Any:
        return None

    def check(self, proto: Any, what: str) -> None:
        """Refuse a proto that breaks the target runtime's rules (default: no rules)."""

    def extra_metadata(self, ctx: CalibrationContext) -> dict[str, Any]:
        return {}

    def write(self, ctx: CalibrationContext) -> Written:
        from memexport.export.onnx_export import save_onnx_artifact

        file_name = f"{ctx.stem}.{self.suffix}.onnx"
        build = self.builder(ctx)
        if ctx.held_out is not None:
            guard = ctx.guard(self.name, self.layers(ctx), self.default_bound(ctx), self.ranges_key(ctx), self.u8_ranges(ctx))
            proto, report = guard.run(build, file_name)
        else:
            proto, report = build(frozenset()), None
        self.check(proto, file_name)
        metadata = ctx.int8_metadata(self.quantization, report, **self.extra_metadata(ctx))
        path = save_onnx_artifact(proto, metadata, ctx.out_dir / file_name)
        ctx.log(f"wrote {path}")
        return Written(path, report)


class QdqKind(GuardedOnnxKind):
    """Explicit Q/DQ ONNX for TensorRT: symmetric INT8, per-channel weights."""

    name, suffix, quantization = "qdq", "int8-qdq", "tensorrt-qdq-s8s8-symmetric"

    def builder(self, ctx: CalibrationContext) -> Callable[[frozenset[str]], Any]:
        from memexport.calibration.qdq import QdqOptions, qdq_proto_from_ranges

        return lambda exclude: qdq_proto_from_ranges(ctx.fp32, ctx.amax, QdqOptions(exclude=exclude))

    def layers(self, ctx: CalibrationContext) -> list[str]:
        from memexport.calibration.qdq import quantizable_layers

        return quantizable_layers(ctx.fp32)

    def default_bound(self, ctx: CalibrationContext) -> float:
        # Checked on ONNX Runtime's emulation but deployed on TensorRT's kernels: a 2x margin
        # whatever the held-out count.
        return 0.5 * ctx.int8_tolerance()

    def check(self, proto: Any, what: str) -> None:
        from memexport.calibration.qdq import require_tensorrt_qdq

        require_tensorrt_qdq(proto, what)


class CpuBuilder:
    """Builds the U8S8 CPU model with a fallback set, then removes its score offset.

    Args:
        ctx: The calibration context.
        ranges: UINT8 ``(low, high)`` per tensor.
        pinned: Layers the spec always keeps in FP32.

    Attributes:
        offset: The score offset (logit units) applied by the last build, ``None`` when none was.
    """

    def __init__(self, ctx: CalibrationContext, ranges: Mapping[str, tuple[float, float]], pinned: frozenset[str]) -> None:
        from memexport.calibration.guard import ort_session, session_scores
        from memexport.calibration.images import load_all

        self.model, self.ranges, self.pinned = ctx.model, ranges, pinned
        self.offset: float | None = None
        count = ctx.options.offset_images
        self.batch = load_all(list(ctx.calibration[:count]), ctx.metadata.preprocess) if count > 0 else None
        self.reference = session_scores(ort_session(ctx.model), self.batch) if self.batch is not None and len(self.batch) else None

    def __call__(self, exclude: frozenset[str]) -> Any:
        from memexport.calibration.cpu_int8 import CpuInt8Options, cpu_int8_proto_from_ranges
        from memexport.calibration.offset import offset_corrected

        proto = cpu_int8_proto_from_ranges(self.model, self.ranges, CpuInt8Options(exclude=self.pinned | exclude))
        if self.reference is None:
            return proto
        proto, self.offset = offset_corrected(proto, self.batch, self.reference)
        return proto


class CpuKind(GuardedOnnxKind):
    """U8S8 QOperator ONNX for ONNX Runtime's CPU kernels, with the spec's pinned layers in FP32."""

    name, suffix, quantization = "cpu", "int8-cpu", "onnxruntime-qoperator-u8s8"

    def __init__(self) -> None:
        self._builder: CpuBuilder | None = None

    def pinned_prefixes(self, ctx: CalibrationContext) -> tuple[str, ...]:
        return ctx.spec.int8_cpu_fp32_layers if ctx.spec is not None else ()

    def pinned(self, ctx: CalibrationContext) -> frozenset[str]:
        from memexport.calibration.cpu_int8 import pinned_layers

        return frozenset(pinned_layers(ctx.fp32, self.pinned_prefixes(ctx)))

    def u8_ranges(self, ctx: CalibrationContext) -> Any:
        from memexport.calibration.cpu_int8 import cpu_ranges

        return cpu_ranges(ctx.stats, ctx.options.cpu_percentile)

    def builder(self, ctx: CalibrationContext) -> CpuBuilder:
        self._builder = CpuBuilder(ctx, self.u8_ranges(ctx), self.pinned(ctx))
        return self._builder

    def layers(self, ctx: CalibrationContext) -> list[str]:
        from memexport.calibration.cpu_int8 import CPU_OP_TYPES
        from memexport.calibration.qdq import quantizable_layers

        pinned = self.pinned(ctx)
        layer_ops = [op for op in CPU_OP_TYPES if op in ("Conv", "Gemm", "MatMul")]
        return [name for name in quantizable_layers(ctx.fp32, layer_ops) if name not in pinned]

    def default_bound(self, ctx: CalibrationContext) -> float:
        return ctx.int8_tolerance() * (0.5 if len(ctx.held_out.batch) < FEW_HELD_OUT else 1.0)

    def ranges_key(self, ctx: CalibrationContext) -> str:
        return f"percentile@{ctx.options.cpu_percentile}"

    def extra_metadata(self, ctx: CalibrationContext) -> dict[str, Any]:
        offset = self._builder.offset if self._builder is not None else None
        return {"pinned_fp32_layers": list(self.pinned_prefixes(ctx)), "range_percentile": ctx.options.cpu_percentile, "score_offset_logit": offset}


def _openvino_kind() -> Any:
    from memexport.calibration.openvino_int8 import OpenVinoKind

    return OpenVinoKind()


# Every artifact kind, by its ``--outputs`` name, in the order they are written.
KINDS: dict[str, Callable[[], Any]] = {"cache": CacheKind, "qdq": QdqKind, "cpu": CpuKind, "openvino": _openvino_kind}
