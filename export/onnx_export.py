"""``onnx_from_torch``: trace a declared model into an ONNX file with its metadata."""

from __future__ import annotations

import importlib
import platform
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from memexport.core.version import __version__
from memexport.core.atomic import atomic_path
from memexport.core.errors import ArtifactError, CheckpointError, UsageError
from memexport.export.weights import WeightsSource
from memexport.runtime.integrity import model_not_found, seal_onnx
from memexport.runtime.metadata import METADATA_KEY, ArtifactMetadata
from memexport.core.spec import ModelSpec

# TensorRT 8.6 (the last release for Pascal) parses opset 17 at most; newer opsets only
# help TensorRT 10+, so 17 is the portable default.
MAX_TENSORRT86_OPSET = 17


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    Attributes:
        opset: ONNX opset (default 17, the highest TensorRT 8.6 parses).
        trace_batch: Batch size of the tracing input (default 2, so no axis is specialised to 1).
        check: Run ``onnx.checker`` on the result (default ``True``).
    """

    opset: int = 17
    trace_batch: int = 2
    check: bool = True


def build_torch_model(spec: ModelSpec, weights: WeightsSource) -> Any:
    """Instantiate ``spec``'s torch module (eval mode) from its ``builder`` entry point."""
    module_name, _, func = spec.builder.partition(":")
    builder: Callable[[WeightsSource], Any] = getattr(importlib.import_module(module_name), func)
    return builder(weights)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def export_metadata(spec: ModelSpec, weights: WeightsSource, opset: int, model: Any) -> ArtifactMetadata:
    import onnx
    import torch

    weights_record = weights.describe()
    # Multi-part models (M3M) report which parts were randomly initialised.
    weights_record["random_init"] = list(getattr(model, "random_init_parts", []))
    return ArtifactMetadata(
        model=spec.name,
        precision="fp32",
        input_name=spec.input_name,
        output_name=spec.output_name,
        input_shape=tuple(spec.input_shape),
        preprocess=spec.preprocess,
        opset=opset,
        weights=weights_record,
        versions={
            "memexport": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "python": platform.python_version(),
        },
        # What the score means travels with the artifact, for servers and readers without the spec.
        extra={"parameters": count_parameters(model), "output_meaning": spec.output_meaning},
    )


def set_metadata(model_proto: Any, metadata: ArtifactMetadata) -> None:
    """Replace the memexport entry in an ``onnx.ModelProto``'s ``metadata_props``."""
    keep = [p for p in model_proto.metadata_props if p.key != METADATA_KEY]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    entry = model_proto.metadata_props.add()
    entry.key = METADATA_KEY
    # An integrity record copied from a source artifact (fp32 -> fp16/int8) would not match the
    # new bytes; a derived artifact is unsealed until it is sealed itself (runtime.integrity.seal_onnx).
    extra = {k: v for k, v in metadata.extra.items() if k != "integrity"}
    entry.value = replace(metadata, extra=extra).to_json()


