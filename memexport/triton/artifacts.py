"""What a Triton model repository needs to know about an artifact, read from the artifact itself.

One :class:`ArtifactFacts` per artifact: its files (the ONNX external-data pair, the IR's
``.xml``/``.bin``, the plan and its sidecar), the Triton back end that runs it, its memexport
metadata, and its input and output dims without the batch dimension, as the graph declares
them. ``memexport triton-repo`` writes configs from these facts and ``--check`` compares a
repository against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from memexport.core.errors import ArtifactError, UsageError
from memexport.runtime.metadata import ArtifactMetadata

# Triton back end (``backend:`` / ``platform:``) per artifact kind.
ONNXRUNTIME, OPENVINO, TENSORRT, PYTHON = "onnxruntime", "openvino", "tensorrt_plan", "python"


@dataclass(frozen=True)
class ArtifactFacts:
    """An artifact as the repository generator and checker see it.

    Attributes:
        path: The artifact (``.onnx``, ``.xml`` or ``.plan``).
        backend: ``onnxruntime``, ``openvino`` or ``tensorrt_plan``.
        metadata: Its memexport metadata.
        files: Every file that must travel with it (model first).
        input_dims: Graph input dims without the batch dimension.
        output_dims: Graph output dims without the batch dimension (``()``: one value per image).
        notes: Back-end facts for the config's parameters (TensorRT version and GPU of a plan,
            the precision an IR's guard verified).
    """

    path: Path
    backend: str
    metadata: ArtifactMetadata
    files: tuple[Path, ...]
    input_dims: tuple[int, ...]
    output_dims: tuple[int, ...]
    notes: Mapping[str, str] = field(default_factory=dict)


def _static(dims: Any, where: str, what: str) -> tuple[int, ...]:
    """Dims after the batch dimension, all fixed integers."""
    rest = list(dims)[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise ArtifactError(f"{where}: {what} dims {list(dims)} are not fixed after the batch dimension; re-export with `memexport export`")
    return tuple(rest)


def onnx_facts(path: Path) -> ArtifactFacts:
    """Facts of an ``.onnx`` artifact, from an ONNX Runtime session on the CPU (integrity checked)."""
    from memexport.runtime.base import RunnerOptions
    from memexport.runtime.integrity import external_data_locations
    from memexport.runtime.registry import runner_for

    with runner_for(path, RunnerOptions(device="cpu"), backend="onnxruntime") as runner:
        meta = runner.metadata
        assert meta is not None
        inputs = {i.name: i.shape for i in runner.session.get_inputs()}
        outputs = {o.name: o.shape for o in runner.session.get_outputs()}
    files = (path, *(path.parent / location for location in dict.fromkeys(external_data_locations(path))))
    return ArtifactFacts(path, ONNXRUNTIME, meta, files, _static(inputs[meta.input_name], str(path), "input"),
                         _static(outputs[meta.output_name], str(path), "output"))


def ir_facts(path: Path) -> ArtifactFacts:
    """Facts of an OpenVINO IR: metadata read by memexport's runtime, shapes by OpenVINO."""
    from memexport.core.optional import require
    from memexport.runtime.ir_integrity import ir_metadata_value
    from memexport.runtime.metadata import METADATA_KEY, metadata_from_map

    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise ArtifactError(f"{path}: an OpenVINO IR needs its .xml and .bin side by side; re-run `memexport calibrate`")
    value = ir_metadata_value(path)
    meta = metadata_from_map({METADATA_KEY: value} if value is not None else {}, path)
    ov = require("openvino", "openvino", "reading an OpenVINO IR's shapes")
    model = ov.Core().read_model(str(path))
    shapes = {name: port.get_partial_shape() for port in [*model.inputs, *model.outputs] for name in port.get_names()}
    dims = {name: [d.get_length() if d.is_static else -1 for d in shape] for name, shape in shapes.items()}
    precision = str(meta.extra.get("inference_precision", "f32"))
    notes = {"MEMEXPORT_PRECISION": meta.precision, "MEMEXPORT_INFERENCE_PRECISION": precision}
    return ArtifactFacts(path, OPENVINO, meta, (path, path.with_suffix(".bin")), _static(dims[meta.input_name], str(path), "input"),
                         _static(dims[meta.output_name], str(path), "output"), notes)


def plan_facts(path: Path) -> ArtifactFacts:
    """Facts of a TensorRT plan, from its sidecar (no TensorRT or GPU needed)."""
    from memexport.core.spec import MODELS
    from memexport.runtime.engine_sidecar import read_sidecar, sidecar_path

    sidecar = read_sidecar(path)
    meta = sidecar.metadata
    spec = MODELS.get(meta.model)
    output = tuple(spec.output_shape) if spec is not None else (1,)
    notes = {
        "MEMEXPORT_TENSORRT_VERSION": str(sidecar.tensorrt),
        "MEMEXPORT_GPU": f"{sidecar.gpu.get('name')} (compute capability {sidecar.gpu.get('compute_capability')})",
        "MEMEXPORT_NOTE": "a TensorRT engine only runs with the TensorRT version and on the GPU model that built it; "
                          "rebuild it with `memexport build` on the serving machine otherwise",
    }
    max_batch = sidecar.max_shape[0]
    return ArtifactFacts(path, TENSORRT, meta, (path, sidecar_path(path)), tuple(sidecar.max_shape[1:]), output,
                         {**notes, "MEMEXPORT_MAX_BATCH": str(max_batch)})


def artifact_facts(path: Path | str) -> ArtifactFacts:
    """The facts of any artifact memexport writes, by its suffix.

    Raises:
        UsageError: A suffix Triton cannot serve from memexport.
        ArtifactError: A missing, unreadable or tampered artifact.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    readers = {".onnx": onnx_facts, ".xml": ir_facts, ".plan": plan_facts, ".engine": plan_facts}
    if suffix not in readers:
        raise UsageError(f"{path}: cannot serve {suffix or '(no suffix)'!r} on Triton; pass an .onnx, an OpenVINO .xml or a TensorRT .plan")
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; check the path")
    return readers[suffix](path)
