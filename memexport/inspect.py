"""``inspect``: what an artifact is, without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memexport.errors import ArtifactError


def inspect_artifact(path: Path | str) -> dict[str, Any]:
    """Metadata, size and precision record of an ONNX artifact.

    Uses ONNX Runtime only (no ``onnx`` needed); when ``onnx`` is installed the parameter
    count is read from the graph's initializers too.

    Raises:
        ArtifactError: Missing, unreadable or non-memexport file.
    """
    from memexport.runtime.runners import OnnxRuntimeRunner, OrtOptions, runner_for

    path = Path(path)
    if path.suffix.lower() != ".onnx":
        runner = runner_for(path)
        describe = getattr(runner, "describe", None)
        if describe is None:
            raise ArtifactError(f"{path}: cannot inspect this artifact type; expected .onnx or a TensorRT engine with its sidecar")
        return describe()
    with OnnxRuntimeRunner(path, OrtOptions(device="cpu")) as runner:
        meta = runner.metadata
        assert meta is not None
        inputs = [{"name": i.name, "shape": i.shape, "type": i.type} for i in runner.session.get_inputs()]
        outputs = [{"name": o.name, "shape": o.shape, "type": o.type} for o in runner.session.get_outputs()]
    info: dict[str, Any] = {
        "path": str(path),
        "model": meta.model,
        "precision": meta.precision,
        "opset": meta.opset,
        "inputs": inputs,
        "outputs": outputs,
        "preprocess": meta.preprocess.__dict__ | {"resize": list(meta.preprocess.resize)},
        "weights": dict(meta.weights),
        "versions": dict(meta.versions),
        "file_bytes": path.stat().st_size,
    }
    info.update({k: v for k, v in meta.extra.items()})
    return info
