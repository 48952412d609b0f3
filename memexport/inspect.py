"""``inspect``: what an artifact is and what it will cost, without running it.

For an ONNX artifact it reports the embedded metadata, the files (model and external data),
the parameter count, the weight bytes at FP32, FP16 and INT8, and the estimated VRAM need
per batch size against the budget (:func:`memexport.runtime.budget.estimate_vram`).

With the ``onnx`` package the graph is read without its weights (an M3M artifact's 2 GB data
file is never loaded) and activations come from ONNX shape inference. Without ``onnx`` the
metadata comes from an ONNX Runtime session, and the VRAM estimate counts no activations
(it says so).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

from memexport.core.errors import ArtifactError

DEFAULT_BATCH_SIZES = (1, 8, 16, 32)
# Tensors above this stay out of the shape-inference copy: only their dims matter there.
_SHAPE_ONLY_BYTES = 1024


def weight_bytes(parameters: int) -> dict[str, int]:
    """Bytes of ``parameters`` weights stored at FP32, FP16 and INT8."""
    from memexport.runtime.budget import BYTES_PER_WEIGHT

    return {precision: parameters * size for precision, size in BYTES_PER_WEIGHT.items()}


def vram_table(
    parameters: int, activation_elements_per_image: int, batch_sizes: Sequence[int], budget_bytes: int
) -> dict[str, Any]:
    """Estimated VRAM per batch size and precision, with whether each fits ``budget_bytes``."""
    from memexport.runtime.budget import BYTES_PER_WEIGHT, estimate_vram, largest_batch_that_fits

    by_batch = {
        str(batch): {
            precision: estimate_vram(parameters, precision, batch, activation_elements_per_image, budget_bytes).as_dict()
            for precision in BYTES_PER_WEIGHT
        }
        for batch in batch_sizes
    }
    largest = {p: largest_batch_that_fits(parameters, p, activation_elements_per_image, budget_bytes) for p in BYTES_PER_WEIGHT}
    return {"budget_bytes": budget_bytes, "by_batch": by_batch, "largest_batch_that_fits": largest}


def _io(values: Any) -> list[dict[str, Any]]:
    from onnx import TensorProto

    out = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        out.append({"name": value.name, "shape": shape, "type": f"tensor({TensorProto.DataType.Name(tensor_type.elem_type).lower()})"})
    return out


def _graph_facts(path: Path) -> dict[str, Any]:
    """Inputs, outputs, metadata map, initializer elements, external files and activations, from ``onnx``."""
    import onnx

    from memexport.runtime.budget import activation_profile, onnx_parameter_count
    from memexport.runtime.integrity import check_external_data_location, onnx_external_locations

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt artifact
        raise ArtifactError(f"{path}: not a readable ONNX file ({type(exc).__name__}); re-export it") from None
    locations = onnx_external_locations(proto)
    check_external_data_location(path, locations)
    missing = [loc for loc in locations if not (path.parent / loc).is_file()]
    if missing:
        raise ArtifactError(f"{path}: external data file {missing[0]!r} is missing; keep the .onnx and its data file side by side")
    for tensor in proto.graph.initializer:
        if len(tensor.raw_data) > _SHAPE_ONLY_BYTES:
            tensor.ClearField("raw_data")  # shape inference needs the dims only
    initializers = {t.name for t in proto.graph.initializer}
    profile = activation_profile(proto)
    return {
        "inputs": _io(v for v in proto.graph.input if v.name not in initializers),
        "outputs": _io(proto.graph.output),
        "props": {p.key: p.value for p in proto.metadata_props},
        "onnx_initializer_elements": onnx_parameter_count(proto),
        "external_data": {loc: (path.parent / loc).stat().st_size for loc in locations},
        "activation_elements_per_image": profile.peak_elements,
        "activation_unknown_tensors": len(profile.unknown),
    }


def _runtime_facts(path: Path) -> dict[str, Any]:
    """The same facts from an ONNX Runtime session, for installs without ``onnx`` (no activations)."""
    from memexport.runtime.base import RunnerOptions
    from memexport.runtime.onnxruntime_runner import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path, RunnerOptions(device="cpu")) as runner:
        session = runner.session
        return {
            "inputs": [{"name": i.name, "shape": i.shape, "type": i.type} for i in session.get_inputs()],
            "outputs": [{"name": o.name, "shape": o.shape, "type": o.type} for o in session.get_outputs()],
            "props": dict(session.get_modelmeta().custom_metadata_map),
            "onnx_initializer_elements": None,
            "external_data": {},
            "activation_elements_per_image": None,
            "activation_unknown_tensors": None,
        }


def _ir_facts(path: Path) -> dict[str, Any]:
    """An OpenVINO IR as its runner sees it once loaded (integrity checked first), with its metadata."""
    from memexport.runtime.ir_integrity import check_openvino_ir
    from memexport.runtime.registry import runner_for

    with runner_for(path) as runner:
        facts = runner.describe()
        assert runner.metadata is not None
        extra = dict(runner.metadata.extra)
    return facts | extra | {"integrity_verified": check_openvino_ir(path) is not None}


def inspect_artifact(
    path: Path | str, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, budget_bytes: int | None = None
) -> dict[str, Any]:
    """Describe an artifact: metadata, files, parameters, weight bytes and VRAM estimates.

    Args:
        path: ``.onnx`` artifact, ``.xml`` OpenVINO IR, or a TensorRT engine (described by its runner).
        batch_sizes: Batch sizes for the VRAM table (default 1, 8, 16, 32).
        budget_bytes: VRAM budget (default ``None``: 11 GiB, a GTX 1080 Ti).

    Returns:
        A JSON-friendly dict. ``parameters`` is the trainable count recorded at export (the
        initializer element count where none was recorded); ``weight_bytes`` maps fp32/fp16/int8
        to bytes; ``vram_estimate`` holds one :class:`~memexport.runtime.budget.VramEstimate`
        per batch size and precision, or ``None`` without ``onnx``.

    Raises:
        ArtifactError: Missing, unreadable, tampered or non-memexport file, or external data
            outside the model's folder.
    """
    from memexport.runtime.budget import DEFAULT_BUDGET_BYTES
    from memexport.runtime.integrity import check_onnx, model_not_found
    from memexport.runtime.metadata import metadata_from_map
    from memexport.runtime.registry import runner_for

    path = Path(path)
    budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
    if path.suffix.lower() == ".xml":
        return _ir_facts(path)
    if path.suffix.lower() != ".onnx":
        return runner_for(path).describe()
    if not path.is_file():
        raise model_not_found(path)
    facts = _graph_facts(path) if importlib.util.find_spec("onnx") is not None else _runtime_facts(path)
    meta = metadata_from_map(facts["props"], path)
    integrity = check_onnx(path, parsed_value=facts["props"].get("memexport"))
    recorded = meta.extra.get("parameters")
    parameters = int(recorded) if recorded is not None else facts["onnx_initializer_elements"]
    activations = facts["activation_elements_per_image"]
    info: dict[str, Any] = {
        "path": str(path),
        "model": meta.model,
        "precision": meta.precision,
        "opset": meta.opset,
        "inputs": facts["inputs"],
        "outputs": facts["outputs"],
        "preprocess": meta.preprocess.__dict__ | {"resize": list(meta.preprocess.resize)},
        "weights": dict(meta.weights),
        "versions": dict(meta.versions),
        "file_bytes": path.stat().st_size,
        "external_data": facts["external_data"],
        "total_bytes": path.stat().st_size + sum(facts["external_data"].values()),
        "integrity_verified": integrity is not None,
    }
    info.update({k: v for k, v in meta.extra.items()})
    info["parameters"] = parameters
    info["onnx_initializer_elements"] = facts["onnx_initializer_elements"]
    if parameters is not None:
        info["weight_bytes"] = weight_bytes(parameters)
    info["activation_elements_per_image"] = activations
    info["activation_unknown_tensors"] = facts["activation_unknown_tensors"]
    if parameters is not None and activations is not None:
        info["vram_estimate"] = vram_table(parameters, activations, batch_sizes, budget)
    else:
        info["vram_estimate"] = None
        info["vram_note"] = "install onnx (pip install 'memexport[export]') to estimate activations and VRAM"
    return info
