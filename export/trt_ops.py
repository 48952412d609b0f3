"""Which ONNX operators TensorRT 8.6's parser imports: an offline check, no TensorRT needed.

TensorRT 8.6 is the last release for Pascal (sm_61) and parses opset <= 17; a graph with an operator its
parser lacks fails only at ``memexport build``, on the GPU machine. This list lets a CPU machine (and the
tests) say so beforehand.
"""

from __future__ import annotations

from typing import Any

# TensorRT 8.6's ONNX parser (onnx-tensorrt docs/operators.md for 8.5, whose "Y" rows these are, plus
# GroupNormalization, LayerNormalization and IsInf, which its 8.6 EA changelog adds).
TENSORRT86_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul
Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def ops_tensorrt86_lacks(proto: Any) -> list[str]:
    """Op types in an ``onnx.ModelProto`` that TensorRT 8.6's ONNX parser does not import, sorted
    (custom-domain ops as ``domain::Op``); empty when it takes the whole graph."""
    default = {n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")}
    custom = {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    return sorted(default - TENSORRT86_OPS | custom)
