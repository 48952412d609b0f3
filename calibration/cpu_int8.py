"""The fast ONNX Runtime CPU INT8 format: U8 activations, S8 per-channel weights (QOperator).

Ranges come from memexport's own statistics (:mod:`memexport.calibration.stats`); ONNX
Runtime's quantiser only rewrites the graph (QLinearConv, QLinearMatMul, ...), so its own
calibrators never read the images again. U8S8 is the combination ONNX Runtime's x86 kernels
(VNNI / AVX2) run fastest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from memexport.core.optional import require


# Convolutions carry nearly all the FLOPs; Relu/MaxPool/Add keep tensors in UINT8 between them.
# Add is the residual sum: left in FP32, every one of ResNet-152's 50 blocks dequantises,
# reorders and requantises its stream, which halved the speed-up (1.6x against 3.2x at batch 16).
# Not Gemm (the head is a tiny share of the time and the most rank-sensitive part), Sigmoid (a U8
# output clips scores outside the calibration range), Concat (it would share one scale between
# unrelated features) nor the LRN's Mul/Pad/AveragePool (squares of activations need more than
# 8 bits); Adds with a constant operand (the LRN's ``k + alpha * sum``) are not residual sums
# and stay FP32 too (:func:`constant_adds`).
from memexport.core.spec import INT8_CPU_OPS as CPU_OP_TYPES  # noqa: E402 - ResMem's, the default

# Every tensor of the CPU artifact is requantised to UINT8, residual stream included, so one
# range rule serves them all: a percentile of |x|, inside the observed [min, max] (the residual
# branches' outputs take the mean of the folds' own percentiles, :func:`mean_of_fold_ranges`). Calibrated on
# the 15 images of ../shared/images (x4 views) and scored on the 32 OpenCV photos, 99.99 gave
# Spearman 0.991 / mean abs 0.0066 against 0.978 / 0.0095 at 99.999 and 0.918 at 99.9999 (ResMem,
# stem and layer1 in FP32, offset corrected). (Calibrated on 13 scikit-image photos, 99.999 had
# given 0.993 on 47 photos, against 0.991 with entropy ranges on Relu outputs only.)
CPU_PERCENTILE = 99.99


@dataclass(frozen=True)
class CpuInt8Options:
    """How to quantise for ONNX Runtime CPU.

    Attributes:
        exclude: Layer (node) names kept in FP32: the spec's pinned layers and the guard's
            fallback set (default none).
        op_types: Op types to quantise (default :data:`CPU_OP_TYPES`: layers plus the cheap ops
            between them, so tensors stay INT8 from layer to layer, which is where the speed comes from).
        per_channel: Per-output-channel weight scales (default ``True``).
        reduce_range: 7-bit weights, for CPUs without VNNI whose U8S8 kernels can saturate (default ``False``).
    """

    exclude: frozenset[str] = frozenset()
    op_types: tuple[str, ...] = ()
    per_channel: bool = True
    reduce_range: bool = False


def cpu_ranges(stats: Any, percentile: float = CPU_PERCENTILE) -> dict[str, tuple[float, float]]:
    """UINT8 ``(low, high)`` per tensor for the CPU artifact, from kept activation statistics.

    Args:
        stats: :class:`~memexport.calibration.stats.ActivationStats`.
        percentile: Percentile of |x| that bounds each range (default :data:`CPU_PERCENTILE`).
    """
    from memexport.calibration.stats import amax_from_stats, signed_ranges

    # UINT8 ranges must hold zero (ReLU outputs start there; a zero point needs it).
    clipped = signed_ranges(stats, amax_from_stats(stats, "percentile", percentile))
    return {name: (min(low, 0.0), max(high, 0.0)) for name, (low, high) in clipped.items()}


def mean_of_fold_ranges(
    ranges: Mapping[str, tuple[float, float]], folds: Sequence[Any], tensors: Iterable[str], percentile: float = CPU_PERCENTILE
) -> dict[str, tuple[float, float]]:
    """``ranges`` with each of ``tensors`` replaced by the mean of its per-fold :func:`cpu_ranges`.

    For the residual branches' outputs (:func:`residual_branch_outputs`): their rare large values
    come from a few images, so a percentile of every image pooled together follows whichever
    images are in the set. The mean of each fold's own percentile follows the typical image
    instead. Measured on ResMem's default workflow (15 ``../shared/images`` x4 views, 5 folds):
    the estimate's score error fell from 0.182 to 0.148 of the FP32 spread (pooled 99.99 against
    fold mean 99.99; fold mean 99.995 gave 0.158 and 99.999 0.171, pooled 99.95 0.227 and 99.999 0.210),
    and on the 45 unseen photos Spearman rose from 0.9938 to 0.9950 (docs/measurements/2026-12-04-xeon-amx.md).

    Args:
        ranges: UINT8 ``(low, high)`` per tensor, from every image (:func:`cpu_ranges`).
        folds: :class:`~memexport.calibration.stats.ActivationStats` of each fold whose mean is taken
            (one fold: ``ranges`` are returned as they are).
        tensors: Names to replace; names without statistics are skipped.
        percentile: Percentile of |x| per fold (default :data:`CPU_PERCENTILE`).
    """
    out = dict(ranges)
    if len(folds) < 2:
        return out
    per_fold = [cpu_ranges(part, percentile) for part in folds]
    for name in tensors:
        if name in out and all(name in part for part in per_fold):
            lows, highs = zip(*(part[name] for part in per_fold))
            out[name] = (float(np.mean(lows)), float(np.mean(highs)))
    return out


def residual_branch_outputs(proto: Any) -> list[str]:
    """Convolution outputs that feed a residual sum (ResNet: each block's conv3 and its downsample)."""
    constant = set(constant_adds(proto))
    made_by_conv = {output for node in proto.graph.node if node.op_type == "Conv" for output in node.output}
    return sorted({name for node in proto.graph.node if node.op_type == "Add" and node.name not in constant for name in node.input if name in made_by_conv})


def constant_adds(proto: Any) -> list[str]:
    """Names of Add nodes with a constant operand: not residual sums, so never quantised."""
    constants = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in proto.graph.node if n.op_type == "Add" and any(i in constants for i in n.input)]


