"""Explicit-quantisation (Q/DQ) ONNX for TensorRT 8.6, 10 and 11, and a checker of TensorRT's rules.

The graph stays FP32 with QuantizeLinear/DequantizeLinear pairs in front of each quantised
layer, which is what TensorRT's explicit-precision path (the only INT8 path left in
TensorRT 11) consumes:

- activations: per-tensor, symmetric INT8, scale ``amax / 127``, zero point 0;
- weights: FP32 initialisers through Q/DQ, per output channel (axis 0 for Conv), symmetric;
- biases: left in FP32 (TensorRT fuses them itself; int32 bias DQ is not accepted);
- opset 17 at most (TensorRT 8.6's parser).

Keeping weights in FP32 behind a Q/DQ pair (instead of INT8 initialisers) is what TensorRT 8.6
documents; both TensorRT and ONNX Runtime fold the weight QuantizeLinear at build time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from memexport.core.errors import ArtifactError, UsageError

MAX_TENSORRT_OPSET = 17
from memexport.core.spec import INT8_QDQ_OPS as QUANTIZABLE_OPS  # noqa: E402 - ResMem's, the default
_MIN_SCALE = 1e-8


@dataclass(frozen=True)
class QdqOptions:
    """What to quantise.

    Attributes:
        op_types: Layer types given Q/DQ inputs (default Conv, Gemm, MatMul with constant weights).
        exclude: Layer names kept in FP32 (the guard's fallback set; default none).
    """

    op_types: tuple[str, ...] = QUANTIZABLE_OPS
    exclude: frozenset[str] = frozenset()


def layer_name(node: Any) -> str:
    """A node's name, or its first output where the exporter left it unnamed."""
    return node.name or node.output[0]


def weight_axis(node: Any) -> int:
    """The output-channel axis of a layer's weight: 0 for Conv and transposed Gemm, else 1."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if node.op_type == "MatMul" else 0


def quantizable_layers(proto: Any, op_types: Iterable[str] = QUANTIZABLE_OPS) -> list[str]:
    """Names of layers with a constant weight that can be quantised, in graph order."""
    initializers = {t.name for t in proto.graph.initializer}
    wanted = set(op_types)
    return [layer_name(n) for n in proto.graph.node if n.op_type in wanted and len(n.input) > 1 and n.input[1] in initializers]


def per_channel_scale(weight: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric INT8 scale per output channel: ``max|w| / 127`` along every other axis."""
    moved = np.moveaxis(np.asarray(weight, dtype=np.float32), axis, 0).reshape(weight.shape[axis], -1)
    return np.maximum(np.abs(moved).max(axis=1) / 127.0, _MIN_SCALE).astype(np.float32)


def fake_quantize_weight(weight: np.ndarray, axis: int) -> np.ndarray:
    """The weight after symmetric per-channel INT8 quantise/dequantise (what the engine computes with)."""
    scale = per_channel_scale(weight, axis)
    shape = [1] * weight.ndim
    shape[axis] = -1
    scale = scale.reshape(shape)
    return (np.clip(np.round(weight / scale), -127, 127) * scale).astype(np.float32)


def onnx_opset(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def qdq_proto_from_ranges(proto: Any, amax: Mapping[str, float], options: QdqOptions = QdqOptions()) -> Any:
    """Insert Q/DQ pairs into a copy of an FP32 ``onnx.ModelProto``.

    Args:
        proto: FP32 model (not modified).
        amax: Symmetric dynamic range per activation tensor; layers whose input has no range
            stay in FP32.
        options: See :class:`QdqOptions`.

    Raises:
        UsageError: A graph with an opset TensorRT 8.6 cannot parse.
    """
    import onnx
    from onnx import helper, numpy_helper

    opset = onnx_opset(proto)
    if opset > MAX_TENSORRT_OPSET or opset < 13:
        raise UsageError(f"model has opset {opset}; Q/DQ for TensorRT needs 13..{MAX_TENSORRT_OPSET}: re-export with `memexport export --opset 17`")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    weights = {t.name: t for t in graph.initializer}
    wanted = set(options.op_types)
    new_nodes, new_inits = [], []
    activation_dq: dict[str, str] = {}
    weight_dq: dict[tuple[str, int], str] = {}
    int8_zero = numpy_helper.from_array(np.zeros((), dtype=np.int8), "qdq_zero_point_int8")
    new_inits.append(int8_zero)

    def activation(name: str) -> str:
        if name not in activation_dq:
            scale = numpy_helper.from_array(np.array(max(amax[name] / 127.0, _MIN_SCALE), dtype=np.float32), f"{name}_scale")
            new_inits.append(scale)
            q, dq = f"{name}_QuantizeLinear_Output", f"{name}_DequantizeLinear_Output"
            new_nodes.append(helper.make_node("QuantizeLinear", [name, scale.name, int8_zero.name], [q], name=f"{name}_QuantizeLinear"))
            new_nodes.append(helper.make_node("DequantizeLinear", [q, scale.name, int8_zero.name], [dq], name=f"{name}_DequantizeLinear"))
            activation_dq[name] = dq
        return activation_dq[name]

    def weight(name: str, axis: int) -> str:
        key = (name, axis)
        if key not in weight_dq:
            array = numpy_helper.to_array(weights[name])
            scale = numpy_helper.from_array(per_channel_scale(array, axis), f"{name}_scale_axis{axis}")
            zero = numpy_helper.from_array(np.zeros(array.shape[axis], dtype=np.int8), f"{name}_zero_point_axis{axis}")
            new_inits.extend([scale, zero])
            q, dq = f"{name}_QuantizeLinear_Output_axis{axis}", f"{name}_DequantizeLinear_Output_axis{axis}"
            new_nodes.append(helper.make_node("QuantizeLinear", [name, scale.name, zero.name], [q], name=f"{name}_QuantizeLinear_axis{axis}", axis=axis))
            new_nodes.append(helper.make_node("DequantizeLinear", [q, scale.name, zero.name], [dq], name=f"{name}_DequantizeLinear_axis{axis}", axis=axis))
            weight_dq[key] = dq
        return weight_dq[key]

    for original in proto.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        if (
            node.op_type in wanted and len(node.input) > 1 and node.input[1] in weights and node.input[0] in amax
            and layer_name(node) not in options.exclude and numpy_helper.to_array(weights[node.input[1]]).ndim >= 2
        ):
            node.input[0] = activation(node.input[0])
            node.input[1] = weight(node.input[1], weight_axis(node))
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    return out


def qdq_onnx_from_ranges(model: Path | str, amax: Mapping[str, float], output: Path | str, metadata: Any, options: QdqOptions = QdqOptions()) -> Path:
    """Write the Q/DQ model of ``model`` to ``output`` with ``metadata``, after checking TensorRT's rules.

    Args:
        model: FP32 ONNX file.
        amax: Dynamic range per tensor (see :func:`memexport.calibration.stats.amax_from_stats`).
        output: Destination ``.onnx``.
        metadata: :class:`~memexport.runtime.metadata.ArtifactMetadata` to embed.
        options: See :class:`QdqOptions`.

    Raises:
        ArtifactError: The result breaks a TensorRT Q/DQ rule (a bug, never silently written).
    """
    import onnx

    from memexport.export.onnx_export import save_onnx_artifact

    proto = qdq_proto_from_ranges(onnx.load(str(model)), amax, options)
    require_tensorrt_qdq(proto, str(output))
    return save_onnx_artifact(proto, metadata, output)


def _constants(proto: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def tensorrt_qdq_violations(proto: Any) -> list[str]:
    """Every way ``proto`` breaks TensorRT's Q/DQ rules (empty when it complies).

    Rules: opset <= 17; every QuantizeLinear/DequantizeLinear has a constant INT8 zero point
    that is 0 (symmetric; a missing zero point means UINT8); scales are constant, positive
    and finite; no DequantizeLinear of INT32 data (quantised biases); a QuantizeLinear feeds
    only DequantizeLinear nodes; per-channel weight scales of a Conv use axis 0.
    """
    violations = []
    opset = onnx_opset(proto)
    if opset > MAX_TENSORRT_OPSET:
        violations.append(f"opset {opset} > {MAX_TENSORRT_OPSET} (TensorRT 8.6's parser)")
    constants = _constants(proto)
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{node.op_type} {layer_name(node)!r}"
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None:
            violations.append(f"{where}: no constant zero point (a missing zero point means UINT8); TensorRT needs INT8 zero point 0")
        elif zero.dtype != np.int8:
            violations.append(f"{where}: zero point is {zero.dtype}, TensorRT needs symmetric INT8")
        elif np.any(zero != 0):
            violations.append(f"{where}: zero point {zero.reshape(-1)[:4].tolist()} is not 0 (asymmetric); TensorRT needs 0")
        scale = constants.get(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            violations.append(f"{where}: scale is not a constant")
        elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            violations.append(f"{where}: scale must be positive and finite")
        if node.op_type == "DequantizeLinear":
            data = constants.get(node.input[0])
            if data is not None and data.dtype == np.int32:
                violations.append(f"{where}: dequantises INT32 data (a quantised bias); keep biases in FP32")
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale is not None and scale.size > 1 and any(c.op_type == "Conv" for c in consumers.get(node.output[0], [])) and axis != 0:
                violations.append(f"{where}: per-channel Conv weight scales on axis {axis}, expected axis 0")
        else:
            bad = [c for c in consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad:
                violations.append(f"{where}: feeds {bad[0].op_type} {layer_name(bad[0])!r}; TensorRT needs each QuantizeLinear followed by DequantizeLinear")
    return violations


def require_tensorrt_qdq(proto: Any, source: str) -> None:
    """Raise :class:`ArtifactError` naming ``source`` and the first violations, if any."""
    violations = tensorrt_qdq_violations(proto)
    if violations:
        more = f" (and {len(violations) - 3} more)" if len(violations) > 3 else ""
        raise ArtifactError(f"{source}: Q/DQ graph breaks TensorRT's rules: {'; '.join(violations[:3])}{more}")
