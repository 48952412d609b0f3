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
from typing import Any, Mapping

from memexport.errors import BackendUnavailableError


# Convolutions carry nearly all the FLOPs; Relu/MaxPool keep tensors in UINT8 between them.
# Deliberately not Add (requantising the residual stream after every block compounds error
# over ResNet-152's 50 blocks), Gemm (the head is a tiny share of the time and the
# most rank-sensitive part), Sigmoid (a U8 output clips scores outside the calibration
# range), Concat (it would share one scale between unrelated features) nor the LRN's
# Mul/Pad/AveragePool (squares of activations need more than 8 bits).
CPU_OP_TYPES = ("Conv", "Relu", "Clip", "MaxPool")


@dataclass(frozen=True)
class CpuInt8Options:
    """How to quantise for ONNX Runtime CPU.

    Attributes:
        exclude: Layer (node) names kept in FP32, the guard's fallback set (default none).
        op_types: Op types to quantise (default :data:`CPU_OP_TYPES`: layers plus the cheap ops
            between them, so tensors stay INT8 from layer to layer, which is where the speed comes from).
        per_channel: Per-output-channel weight scales (default ``True``).
        reduce_range: 7-bit weights, for CPUs without VNNI whose U8S8 kernels can saturate (default ``False``).
    """

    exclude: frozenset[str] = frozenset()
    op_types: tuple[str, ...] = ()
    per_channel: bool = True
    reduce_range: bool = False


def cpu_ranges(proto: Any, amax: Mapping[str, float], minimum: Mapping[str, float], maximum: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """U8 ranges for the CPU artifact: calibrated (clipped) ranges only where a Relu output or the
    graph input; pre-activation and residual tensors keep their full observed range, because a
    QLinearConv/QLinearAdd output that clips there corrupts the residual stream of every later block.
    """
    producer = {out: node.op_type for node in proto.graph.node for out in node.output}
    out = {}
    for name, a in amax.items():
        low, high = float(minimum[name]), float(maximum[name])
        if producer.get(name) in (None, "Relu"):
            low, high = max(low, -a), min(high, a)
        out[name] = (min(low, 0.0), max(high, 0.0))
    return out


def cpu_int8_proto_from_ranges(model: Path | str, ranges: Mapping[str, tuple[float, float]], options: CpuInt8Options = CpuInt8Options()) -> Any:
    """Quantise ``model`` with the given activation ranges; returns the ``onnx.ModelProto``.

    Args:
        model: FP32 ONNX file.
        ranges: ``(low, high)`` per activation tensor (see :func:`memexport.calibration.stats.signed_ranges`).
        options: See :class:`CpuInt8Options`.

    Raises:
        BackendUnavailableError: ONNX Runtime without its quantisation tools.
    """
    import numpy as np

    try:
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
        from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
        from onnxruntime.quantization.quant_utils import QuantizationMode, load_model_with_shape_infer
    except ImportError as exc:  # pragma: no cover - depends on the onnxruntime build
        raise BackendUnavailableError(f"onnxruntime.quantization is unavailable ({exc}); install onnxruntime>=1.16") from None

    tensors = TensorsData(
        CalibrationMethod.MinMax,
        {name: TensorData(lowest=np.array(low, dtype=np.float32), highest=np.array(high, dtype=np.float32)) for name, (low, high) in ranges.items()},
    )
    loaded = load_model_with_shape_infer(Path(model))
    op_types = list(options.op_types or CPU_OP_TYPES)
    quantizer = ONNXQuantizer(
        loaded, options.per_channel, options.reduce_range, QuantizationMode.QLinearOps, True,
        QuantType.QInt8, QuantType.QUInt8, tensors, [], sorted(options.exclude), op_types,
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