def pinned_layers(proto: Any, prefixes: tuple[str, ...]) -> list[str]:
    """Names of the nodes under any of ``prefixes`` (a spec's ``int8_fp32_layers``)."""
    return [n.name for n in proto.graph.node if prefixes and n.name.startswith(prefixes)]


def cpu_int8_proto_from_ranges(model: Path | str, ranges: Mapping[str, tuple[float, float]], options: CpuInt8Options = CpuInt8Options()) -> Any:
    """Quantise ``model`` with the given activation ranges; returns the ``onnx.ModelProto``.

    Args:
        model: FP32 ONNX file.
        ranges: ``(low, high)`` per activation tensor (see :func:`memexport.calibration.stats.signed_ranges`).
        options: See :class:`CpuInt8Options`.

    Raises:
        BackendUnavailableError: ONNX Runtime without its quantisation tools.
    """
    require("onnxruntime.quantization", extra="export", purpose="the CPU INT8 artifact", hint="install onnxruntime>=1.16")
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, add_infer_metadata

    tensors = TensorsData(
        CalibrationMethod.MinMax,
        {name: TensorData(lowest=np.array(low, dtype=np.float32), highest=np.array(high, dtype=np.float32)) for name, (low, high) in ranges.items()},
    )
    import onnx

    # In memory: ORT's load_model_with_shape_infer writes <model>-inferred.onnx beside the model and
    # deletes it, so two calibrations of one model at once would remove each other's file.
    loaded = onnx.shape_inference.infer_shapes(onnx.load(str(model)))
    add_infer_metadata(loaded)
    op_types = list(options.op_types or CPU_OP_TYPES)
    exclude = set(options.exclude) | set(constant_adds(loaded))
    quantizer = ONNXQuantizer(
        loaded, options.per_channel, options.reduce_range, QuantizationMode.QLinearOps, True,
        QuantType.QInt8, QuantType.QUInt8, tensors, [], sorted(exclude), op_types,
        {"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    # The quantiser logs every non-float tensor it skips on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantizer.quantize_model()
    finally:
        root.setLevel(level)
    return quantizer.model.model


def cpu_int8_onnx_from_ranges(
    model: Path | str, ranges: Mapping[str, tuple[float, float]], output: Path | str, metadata: Any, options: CpuInt8Options = CpuInt8Options()
) -> Path:
    """Write the U8S8 model of ``model`` to ``output`` with ``metadata`` (atomically).

    Args:
        model: FP32 ONNX file.
        ranges: ``(low, high)`` per activation tensor.
        output: Destination ``.onnx``.
        metadata: :class:`~memexport.runtime.metadata.ArtifactMetadata` to embed.
        options: See :class:`CpuInt8Options`.
    """
    from memexport.export.onnx_export import save_onnx_artifact

    return save_onnx_artifact(cpu_int8_proto_from_ranges(model, ranges, options), metadata, output)
