"""Tiny ONNX models for tests, built in code (no checked-in binaries).

Each model looks like a memexport artifact: input ``image`` (N, 3, 32, 32), output ``score``
(N, 1) through a sigmoid, and memexport metadata, so runners, predict and bench accept it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from memexport.runtime.metadata import ArtifactMetadata
from memexport.core.spec import PreprocessSpec

TINY_PREPROCESS = PreprocessSpec(resize=(36, 36), crop=32)
TINY_SHAPE = (3, 32, 32)
# The layer the planted model makes sensitive to INT8 (see ``tiny_cnn_proto``).
SENSITIVE_LAYER = "conv_b"


def tiny_metadata(model: str = "tiny", precision: str = "fp32") -> ArtifactMetadata:
    return ArtifactMetadata(
        model=model, precision=precision, input_name="image", output_name="score", input_shape=TINY_SHAPE,
        preprocess=TINY_PREPROCESS, opset=17, weights={"path": None, "seed": 0}, versions={"memexport": "test"},
    )


def tiny_cnn_proto(seed: int = 0, planted: bool = False, opset: int = 17, residual: bool = False):
    """conv_a -> relu -> conv_b -> relu -> conv_c -> relu -> global pool -> fc (Gemm) -> sigmoid.

    With ``residual=True``, conv_c's output is summed with conv_b's (``add_res``, a residual
    Add) before its Relu, and a constant is added before the pool (``add_const``, an Add that
    is not a residual sum, like the LRN's ``k + ...``).

    With ``planted=True``, channel 0 of conv_a's output is ~1000x larger than the others and
    conv_b ignores that channel: a per-tensor INT8 range set by the maximum (MinMax) then
    rounds everything conv_b actually uses to zero, so conv_b alone ruins the scores while
    every other layer quantises harmlessly.
    """
    import onnx
    from onnx import helper, numpy_helper

    from memexport.export.onnx_export import set_metadata

    rng = np.random.default_rng(seed)
    wa = rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)
    ba = rng.normal(0.05, 0.05, 8).astype(np.float32)
    wb = rng.normal(0, 0.25, (8, 8, 3, 3)).astype(np.float32)
    bb = rng.normal(0.0, 0.05, 8).astype(np.float32)
    wc = rng.normal(0, 0.4, (8, 8, 1, 1)).astype(np.float32)
    bc = np.zeros(8, np.float32)
    wf = rng.normal(0, 3.0, (1, 8)).astype(np.float32)
    bf = np.array([2.0], np.float32)
    if planted:
        wa[0] *= 1000.0
        ba[0] = abs(ba[0]) * 1000.0
        wb[:, 0] = 0.0
    inits = [numpy_helper.from_array(a, n) for a, n in [(wa, "wa"), (ba, "ba"), (wb, "wb"), (bb, "bb"), (wc, "wc"), (bc, "bc"), (wf, "fc.weight"), (bf, "fc.bias")]]
    nodes = [
        helper.make_node("Conv", ["image", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Conv", ["a_relu", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["b_relu"], name="relu_b"),
        helper.make_node("Conv", ["b_relu", "wc", "bc"], ["c"], name="conv_c"),
        helper.make_node("Relu", ["c"], ["c_relu"], name="relu_c"),
        helper.make_node("GlobalAveragePool", ["c_relu"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logit"], name="fc", transB=1),
        helper.make_node("Sigmoid", ["logit"], ["score"], name="sigmoid"),
    ]
    if residual:
        inits.append(numpy_helper.from_array(np.full((1, 8, 1, 1), 0.25, np.float32), "shift"))
        nodes[4:7] = [
            helper.make_node("Conv", ["b_relu", "wc", "bc"], ["c"], name="conv_c"),
            helper.make_node("Add", ["c", "b_relu"], ["c_sum"], name="add_res"),
            helper.make_node("Relu", ["c_sum"], ["c_relu"], name="relu_c"),
            helper.make_node("Add", ["c_relu", "shift"], ["c_shift"], name="add_const"),
            helper.make_node("GlobalAveragePool", ["c_shift"], ["pooled"], name="pool"),
        ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", *TINY_SHAPE])],
        [helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="memexport-tests")
    proto.ir_version = 8
    set_metadata(proto, tiny_metadata())
    onnx.checker.check_model(proto)
    return proto


def write_tiny_cnn(path: Path | str, seed: int = 0, planted: bool = False, residual: bool = False) -> Path:
    """Write :func:`tiny_cnn_proto` to ``path`` and return it."""
    import onnx

    path = Path(path)
    onnx.save(tiny_cnn_proto(seed, planted, residual=residual), str(path))
    return path


# --- Reliability tests (issue 6): a scorer with ResMem's input contract and preprocessing. ---
SCORER_WEIGHTS = np.array([0.5, 1.0, 1.5], dtype=np.float32).reshape(3, 1, 1)


def scorer_metadata(model: str = "tiny-scorer", crop: int = 227) -> ArtifactMetadata:
    from dataclasses import replace

    from memexport.core.spec import RESMEM

    return ArtifactMetadata(
        model=model, precision="fp32", input_name="image", output_name="score",
        input_shape=(3, crop, crop), preprocess=replace(RESMEM.preprocess, crop=crop), opset=17,
        weights={"path": None, "seed": 0}, versions={"memexport": "test"},
    )


def scorer_scores(batch: np.ndarray) -> np.ndarray:
    """What :func:`write_tiny_scorer` computes, in numpy: sigmoid(mean(image * w))."""
    mean = (batch.astype(np.float64) * SCORER_WEIGHTS).mean(axis=(1, 2, 3))
    return (1.0 / (1.0 + np.exp(-mean))).astype(np.float32)


def write_tiny_scorer(path: Path | str, seal: bool = True, external_data: bool = False, model: str = "tiny-scorer", crop: int = 227,
                      precision: str = "fp32", sign: float = 1.0, **extra: str) -> Path:
    """A microsecond-fast scorer taking (N, 3, 227, 227) like ResMem, with memexport metadata.

    Args:
        path: Destination ``.onnx``.
        seal: Record the integrity sha256 as ``memexport export`` does (default ``True``).
        external_data: Store the weight tensor in ``<name>.data`` beside the model (default ``False``).
        model: The model name its metadata records (default ``tiny-scorer``).
        crop: Its centre crop of ResMem's 256x256 resize (default 227, ResMem's; 224 is ViTMem's).
        precision: The precision its metadata records (default ``fp32``; the graph stays FP32).
        sign: Multiplies the weights (``-1``: the scores become ``1 - score``, so two artifacts differ).
        extra: Records for the metadata's ``extra`` (``output_meaning="..."``).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from memexport.export.onnx_export import set_metadata

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, crop, crop])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])
    nodes = [
        helper.make_node("Mul", ["image", "w"], ["weighted"]),
        helper.make_node("ReduceMean", ["weighted"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Sigmoid", ["mean"], ["score"]),
    ]
    graph = helper.make_graph(nodes, "tiny_scorer", [image], [score], initializer=[numpy_helper.from_array(SCORER_WEIGHTS * np.float32(sign), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="memexport-tests")
    proto.ir_version = 8
    set_metadata(proto, dataclasses.replace(scorer_metadata(model, crop), precision=precision).with_extra(**extra))
    path = Path(path)
    locations: list[str] = []
    if external_data:
        location = f"{path.name}.data"
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
        locations.append(location)
    else:
        onnx.save(proto, str(path))
    if seal:
        from memexport.runtime.integrity import seal_onnx

        seal_onnx(path, locations)
    return path

