"""The artifact kinds calibration writes, one object each, and the registry that lists them.

A kind turns the shared :class:`CalibrationContext` (model, statistics, held-out images) into
one file. Adding a kind (an OpenVINO INT8 model, say) is one class here, or in its own module,
plus one entry in :data:`KINDS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from memexport.core.errors import CalibrationError
from memexport.core.spec import Int8Spec

@dataclass(frozen=True)
class CalibrationContext:
    """Everything an artifact kind needs, gathered once by :func:`~memexport.calibration.stages.calibrate`.

    Attributes:
        model: FP32 ONNX file.
        fp32: Its ``onnx.ModelProto``.
        metadata: Its :class:`~memexport.runtime.metadata.ArtifactMetadata`.
        spec: The declared model spec, or ``None`` (tests' tiny models).
        options: The :class:`~memexport.calibration.stages.CalibrationOptions`.
        stats: Activation statistics of the calibration images, per cross-validation fold.
        calibration: Calibration image files.
        folds: Each calibration image's fold.
        used_images: Calibration images that were read (before augmentation).
        evidence: What the fidelity estimate rests on, or ``None`` when the guard is off.
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
    calibration: tuple[Path, ...]
    folds: tuple[int, ...]
    used_images: int
    evidence: Any
    out_dir: Path
    stem: str
    log: Callable[[str], None]

    def target(self) -> Any:
        """The fidelity target: ``--min-spearman`` and ``--max-mean-abs`` (default: the spec's INT8 tolerance, else 0.01)."""
        from memexport.calibration.fidelity import FidelityTarget

        spec, bound = self.spec, self.options.max_mean_abs
        if bound is None:
            bound = spec.tolerances["int8"].atol if spec is not None and "int8" in spec.tolerances else 0.01
        return FidelityTarget(self.options.min_spearman, bound)

    def int8_metadata(self, quantization: str, method: str, report: Any, **extra: Any) -> Any:
        """The artifact metadata of an INT8 ONNX derived from the FP32 model, its ranges set by ``method``."""
        record: dict[str, Any] = {
            "calibration_method": method,
            "calibration_images": self.used_images,
            "calibration_views": self.stats.images,
            "fallback_layers": list(report.fallback) if report is not None else [],
            "quantization": quantization,
            **extra,
        }
        if report is not None:
            record["fidelity"] = report.final.record(report.target)
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
        from memexport.calibration.stats import amax_from_stats

        path = ctx.out_dir / f"{ctx.stem}.calib.cache"
        amax = amax_from_stats(ctx.stats.all(), ctx.options.method, ctx.options.percentile)
        write_calibration_cache(path, amax, ctx.options.method, ctx.options.tensorrt_version)
        ctx.log(f"wrote {path} ({len(amax)} tensors, {ctx.options.method})")
        return Written(path)


def pinned_prefixes(ctx: CalibrationContext) -> tuple[str, ...]:
    """The spec's node-name prefixes that every INT8 artifact keeps out of INT8 (ResMem: stem and layer1)."""
    return int8_spec(ctx).fp32_layers


def int8_spec(ctx: CalibrationContext) -> Int8Spec:
    """What the model declares each INT8 recipe quantises (ResMem's lists for a model this installation does not declare)."""
    return ctx.spec.int8 if ctx.spec is not None else Int8Spec()


class GuardedOnnxKind:
    """An INT8 ONNX built from the ranges, its fidelity estimated (and fallback searched), then written.

    Subclasses say how to turn statistics into ranges (:meth:`ranges`), how to build
    (:meth:`build`), which layers the guard may keep in FP32 (:meth:`layers`) and in what units.
    """

    name = ""
    suffix = ""
    quantization = ""

    def __init__(self) -> None:
        self._ranges: dict[int | None, Any] = {}
        self._offset_batch: Any = None
        self._offsets: dict[frozenset[str], float | None] = {}

    def ranges(self, ctx: CalibrationContext, fold: int | None) -> Any:
        """Ranges from every fold's statistics (``fold`` ``None``) or from all but ``fold``'s, computed once."""
        if fold not in self._ranges:
            self._ranges[fold] = self.ranges_from(ctx, ctx.stats.all() if fold is None else ctx.stats.without(fold), fold)
        return self._ranges[fold]

    def ranges_from(self, ctx: CalibrationContext, stats: Any, fold: int | None) -> Any:
        """Ranges from ``stats``: every fold's statistics, or all but ``fold``'s (``fold`` ``None``: all)."""
        raise NotImplementedError

    def quantize(self, ctx: CalibrationContext, fold: int | None, exclude: frozenset[str]) -> Any:
        """The quantised ``onnx.ModelProto`` with ``exclude`` in FP32, from the ranges without ``fold`` (``None``: all)."""
        raise NotImplementedError

    def build(self, ctx: CalibrationContext, fold: int | None, exclude: frozenset[str]) -> Any:
        """:meth:`quantize`, then remove the score offset measured on the calibration images the build saw.

        INT8 shifts the final logit one way; adding the mean FP32-minus-INT8 logit to the bias feeding
        the sigmoid (:mod:`memexport.calibration.offset`) cannot change ranks and removes that shift.
        """
        from memexport.calibration.offset import offset_corrected

        proto = self.quantize(ctx, fold, exclude)
        batch, reference, folds = self.offset_batch(ctx)
        keep = np.ones(len(batch), bool) if fold is None else folds != fold
        if not keep.any():
            return proto
        proto, offset = offset_corrected(proto, batch[keep], reference[keep])
        if fold is None:
            self._offsets[exclude] = offset
        return proto

    def offset_batch(self, ctx: CalibrationContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Calibration images that measure the score offset: pixels, FP32 scores and folds, loaded once."""
        if self._offset_batch is None:
            from memexport.calibration.guard import ort_session, session_scores
            from memexport.calibration.images import load_all

            count = ctx.options.offset_images
            arrays, folds = [], []
            for path, fold in zip(ctx.calibration[:count], ctx.folds[:count]):
                one = load_all([path], ctx.metadata.preprocess)
                if len(one):
                    arrays.append(one[0])
                    folds.append(fold)
            batch = np.stack(arrays) if arrays else np.zeros((0,))
            reference = session_scores(ort_session(ctx.model), batch) if arrays else np.zeros(0)
            self._offset_batch = (batch, reference, np.array(folds))
        return self._offset_batch


    def layers(self, ctx: CalibrationContext) -> list[str]:
        raise NotImplementedError

    def pinned_prefixes(self, ctx: CalibrationContext) -> tuple[str, ...]:
        """See :func:`pinned_prefixes`."""
        return pinned_prefixes(ctx)

    def pinned(self, ctx: CalibrationContext) -> frozenset[str]:
        """Node names under :meth:`pinned_prefixes`: never quantised, never offered to the guard."""
        from memexport.calibration.cpu_int8 import pinned_layers

        return frozenset(pinned_layers(ctx.fp32, self.pinned_prefixes(ctx)))

    def unit_of(self, layer: str) -> str:
        """The fallback unit of a layer: its ResNet block (one FP32 island per block, not per layer), else the layer."""
        from memexport.calibration.guard import block_unit

        return block_unit(layer)

    def ranges_key(self, ctx: CalibrationContext) -> str:
        """What the ranges depend on besides the statistics (part of the sensitivity cache's key)."""
        raise NotImplementedError

    def simulated_ranges(self, ctx: CalibrationContext) -> tuple[Any, Any]:
        """``(amax, u8_ranges)`` for the guard's switchable simulation."""
        return self.ranges(ctx, None), None

    def check(self, proto: Any, what: str) -> None:
        """Refuse a proto that breaks the target runtime's rules (default: no rules)."""

    def extra_metadata(self, ctx: CalibrationContext, fallback: frozenset[str]) -> dict[str, Any]:
        """Kind-specific metadata of the artifact built with ``fallback`` in FP32 (default: its score offset)."""
        return {"score_offset_logit": self._offsets.get(fallback)}

    def evaluate(self, ctx: CalibrationContext, exclude: frozenset[str]) -> tuple[Any, list]:
        """Build the artifact with ``exclude`` in FP32; return it and, per evidence image, its views' errors."""
        from memexport.calibration.guard import ort_session, session_scores

        final = self.build(ctx, None, exclude)
        evidence = ctx.evidence
        scores = [session_scores(ort_session(final if g.fold is None else self.build(ctx, g.fold, exclude)), g.batch) for g in evidence.groups]
        return final, evidence.errors(scores)

    def rescore(self, ctx: CalibrationContext, exclude: frozenset[str], group: int) -> list:
        """One evidence group's errors with ``exclude`` in FP32 (the nested estimate's per-block ranking)."""
        from memexport.calibration.guard import ort_session, session_scores

        evidence = ctx.evidence
        g = evidence.groups[group]
        scores = [session_scores(ort_session(self.build(ctx, g.fold, exclude)), g.batch) if index == group else None
                  for index in range(len(evidence.groups))]
        return evidence.errors(scores)

    def guard(self, ctx: CalibrationContext) -> Any:
        amax, u8_ranges = self.simulated_ranges(ctx)
        return guard_for(ctx, self.name, self.layers(ctx), amax, u8_ranges, self.ranges_key(ctx), self.unit_of, self.fallback_rounds(ctx))

    def fallback_rounds(self, ctx: CalibrationContext) -> int:
        """Fallback steps the guard may try for this kind (default ``options.fallback_rounds``)."""
        return ctx.options.fallback_rounds

    def write(self, ctx: CalibrationContext) -> Written:
        from memexport.export.onnx_export import save_onnx_artifact

        file_name = f"{ctx.stem}.{self.suffix}.onnx"
        if ctx.evidence is not None:
            proto, report = self.guard(ctx).run(lambda exclude: self.evaluate(ctx, exclude), file_name,
                                                lambda exclude, group: self.rescore(ctx, exclude, group))
            judge(report, file_name, ctx.options.strict, ctx.log)
        else:
            proto, report = self.build(ctx, None, frozenset()), None
        self.check(proto, file_name)
        fallback = frozenset(report.fallback) if report is not None else frozenset()
        metadata = ctx.int8_metadata(self.quantization, self.ranges_key(ctx).partition("@")[0], report, **self.extra_metadata(ctx, fallback))
        path = save_onnx_artifact(proto, metadata, ctx.out_dir / file_name)
        ctx.log(f"wrote {path}")
        return Written(path, report)


def guard_for(ctx: CalibrationContext, kind: str, layers: Sequence[str], amax: Any, u8_ranges: Any, ranges_key: str,
              unit_of: Callable[[str], str], rounds: int) -> Any:
    """The estimate-driven :class:`~memexport.calibration.guard.Guard` of one artifact kind, ranking units on the evidence images.

    The guard judges its choice by nested cross-validation over the evidence's blocks
    (:func:`~memexport.calibration.selection.blocks_of`), and the sensitivity cache's key names
    the ranking images' pixels as well as model, statistics and ranges.

    Args:
        rounds: Fallback steps allowed (``fallback_rounds`` or ``cpu_fallback_rounds``, by kind).
    """
    from memexport.calibration.guard import Guard
    from memexport.calibration.selection import blocks_of

    batch, reference = ctx.evidence.originals()
    return Guard(
        ctx.fp32, amax, list(layers), batch, reference, ctx.target(), ctx.log, max_rounds=rounds,
        cache=ctx.out_dir / f"{ctx.stem}.sensitivity-{kind}.json", cache_key=f"{ctx.stats.fingerprint}|{kind}|{ranges_key}",
        u8_ranges=u8_ranges, unit_of=unit_of, scores=ctx.evidence.scores, other_scores=ctx.evidence.other_scores,
        blocks=blocks_of(ctx.evidence.groups),
    )


def judge(report: Any, what: str, strict: bool, log: Callable[[str], None]) -> None:
    """Apply the policy for an artifact's final estimate.

    Verified: ship. Refuted (even the interval's best end misses the target): refuse. Otherwise the
    evidence is too thin to tell: say in one line what was measured and how many more images would
    settle it, then ship it marked ``verified: false`` (``predict`` and ``verify`` warn when they use
    it), or refuse with ``strict``.

    Raises:
        CalibrationError: Refuted, or unverified with ``strict``.
    """
    final, target = report.final, report.target
    goal = f"spearman >= {target.min_spearman:g} and mean abs <= {target.max_mean_abs:g}"
    if report.verified:
        log(f"{what}: verified: {final.describe()} meets {goal}")
        return
    if report.refuted:
        searched = f"even with {len(report.fallback)} layer(s) in FP32" if report.fallback else "with no layer searched for FP32 fallback"
        allow = "" if report.fallback else ", allow fallback (--fallback-rounds for Q/DQ, --cpu-fallback-rounds for the CPU artifacts)"
        raise CalibrationError(
            f"{what}: INT8 misses {goal} on new photos: {final.describe()}, {searched}; "
            f"calibrate on more images, try --method percentile{allow}, or lower --min-spearman"
        )
    needed = final.images_to_settle(target)
    settle = f"about {needed - final.images} more images would settle it" if needed else "its estimate itself misses the target, so more images would not settle it"
    line = f"{what}: not verified: {final.describe()}, target {goal}; {settle}"
    if strict:
        raise CalibrationError(f"{line}; refused (--strict)")
    log(f"{line}; written marked verified: false")


class QdqKind(GuardedOnnxKind):
    """Explicit Q/DQ ONNX for TensorRT: symmetric INT8, per-channel weights, the spec's pinned layers without Q/DQ."""

    name, suffix, quantization = "qdq", "int8-qdq", "tensorrt-qdq-s8s8-symmetric"

    def ranges_from(self, ctx: CalibrationContext, stats: Any, fold: int | None) -> Any:
        from memexport.calibration.stats import amax_from_stats

        return amax_from_stats(stats, ctx.options.qdq_method, ctx.options.qdq_percentile)

    def quantize(self, ctx: CalibrationContext, fold: int | None, exclude: frozenset[str]) -> Any:
        from memexport.calibration.qdq import QdqOptions, qdq_proto_from_ranges

        options = QdqOptions(exclude=self.pinned(ctx) | exclude, op_types=int8_spec(ctx).qdq_ops)
        return qdq_proto_from_ranges(ctx.fp32, self.ranges(ctx, fold), options)

    def layers(self, ctx: CalibrationContext) -> list[str]:
        from memexport.calibration.qdq import quantizable_layers

        pinned = self.pinned(ctx)
        return [name for name in quantizable_layers(ctx.fp32, int8_spec(ctx).qdq_ops) if name not in pinned]

    def extra_metadata(self, ctx: CalibrationContext, fallback: frozenset[str]) -> dict[str, Any]:
        return {"pinned_fp32_layers": list(self.pinned_prefixes(ctx)), **super().extra_metadata(ctx, fallback)}

    def ranges_key(self, ctx: CalibrationContext) -> str:
        return f"{ctx.options.qdq_method}@{ctx.options.qdq_percentile}"

    def check(self, proto: Any, what: str) -> None:
        from memexport.calibration.qdq import require_tensorrt_qdq

        require_tensorrt_qdq(proto, what)


class CpuKind(GuardedOnnxKind):
    """U8S8 QOperator ONNX for ONNX Runtime's CPU kernels, with the spec's pinned layers in FP32.

    Falls back by block: single-layer islands add a dequantise/requantise pair each, which on
    ResMem made the estimate worse, not better.
    """

    name, suffix, quantization = "cpu", "int8-cpu", "onnxruntime-qoperator-u8s8"

    def ranges_from(self, ctx: CalibrationContext, stats: Any, fold: int | None) -> Any:
        """The pooled percentile ranges, with the residual branches' outputs the mean of the folds' own
        (``options.cpu_branch_fold_mean``; the fold left out of ``fold``'s build is left out of its mean too)."""
        from memexport.calibration.cpu_int8 import cpu_ranges, mean_of_fold_ranges, residual_branch_outputs

        ranges = cpu_ranges(stats, ctx.options.cpu_percentile)
        if not ctx.options.cpu_branch_fold_mean:
            return ranges
        folds = [part for index, part in enumerate(ctx.stats.folds) if index != fold]
        return mean_of_fold_ranges(ranges, folds, residual_branch_outputs(ctx.fp32), ctx.options.cpu_percentile)

    def simulated_ranges(self, ctx: CalibrationContext) -> tuple[Any, Any]:
        from memexport.calibration.stats import amax_from_stats

        # The simulation's symmetric mode is unused here (``u8_ranges`` given); percentile ranges cost no search.
        return amax_from_stats(ctx.stats.all(), "percentile", ctx.options.cpu_percentile), self.ranges(ctx, None)

    def quantize(self, ctx: CalibrationContext, fold: int | None, exclude: frozenset[str]) -> Any:
        from memexport.calibration.cpu_int8 import CpuInt8Options, cpu_int8_proto_from_ranges

        options = CpuInt8Options(exclude=self.pinned(ctx) | exclude, op_types=int8_spec(ctx).cpu_ops)
        return cpu_int8_proto_from_ranges(ctx.model, self.ranges(ctx, fold), options)

    def layers(self, ctx: CalibrationContext) -> list[str]:
        from memexport.calibration.qdq import quantizable_layers

        pinned = self.pinned(ctx)
        layer_ops = [op for op in int8_spec(ctx).cpu_ops if op in ("Conv", "Gemm", "MatMul")]
        return [name for name in quantizable_layers(ctx.fp32, layer_ops) if name not in pinned]

    def ranges_key(self, ctx: CalibrationContext) -> str:
        return f"percentile@{ctx.options.cpu_percentile}" + ("/branch-fold-mean" if ctx.options.cpu_branch_fold_mean else "")

    def fallback_rounds(self, ctx: CalibrationContext) -> int:
        """``options.cpu_fallback_rounds``: FP32 islands cost this artifact more speed than they buy fidelity (as for the IR)."""
        return ctx.options.cpu_fallback_rounds

    def extra_metadata(self, ctx: CalibrationContext, fallback: frozenset[str]) -> dict[str, Any]:
        return {
            "pinned_fp32_layers": list(self.pinned_prefixes(ctx)), "range_percentile": ctx.options.cpu_percentile,
            "branch_ranges": "fold-mean" if ctx.options.cpu_branch_fold_mean else "pooled", **super().extra_metadata(ctx, fallback),
        }


class OpenVinoKind:
    """``<stem>.int8-openvino.xml``: INT8 OpenVINO IR, its fidelity estimated by scoring with OpenVINO itself.

    Part of the default outputs when openvino and nncf are installed; without them a default run
    logs one line and writes the other kinds, and an explicit ``--outputs openvino`` fails with
    the install hint. The estimate, the fallback search and the ``verified: false`` policy are the
    ONNX kinds' (:class:`GuardedOnnxKind`, :func:`judge`); fallback goes by ResNet block, as for
    the CPU artifact, since OpenVINO too keeps the residual stream INT8 and a single-layer FP32
    island adds a requantisation.
    """

    name, suffix, quantization = "openvino", "int8-openvino", "openvino-fakequantize-int8"

    def __init__(self) -> None:
        self.precision = "f32"
        self._ranges: dict[int | None, tuple[Any, Any]] = {}

    def available(self, ctx: Any) -> bool:
        """Whether openvino and nncf import; raises their install hint when this kind was asked for by name."""
        from memexport.calibration.openvino_int8 import require_modules
        from memexport.core.errors import BackendUnavailableError

        try:
            require_modules()
        except BackendUnavailableError as error:
            if tuple(ctx.options.outputs) != tuple(KINDS):
                raise
            ctx.log(f"skipped {ctx.stem}.{self.suffix}.xml: {error}")
            return False
        return True

    def pinned(self, ctx: Any) -> tuple[str, ...]:
        """See :func:`pinned_prefixes`."""
        return pinned_prefixes(ctx)

    def layers(self, ctx: Any) -> list[str]:
        """Convolutions the guard may keep out of INT8 (the head is never INT8 here)."""
        from memexport.calibration.cpu_int8 import pinned_layers
        from memexport.calibration.qdq import quantizable_layers

        pinned = set(pinned_layers(ctx.fp32, self.pinned(ctx)))
        return [name for name in quantizable_layers(ctx.fp32, ["Conv"]) if name not in pinned]

    def ranges(self, ctx: Any, fold: int | None) -> tuple[Any, Any]:
        """``(amax, signed)`` from every fold's statistics (``fold`` ``None``) or all but ``fold``'s, computed once."""
        if fold not in self._ranges:
            from memexport.calibration.cpu_int8 import cpu_ranges
            from memexport.calibration.stats import amax_from_stats

            stats, percentile = (ctx.stats.all() if fold is None else ctx.stats.without(fold)), ctx.options.cpu_percentile
            signed = {name: low < 0.0 for name, (low, _) in cpu_ranges(stats, percentile).items()}
            self._ranges[fold] = (amax_from_stats(stats, "percentile", percentile), signed)
        return self._ranges[fold]

    def builder(self, ctx: Any) -> Callable[[frozenset[str]], Any]:
        from memexport.calibration.images import load_all
        from memexport.calibration.openvino_int8 import PLACEMENT_IMAGES, OpenVinoInt8Options, openvino_int8_model

        amax, signed = self.ranges(ctx, None)
        placement = load_all(list(ctx.calibration[:PLACEMENT_IMAGES]), ctx.metadata.preprocess)
        pinned = self.pinned(ctx)
        fp32_ops = int8_spec(ctx).openvino_fp32_ops
        return lambda exclude: openvino_int8_model(ctx.model, placement, amax, signed,
                                                   OpenVinoInt8Options(pinned=pinned, exclude=frozenset(exclude), fp32_ops=fp32_ops))

    def evaluate(self, ctx: Any, build: Callable[[frozenset[str]], Any], exclude: frozenset[str], precision: str) -> tuple[Any, list]:
        """Build the IR with ``exclude`` out of INT8; return it and, per evidence image, its views' errors scored with OpenVINO at ``precision``.

        Cross-validation stays honest without running NNCF once per fold: NNCF only *places* the
        quantizers (from a few images), every range and sign is memexport's (:func:`apply_ranges`).
        So each fold's build is a clone of the IR with the ranges of the other folds' statistics, a
        few constants swapped rather than a second ``nncf.quantize``.
        """
        model = build(exclude)
        return model, ctx.evidence.errors([self.score_group(ctx, model, group, precision) for group in ctx.evidence.groups])

    def score_group(self, ctx: Any, model: Any, group: Any, precision: str) -> Any:
        """OpenVINO scores of one evidence group: the IR as built, or a clone with the ranges of every fold but the group's."""
        from memexport.calibration.openvino_int8 import apply_ranges, openvino_scores, ranged_tensors

        scored = model
        if group.fold is not None:
            scored = model.clone()
            amax, signed = self.ranges(ctx, group.fold)
            apply_ranges(scored, {name: amax[name] for name in ranged_tensors(scored, amax)}, signed)
        return openvino_scores(scored, group.batch, precision)

    def rescore(self, ctx: Any, build: Callable[[frozenset[str]], Any], exclude: frozenset[str], group: int, precision: str) -> list:
        """One evidence group's errors with ``exclude`` out of INT8 (the nested estimate's per-block ranking)."""
        groups = ctx.evidence.groups
        model = build(exclude)
        return ctx.evidence.errors([self.score_group(ctx, model, g, precision) if index == group else None for index, g in enumerate(groups)])

    def write(self, ctx: Any) -> Any:
        """Build, estimate and guard (scoring with OpenVINO at the precision the artifact runs in), then write the IR."""
        from memexport.calibration.openvino_int8 import inference_precision, require_modules, save_openvino_artifact

        if not self.available(ctx):
            return None
        ov, nncf = require_modules()
        self.precision = inference_precision(ov.Core())
        file_name = f"{ctx.stem}.{self.suffix}.xml"
        build = self.builder(ctx)
        if ctx.evidence is not None:
            model, report = self.guarded(ctx, build, file_name)
            judge(report, file_name, ctx.options.strict, ctx.log)
        else:
            model, report = build(frozenset()), None
        metadata = ctx.int8_metadata(self.quantization, "percentile", report, **self.extra_metadata(ctx, ov, nncf))
        path = save_openvino_artifact(model, metadata, ctx.out_dir / file_name)
        ctx.log(f"wrote {path}")
        return Written(path, report)

    def guarded(self, ctx: Any, build: Callable[[frozenset[str]], Any], file_name: str) -> tuple[Any, Any]:
        """Run the guard with layers outside INT8 in BF16 where the CPU has it; unless verified, try FP32 too and keep the better.

        BF16 keeps most of the speed of the layers left out of INT8 (ResMem's stem, layer1 and head:
        7.2x against 5.2x ONNX Runtime FP32 in one loaded run); its own rounding can still cost the
        target on scores that lie close together, and then FP32 is tried.
        """
        from memexport.calibration.cpu_int8 import cpu_ranges
        from memexport.calibration.guard import block_unit
        from memexport.calibration.stats import amax_from_stats

        percentile = ctx.options.cpu_percentile
        amax = amax_from_stats(ctx.stats.all(), "percentile", percentile)
        guard = guard_for(ctx, self.name, self.layers(ctx), amax, cpu_ranges(ctx.stats.all(), percentile), f"percentile@{percentile}", block_unit,
                          ctx.options.cpu_fallback_rounds)
        best, report = None, None
        for precision in dict.fromkeys((self.precision, "f32")):
            ctx.log(f"{file_name}: estimating with OpenVINO, layers outside INT8 in {precision}")
            model, report = guard.run(
                lambda exclude: self.evaluate(ctx, build, exclude, precision), file_name,
                lambda exclude, group: self.rescore(ctx, build, exclude, group, precision), f"{precision}: ", report.candidates if report else (),
            )
            own = report.chosen or report.final  # the choice between precisions is made, as the guard's, on every image
            if best is None or own.better_than(best[2], report.target):
                best = (precision, model, own, report)
            if own.verified(report.target):
                break
        self.precision = best[0]
        # The estimate reported is the nested one over every candidate of both precisions: the choice between them is judged too.
        return best[1], dataclasses.replace(best[3], final=report.final, chosen=best[2] if len(report.candidates) > 1 else None,
                                            candidates=report.candidates)

    def extra_metadata(self, ctx: Any, ov: Any, nncf: Any) -> dict[str, Any]:
        from memexport.calibration.openvino_int8 import PLACEMENT_IMAGES

        placed = list(zip(ctx.calibration, ctx.folds))[:PLACEMENT_IMAGES]
        return {
            "pinned_fp32_layers": list(self.pinned(ctx)), "fp32_ops": list(int8_spec(ctx).openvino_fp32_ops), "range_percentile": ctx.options.cpu_percentile,
            "inference_precision": self.precision, "openvino": ov.get_version(), "nncf": nncf.__version__,
            # NNCF ran these images to place the quantizers; each fold build sets every range and sign from its own statistics.
            "placement": {"images": [path.name for path, _ in placed], "folds": sorted({int(fold) for _, fold in placed}),
                          "used_for": "quantizer placement only; ranges and signs from each build's own statistics"},
        }


# Every artifact kind, by its ``--outputs`` name, in the order they are written.
KINDS: dict[str, Callable[[], Any]] = {"cache": CacheKind, "qdq": QdqKind, "cpu": CpuKind, "openvino": OpenVinoKind}