def require_valid_onnx(path: Path, output: Path | str, full_check: bool = True) -> None:
    """Run ``onnx.checker`` on the written file ``path`` (the temporary of ``output``).

    Raises:
        ArtifactError: One line naming ``output`` and the checker's first complaint.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=full_check)
    except onnx.checker.ValidationError as exc:
        raise ArtifactError(f"{output}: graph fails onnx.checker ({str(exc).splitlines()[0]}); this is a memexport bug, please report it") from None


def load_fp32_artifact(model: Path | str, purpose: str) -> tuple[Any, ArtifactMetadata]:
    """Load an FP32 memexport ONNX and its metadata, as the input of a conversion step.

    Args:
        model: The ``.onnx`` that ``memexport export`` wrote.
        purpose: What needs it, for messages (e.g. ``"calibration"``).

    Raises:
        ArtifactError: Missing or unreadable file, or no memexport metadata.
        UsageError: The model is not FP32.
    """
    import onnx

    from memexport.runtime.metadata import metadata_from_map

    model = Path(model)
    if not model.is_file():
        raise model_not_found(model)
    try:
        proto = onnx.load(str(model))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt artifact
        raise ArtifactError(f"{model}: not a readable ONNX file ({type(exc).__name__}); re-export it") from None
    metadata = metadata_from_map({p.key: p.value for p in proto.metadata_props}, model)
    if metadata.precision != "fp32":
        raise UsageError(f"{model}: {purpose} needs the FP32 model, this one is {metadata.precision}; pass the file `memexport export` wrote")
    return proto, metadata


def save_onnx_artifact(proto: Any, metadata: ArtifactMetadata, output: Path | str, check: bool = False) -> Path:
    """Embed ``metadata`` in ``proto``, write it atomically to ``output`` and seal its integrity digest.

    Every derived artifact (FP16, INT8) goes through here, so each is crash-safe and tamper-evident
    like an export.

    Args:
        proto: The ``onnx.ModelProto`` (weights inline; under 2 GB).
        metadata: What the artifact is.
        output: Destination ``.onnx``.
        check: Run ``onnx.checker`` on the written file (default ``False``).

    Raises:
        ArtifactError: The graph fails ``onnx.checker``.
    """
    import onnx

    set_metadata(proto, metadata)
    with atomic_path(output, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
        if check:
            require_valid_onnx(tmp, output, full_check=False)
        seal_onnx(tmp)
    return Path(output)


def checked_torch_model(spec: ModelSpec, weights: WeightsSource, options: ExportOptions) -> Any:
    """Build ``spec``'s torch module after checking the opset, and check its parameter count.

    Raises:
        UsageError: An opset below 13. CheckpointError: Bad weights, or a count out of step with the spec.
    """
    # Opsets above 17 are allowed (TensorRT 10+ parses them) but TensorRT 8.6 will not.
    if options.opset < 13:
        raise UsageError(f"opset {options.opset} is too old: expected 13..{MAX_TENSORRT86_OPSET} (default 17)")
    model = build_torch_model(spec, weights)
    parameters = count_parameters(model)
    if spec.parameters is not None and parameters != spec.parameters:
        raise CheckpointError(f"{spec.name}: built {parameters:,} parameters, expected {spec.parameters:,}; the model code is out of step with its spec")
    return model


def trace_to_onnx(model: Any, spec: ModelSpec, path: Path, options: ExportOptions, **export_args: Any) -> None:
    """Trace ``model`` into ``path`` with the TorchScript exporter (``dynamo=False``: opset 17 for TensorRT 8.6).

    Args:
        model: The torch module (eval mode).
        spec: Its spec: input and output names, input shape, dynamic axes.
        path: Where the exporter writes.
        options: Opset and trace batch.
        **export_args: Further ``torch.onnx.export`` arguments (``do_constant_folding``, ``export_params``).
    """
    import torch

    dummy = torch.zeros((options.trace_batch, *spec.input_shape), dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about constant folding and shape inference
        # internals that do not affect the graph; users should only see our own messages.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=options.opset,
            input_names=[spec.input_name],
            output_names=[spec.output_name],
            dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()},
            **export_args,
        )


def stamp(proto: Any, spec: ModelSpec, metadata: ArtifactMetadata) -> None:
    """Mark an exported ``onnx.ModelProto`` as memexport's: producer, description and metadata."""
    proto.producer_name = "memexport"
    proto.producer_version = __version__
    proto.doc_string = spec.description
    set_metadata(proto, metadata)


def onnx_from_torch(
    spec: ModelSpec, weights: WeightsSource, output: Path | str, options: ExportOptions = ExportOptions()
) -> ArtifactMetadata:
    """Export ``spec`` with ``weights`` to ``output`` (TorchScript exporter, dynamic batch).

    The TorchScript exporter (``dynamo=False``) is used because it writes opset 17, which
    TensorRT 8.6 needs; the dynamo exporter writes opset 18 or higher. The file appears
    under its final name only once complete.

    Args:
        spec: The model to export.
        weights: Its checkpoint(s).
        output: Destination ``.onnx`` path.
        options: Export options (default :class:`ExportOptions`).

    Returns:
        The metadata written into the file.

    Raises:
        CheckpointError: Bad weights. UsageError: Unsupported options. ArtifactError: The
            exported graph fails ``onnx.checker``.
    """
    import onnx

    if spec.external_data:
        raise UsageError(f"model {spec.name!r} needs external data; use its own exporter")
    output = Path(output)
    model = checked_torch_model(spec, weights, options)
    metadata = export_metadata(spec, weights, options.opset, model)
    with atomic_path(output, suffix=".onnx") as tmp:
        trace_to_onnx(model, spec, tmp, options, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        stamp(proto, spec, metadata)
        onnx.save(proto, str(tmp))
        if options.check:
            require_valid_onnx(tmp, output)
        # Last step before the rename: the recorded sha256 lets every runner detect later tampering.
        record = seal_onnx(tmp)
    return metadata.with_extra(integrity=record)
