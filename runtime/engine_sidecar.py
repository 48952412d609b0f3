"""The engine sidecar: what a TensorRT plan is and what it is tied to, typed, with its reader.

Every plan has a JSON sidecar, ``<plan>.json``, written by ``memexport build``
(:func:`memexport.export.tensorrt.engine_from_onnx`). It records what the engine is (model,
precision, profile, preprocessing: the full artifact metadata) and what it is tied to (the
TensorRT version and the GPU). :class:`EngineSidecar` is that record; :func:`read_sidecar`
reads and checks it without TensorRT or a GPU, as :class:`ArtifactMetadata` is read from an
ONNX file. The JSON layout is unchanged from schema 1.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from packaging.version import InvalidVersion, Version

from memexport.core.errors import ArtifactError, EngineMismatchError
from memexport.runtime.integrity import sha256_file
from memexport.runtime.metadata import ArtifactMetadata

SIDECAR_FORMAT = "memexport-tensorrt-engine"
SIDECAR_SCHEMA = 1
SIDECAR_KEYS = ("format", "schema", "plan", "tensorrt", "gpu", "precision", "profile", "onnx", "calibration",
                "build_options", "device_memory_size", "memexport_version", "metadata")
OPTIONAL_KEYS = ("precision_source", "cuda_runtime", "workspace_bytes", "vram_estimate", "created")


def sidecar_path(plan: Path | str) -> Path:
    """``resmem.plan`` -> ``resmem.plan.json``."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


sha256_path = sha256_file  # the sidecar records plan and ONNX digests with the one file hasher


def io_bytes(input_shape: tuple[int, ...] | list[int], max_batch: int, output_elements: int = 1) -> int:
    """Device bytes of the runner's FP32 input and output buffers at ``max_batch`` (the builder's
    load estimate and the runner's allocation use this one formula)."""
    elements = 1
    for d in input_shape:
        elements *= int(d)
    return 4 * max_batch * (elements + output_elements)


def parse_compute_capability(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


@dataclass(frozen=True)
class EngineSidecar:
    """One engine's sidecar (schema 1).

    Attributes:
        plan: ``{"file", "bytes", "sha256"}`` of the plan it describes.
        tensorrt: The TensorRT version that built it.
        gpu: ``{"name", "compute_capability" ("6.1"), "total_memory"}`` of the build GPU.
        precision: ``fp32``, ``fp16`` or ``int8``.
        profile: ``{"input", "min", "opt", "max"}`` shapes of the optimisation profile.
        onnx: ``{"file", "sha256", "opset"}`` of the source ONNX.
        calibration: Calibration cache or Q/DQ record (``None`` unless INT8).
        build_options: The :class:`BuildOptions` used, JSON-friendly.
        device_memory_size: Execution memory at the profile's maximum, read back from the plan.
        memexport_version: The memexport that built it.
        metadata: The artifact metadata (model, preprocessing, tensor names, ...).
        precision_source: How the precision was reached (``builder-flag``, ``qdq-onnx``, ...).
        cuda_runtime: The CUDA runtime version at build time, when known.
        workspace_bytes: The builder workspace limit.
        vram_estimate: ``{"build": ..., "load": ...}`` estimates, as dicts.
        created: ISO time of the build.
    """

    plan: Mapping[str, Any]
    tensorrt: str
    gpu: Mapping[str, Any]
    precision: str
    profile: Mapping[str, Any]
    onnx: Mapping[str, Any]
    calibration: Mapping[str, Any] | None
    build_options: Mapping[str, Any]
    device_memory_size: int
    memexport_version: str
    metadata: ArtifactMetadata
    precision_source: str | None = None
    cuda_runtime: str | None = None
    workspace_bytes: int | None = None
    vram_estimate: Mapping[str, Any] | None = None
    created: str | None = None

    @property
    def max_shape(self) -> tuple[int, ...]:
        """The profile's largest input shape, batch first."""
        return tuple(int(d) for d in self.profile["max"])

    @property
    def compute_capability(self) -> tuple[int, int]:
        return parse_compute_capability(self.gpu["compute_capability"])

    def io_bytes(self) -> int:
        """FP32 input and output buffer bytes at the profile's maximum (see :func:`io_bytes`)."""
        shape = self.max_shape
        return io_bytes(shape[1:], shape[0])

    def as_dict(self) -> dict[str, Any]:
        """The JSON record (what :meth:`to_json` writes)."""
        record: dict[str, Any] = {"format": SIDECAR_FORMAT, "schema": SIDECAR_SCHEMA}
        for key in SIDECAR_KEYS[2:] + OPTIONAL_KEYS:
            record[key] = getattr(self, key)
        record["metadata"] = json.loads(self.metadata.to_json())
        return record

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, record: Any, where: str) -> "EngineSidecar":
        """Check a parsed sidecar and type it.

        Raises:
            ArtifactError: Unknown format or schema, or missing fields.
        """
        if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
            raise ArtifactError(f"{where}: not a memexport engine sidecar (expected format {SIDECAR_FORMAT!r}); rebuild the engine")
        if record.get("schema") != SIDECAR_SCHEMA:
            raise ArtifactError(f"{where}: sidecar schema {record.get('schema')!r}, this memexport reads {SIDECAR_SCHEMA}; rebuild or upgrade memexport")
        missing = [k for k in SIDECAR_KEYS if k not in record]
        if missing:
            raise ArtifactError(f"{where}: sidecar lacks {', '.join(missing)}; rebuild the engine")
        fields = {k: record[k] for k in SIDECAR_KEYS[2:] if k != "metadata"}
        fields.update({k: record.get(k) for k in OPTIONAL_KEYS})
        return cls(metadata=ArtifactMetadata.from_json(json.dumps(record["metadata"]), where), **fields)


