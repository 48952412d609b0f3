"""What the Triton Python back end runs for a memexport model repository (``memexport triton-repo``).

The generated ``model.py`` files are a few lines that put memexport on ``sys.path`` and hand
over to the classes here, so the preprocessing a Triton server runs is this package's own
(:mod:`memexport.runtime.preprocess`), imported, never copied. Triton's ``pb_utils`` module
exists only inside the back end's stub, so it is passed in rather than imported.

* :class:`PreprocessModel` decodes ``TYPE_STRING`` rows (one encoded image file each) into the
  model input; a request with bad rows fails with one line per bad row (``row 3: ...``),
  other requests in the same batch are unaffected.
* :class:`ScorerModel` scores preprocessed batches with a memexport runner: a stand-in for
  servers without the ``onnxruntime`` back end (the ``nvidia-pytriton`` wheel's ``tritonserver``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from memexport.core.errors import InputImageError
from memexport.core.spec import PreprocessSpec
from memexport.runtime.preprocess import preprocess_bytes

# Parameter keys the generator writes into config.pbtxt and the classes here read back.
SYS_PATH_KEY = "MEMEXPORT_SYS_PATH"
PREPROCESS_KEY = "MEMEXPORT_PREPROCESS"
ARTIFACT_KEY = "MEMEXPORT_ARTIFACT"


def parameter(config: Mapping[str, Any], key: str) -> str:
    """A ``parameters`` string value from a model config as Triton passes it (JSON), or ``""``."""
    return str(config.get("parameters", {}).get(key, {}).get("string_value", ""))


def decode_rows(rows: Sequence[Any], spec: PreprocessSpec, exif_transpose: bool = False) -> tuple[np.ndarray | None, list[str]]:
    """Decode and preprocess encoded image rows; every bad row is reported, not just the first.

    Args:
        rows: One encoded image per row (``bytes``; a 1-element array per row is accepted too).
        spec: The artifact's preprocessing.
        exif_transpose: Apply the EXIF orientation tag (default ``False``, as ``predict``).

    Returns:
        ``(batch, errors)``: the float32 NCHW batch (``None`` when a row failed) and one line per
        bad row, ``row N: <what is wrong>; <fix>`` with N counted from 0.
    """
    arrays, errors = [], []
    for index, row in enumerate(rows):
        data = row.reshape(-1)[0] if isinstance(row, np.ndarray) else row
        name = f"row {index}"
        try:
            if not isinstance(data, (bytes, bytearray)):
                raise InputImageError(name, "bad-input", f"expected encoded image bytes, got {type(data).__name__}; send BYTES")
            arrays.append(preprocess_bytes(bytes(data), name, spec, exif_transpose))
        except InputImageError as error:
            errors.append(str(error))
    if errors or not arrays:
        return None, errors
    return np.stack(arrays), errors


class PreprocessModel:
    """The ``<model>_preprocess`` step: image bytes ``[N, 1]`` in, float32 ``[N, C, H, W]`` out."""

    def __init__(self, pb_utils: Any, args: Mapping[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.pb = pb_utils
        self.spec = PreprocessSpec.from_json(parameter(config, PREPROCESS_KEY))
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request: a bad row fails its own request only."""
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        rows = self.pb.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
        batch, errors = decode_rows(list(rows), self.spec)
        if batch is None:
            return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError("\n".join(errors) or "no image rows sent"))
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(self.output_name, batch)])


class ScorerModel:
    """A Python-back-end scoring step over a memexport runner (for servers without the ONNX Runtime back end).

    Every request handed over in one ``execute`` call is scored in one inference, so the
    dynamic batcher's batches are the runner's batches.
    """

    def __init__(self, pb_utils: Any, args: Mapping[str, str]) -> None:
        from memexport.runtime.base import RunnerOptions
        from memexport.runtime.registry import runner_for

        config = json.loads(args["model_config"])
        self.pb = pb_utils
        folder = Path(args["model_repository"]) / str(args["model_version"])
        self.runner = runner_for(folder / parameter(config, ARTIFACT_KEY), RunnerOptions(device="cpu"))
        self.runner.__enter__()
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        output = config["output"][0]
        # A reshape in the config is the shape the model itself produces per image ([] for one value).
        dims = output["reshape"].get("shape", []) if "reshape" in output else output["dims"]  # an empty shape may be left out
        self.output_dims = [int(d) for d in dims]

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """Score every request's rows in one runner call, then split the scores back per request."""
        inputs = [self.pb.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        scores = self.runner.infer(np.ascontiguousarray(np.concatenate(inputs), dtype=np.float32))
        responses, start = [], 0
        for batch in inputs:
            part = scores[start : start + len(batch)].reshape(len(batch), *self.output_dims)
            responses.append(self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(self.output_name, part.astype(np.float32))]))
            start += len(batch)
        return responses

    def finalize(self) -> None:
        self.runner.__exit__(None, None, None)
