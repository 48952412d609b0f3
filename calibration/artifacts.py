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


class OpenVinoKind:
    """``<stem>.int8-openvino.xml``: INT8 OpenVINO IR, guarded like the ONNX kinds, scored by OpenVINO itself.

    Part of the default outputs when openvino and nncf are installed; without them a default run
    logs one line and writes the other kinds, and an explicit ``--outputs openvino`` fails with
    the install hint.
    """

    name, suffix, quantization = "openvino", "int8-openvino", "openvino-fakequantize-int8"

    def __init__(self) -> None:
        self.precision = "f32"

    def available(self, ctx: Any) -> bool:
        """Whether openvino and nncf import; raises their install hint when this kind was asked for by name."""
        from memexport.calibration.openvino_int8 import require_modules
        from memexport.errors import BackendUnavailableError

        try:
            require_modules()
        except BackendUnavailableError as error:
            if tuple(ctx.options.outputs) != tuple(KINDS):
                raise
            ctx.log(f"skipped {ctx.stem}.{self.suffix}.xml: {error}")
            return False
        return True

    def pinned(self, ctx: Any) -> tuple[str, ...]:
        return ctx.spec.int8_cpu_fp32_layers if ctx.spec is not None else ()

    def layers(self, ctx: Any) -> list[str]:
        """Convolutions the guard may keep out of INT8 (the head is never INT8 here)."""
        from memexport.calibration.cpu_int8 import pinned_layers
        from memexport.calibration.qdq import quantizable_layers

        pinned = set(pinned_layers(ctx.fp32, self.pinned(ctx)))
        return [name for name in quantizable_layers(ctx.fp32, ["Conv"]) if name not in pinned]

    def builder(self, ctx: Any) -> Any:
        from memexport.calibration.cpu_int8 import cpu_ranges
        from memexport.calibration.images import load_all
        from memexport.calibration.openvino_int8 import PLACEMENT_IMAGES, OpenVinoInt8Options, openvino_int8_model
        from memexport.calibration.stats import amax_from_stats

        percentile = ctx.options.cpu_percentile
        amax = amax_from_stats(ctx.stats, "percentile", percentile)
        signed = {name: low < 0.0 for name, (low, _) in cpu_ranges(ctx.stats, percentile).items()}
        placement = load_all(list(ctx.calibration[:PLACEMENT_IMAGES]), ctx.metadata.preprocess)
        pinned = self.pinned(ctx)
        return lambda exclude: openvino_int8_model(ctx.model, placement, amax, signed, OpenVinoInt8Options(pinned=pinned, exclude=frozenset(exclude)))

    def write(self, ctx: Any) -> Any:
        """Build, guard (scoring with OpenVINO at the precision the artifact runs in) and write the IR."""
        from memexport.calibration.cpu_int8 import cpu_ranges
        from memexport.calibration.openvino_int8 import inference_precision, require_modules, save_openvino_artifact

        if not self.available(ctx):
            return None
        ov, nncf = require_modules()
        self.precision = inference_precision(ov.Core())
        file_name = f"{ctx.stem}.{self.suffix}.xml"
        build = self.builder(ctx)
        if ctx.held_out is not None:
            # The spec's whole INT8 tolerance, whatever the held-out count: the guard scores OpenVINO's own
            # kernels (no emulation margin), and on ResMem the CPU artifact's halved bound for few images
            # (0.005) traded speed for a mean error already at 0.0057 on 128 photo views, half the target.
            bound = ctx.int8_tolerance()
            guard = ctx.guard(self.name, self.layers(ctx), bound, f"percentile@{ctx.options.cpu_percentile}", cpu_ranges(ctx.stats, ctx.options.cpu_percentile))
            model, report = self.guarded(ctx, guard, build, file_name)
        else:
            model, report = build(frozenset()), None
        metadata = ctx.int8_metadata(self.quantization, report, **self.extra_metadata(ctx, ov, nncf))
        path = save_openvino_artifact(model, metadata, ctx.out_dir / file_name)
        ctx.log(f"wrote {path}")
        return Written(path, report)

    def guarded(self, ctx: Any, guard: Any, build: Any, file_name: str) -> tuple[Any, Any]:
        """Run the guard with OpenVINO scoring, layers outside INT8 in BF16 where the CPU has it, else (or if that misses) FP32.

        BF16 keeps most of the speed of the layers left out of INT8 (ResMem's stem, layer1 and head:
        7.2x against 5.2x ONNX Runtime FP32 in one loaded run); its own rounding can still cost the
        target on scores that lie close together, and then FP32 is tried before giving up.
        """
        from memexport.calibration.openvino_int8 import openvino_scores
        from memexport.errors import CalibrationError

        for precision in dict.fromkeys((self.precision, "f32")):
            self.precision = precision
            ctx.log(f"{file_name}: guarding with OpenVINO, layers outside INT8 in {precision}")
            try:
                return guard.run(build, file_name, score=lambda model, batch: openvino_scores(model, batch, precision))
            except CalibrationError:
                if precision == "f32":
                    raise
                ctx.log(f"{file_name}: with {precision} outside INT8 the target is out of reach; trying f32")
        raise AssertionError("unreachable")  # pragma: no cover

    def extra_metadata(self, ctx: Any, ov: Any, nncf: Any) -> dict[str, Any]:
        from memexport.calibration.openvino_int8 import FP32_OPS

        return {
            "pinned_fp32_layers": list(self.pinned(ctx)), "fp32_ops": list(FP32_OPS), "range_percentile": ctx.options.cpu_percentile,
            "inference_precision": self.precision, "openvino": ov.get_version(), "nncf": nncf.__version__,
        }


# Every artifact kind, by its ``--outputs`` name, in the order they are written.
KINDS: dict[str, Callable[[], Any]] = {"cache": CacheKind, "qdq": QdqKind, "cpu": CpuKind, "openvino": OpenVinoKind}