def read_sidecar(plan: Path | str) -> EngineSidecar:
    """Read and check a plan's sidecar (no TensorRT or GPU needed).

    Raises:
        ArtifactError: Missing plan or sidecar, unreadable JSON, unknown format or missing fields.
    """
    plan = Path(plan)
    side = sidecar_path(plan)
    if not plan.is_file():
        raise ArtifactError(f"{plan}: engine file not found; build one with `memexport build resmem --fp16 -o {plan.name}`")
    if not side.is_file():
        raise ArtifactError(f"{plan}: its sidecar {side.name} is missing; engines are only loaded with the sidecar `memexport build` writes: rebuild it")
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{side}: sidecar is not valid JSON ({type(exc).__name__}); rebuild the engine") from None
    return EngineSidecar.from_dict(record, str(side))


def check_plan_matches(plan: Path, sidecar: EngineSidecar) -> None:
    """Refuse a plan that is not the one its sidecar describes (replaced, truncated or tampered).

    Raises:
        ArtifactError: Size or sha256 differ.
    """
    expected = sidecar.plan
    size = plan.stat().st_size
    if size != expected.get("bytes") or sha256_path(plan) != expected.get("sha256"):
        raise ArtifactError(
            f"{plan}: the plan ({size} bytes) is not the one its sidecar describes ({expected.get('bytes')} bytes, sha256 "
            f"{str(expected.get('sha256'))[:12]}...); the file was replaced or damaged: rebuild it with `memexport build`"
        )


def check_engine_compatible(sidecar: EngineSidecar, tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int],
                            plan: Path | str, allow_other_gpu_model: bool = False) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU.

    Args:
        sidecar: The engine's sidecar.
        tensorrt_version: ``tensorrt.__version__`` here.
        gpu_name: This GPU's name.
        compute_capability: This GPU's ``(major, minor)``.
        plan: The plan path (for the message).
        allow_other_gpu_model: Accept another GPU model of the same compute capability
            (TensorRT allows it but may run slower; default ``False``).

    Raises:
        EngineMismatchError: With what was built for, what is here, and how to fix it.
    """
    built, here = str(sidecar.tensorrt), str(tensorrt_version)
    try:
        same_trt = Version(built) == Version(here)
    except InvalidVersion:
        same_trt = built == here
    if not same_trt:
        raise EngineMismatchError(
            f"{plan}: built with TensorRT {built} but TensorRT {here} is installed; an engine only loads in the TensorRT "
            f"version that built it: rebuild it here with `memexport build` or install tensorrt=={built}"
        )
    gpu = sidecar.gpu
    built_cc = sidecar.compute_capability
    built_sm, here_sm = f"sm_{built_cc[0]}{built_cc[1]}", f"sm_{compute_capability[0]}{compute_capability[1]}"
    if built_cc != tuple(compute_capability):
        raise EngineMismatchError(
            f"{plan}: built for {gpu['name']} ({built_sm}) but this GPU is {gpu_name} ({here_sm}); engines are tied to the GPU "
            "architecture: rebuild it on this GPU with `memexport build`"
        )
    if gpu["name"] != gpu_name and not allow_other_gpu_model:
        raise EngineMismatchError(
            f"{plan}: built for {gpu['name']} but this GPU is {gpu_name} (both {here_sm}); rebuild it on this GPU with "
            "`memexport build`, or pass allow_other_gpu_model=True to accept possibly slower kernels"
        )
