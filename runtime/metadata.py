"""Artifact metadata: everything the runtime needs, stored inside the ONNX itself.

It lives under one ``metadata_props`` key, ``memexport``, as JSON, so ONNX Runtime reads it
without the ``onnx`` package and an artifact needs no other configuration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from memexport.core.errors import ArtifactError
from memexport.core.spec import PreprocessSpec

METADATA_KEY = "memexport"
SCHEMA_VERSION = 1
# TensorRT engines: their metadata lives in the sidecar beside them, not in the file.
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


@dataclass(frozen=True)
class ArtifactMetadata:
    """What an artifact is and how to feed it.

    Attributes:
        model: Model spec name (``resmem``, ``m3m``).
        precision: ``fp32``, ``fp16`` or ``int8``.
        input_name: Graph input name.
        output_name: Graph output name.
        input_shape: Per-image input shape (CHW).
        preprocess: The preprocessing that feeds the input.
        opset: ONNX opset of the graph.
        weights: Where the weights came from (path, sha256, seeds, random parts).
        versions: Tool versions at export (memexport, torch, onnx, ...).
        extra: Step-specific records (calibration method, images, fallback layers, ...).
    """

    model: str
    precision: str
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    preprocess: PreprocessSpec
    opset: int
    weights: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["schema"] = SCHEMA_VERSION
        data["input_shape"] = list(self.input_shape)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "<artifact>") -> "ArtifactMetadata":
        try:
            data = json.loads(text)
            data.pop("schema", None)
            data["preprocess"] = PreprocessSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["preprocess"].items()})
            data["input_shape"] = tuple(data["input_shape"])
            return cls(**data)
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{source}: memexport metadata is unreadable ({type(exc).__name__}: {exc}); re-export the model with `memexport export`"
            ) from None

    def with_extra(self, **updates: Any) -> "ArtifactMetadata":
        """Copy with ``extra`` updated (used by calibration and conversion)."""
        return replace(self, extra={**self.extra, **updates})

    @property
    def output_meaning(self) -> str:
        """What the ``score`` output means: the artifact's own record (``extra.output_meaning``, written at
        export), else its model's declaration (:class:`~memexport.core.spec.ModelSpec`), else ``"score"``."""
        from memexport.core.spec import find_spec

        recorded = self.extra.get("output_meaning")
        spec = find_spec(self.model) if not recorded else None
        return str(recorded) if recorded else spec.output_meaning if spec is not None else "score"


def metadata_from_map(props: Mapping[str, str], source: Path | str) -> ArtifactMetadata:
    """Parse metadata from an ONNX ``metadata_props`` map.

    Raises:
        ArtifactError: When the map holds no memexport metadata.
    """
    if METADATA_KEY not in props:
        raise ArtifactError(
            f"{source}: no memexport metadata in this ONNX file (expected a '{METADATA_KEY}' metadata entry); "
            "export it with `memexport export`"
        )
    return ArtifactMetadata.from_json(props[METADATA_KEY], str(source))

