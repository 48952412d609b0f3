"""``fp16_onnx_from_onnx``: an FP16 ONNX with FP32 inputs and outputs.

Weights and activations become float16; the graph input and output stay float32, so every
runner, ``predict`` and ``verify`` feed it exactly as the FP32 model. The conversion itself is
ONNX Runtime's (``onnxruntime.transformers.float16``, shipped in the onnxruntime wheel).

TensorRT 11 has no FP16 builder flag any more: an FP16 ONNX is how FP16 engines are asked for.
On Pascal GP102 (GTX 1080 Ti) FP16 runs at 1/64 rate, so there it is for memory, not speed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memexport.core.errors import ArtifactError
from memexport.core.optional import require

from memexport.core.spec import FP16_KEEP_OPS as DEFAULT_KEEP_FP32, find_spec


@dataclass(frozen=True)
class Fp16Options:
    """How to convert.

    Attributes:
        keep_fp32_ops: Op types left in FP32 (default ``None``: the model's declared ``fp16_keep_ops``;
            Sigmoid, Pow and Div, ResMem's, for a model this installation does not declare).
        check: Run ``onnx.checker`` on the result (default ``True``).
    """

    keep_fp32_ops: tuple[str, ...] | None = None
    check: bool = True


def fp16_proto_from_proto(proto: Any, options: Fp16Options = Fp16Options()) -> Any:
    """Convert an FP32 ``onnx.ModelProto`` to FP16 with FP32 inputs and outputs."""
    float16 = require("onnxruntime.transformers.float16", "export", "FP16 conversion", "install onnxruntime>=1.16")
    DEFAULT_OP_BLOCK_LIST, convert_float_to_float16 = float16.DEFAULT_OP_BLOCK_LIST, float16.convert_float_to_float16
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(options.keep_fp32_ops or DEFAULT_KEEP_FP32))
    converted = convert_float_to_float16(proto, keep_io_types=True, op_block_list=block)
    sort_topologically(converted.graph)
    return converted


def _outer_references(node: Any) -> set[str]:
    """Names a node's subgraphs (If/Loop bodies) read from the enclosing graph."""
    names: set[str] = set()
    for attribute in node.attribute:
        for sub in list(attribute.g.node and [attribute.g]) + list(attribute.graphs):
            inner = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for child in sub.node:
                names |= {n for n in set(child.input) | _outer_references(child) if n and n not in inner}
                inner.update(child.output)
    return names


def sort_topologically(graph: Any) -> None:
    """Reorder ``graph.node`` so every node follows its producers (the converter appends its
    input casts last; ONNX and TensorRT's parser both need producer-first order)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    needs = [set(n.input) | _outer_references(n) for n in nodes]
    pending, ordered = list(range(len(nodes))), []
    while pending:
        ready = [i for i in pending if needs[i] <= known]
        if not ready:
            raise ArtifactError(f"graph {graph.name!r} has a cycle or an undefined input near node {nodes[pending[0]].name!r}")
        for index in ready:
            ordered.append(nodes[index])
            known.update(nodes[index].output)
        done = set(ready)
        pending = [i for i in pending if i not in done]
    copies = []
    for node in ordered:
        copy = type(node)()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


def fp16_onnx_from_onnx(model: Path | str, output: Path | str, options: Fp16Options = Fp16Options()) -> Any:
    """Write the FP16 version of an FP32 memexport ONNX ``model`` to ``output``.

    Args:
        model: FP32 ONNX written by ``memexport export``.
        output: Destination ``.onnx`` (written atomically).
        options: See :class:`Fp16Options`.

    Returns:
        The :class:`~memexport.runtime.metadata.ArtifactMetadata` written (precision ``fp16``).

    Raises:
        ArtifactError: Missing or unreadable model. UsageError: The model is not FP32.
    """
    from memexport.export.onnx_export import load_fp32_artifact, save_onnx_artifact

    model, output = Path(model), Path(output)
    proto, metadata = load_fp32_artifact(model, "FP16 conversion")
    if options.keep_fp32_ops is None:
        spec = find_spec(metadata.model)
        options = dataclasses.replace(options, keep_fp32_ops=spec.fp16_keep_ops if spec else DEFAULT_KEEP_FP32)
    converted = fp16_proto_from_proto(proto, options)
    metadata = dataclasses.replace(metadata, precision="fp16").with_extra(converted_from=model.name, fp32_ops=list(options.keep_fp32_ops))
    save_onnx_artifact(converted, metadata, output, check=options.check)
    return metadata
