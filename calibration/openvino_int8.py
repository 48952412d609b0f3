"""INT8 for OpenVINO's CPU kernels (AMX, VNNI): NNCF's layout, memexport's ranges.

NNCF places OpenVINO ``FakeQuantize`` layers where OpenVINO's low-precision transformations
turn them into INT8 kernels: every convolution input *and* both inputs of each residual Add,
so the ResNet stream stays INT8 from block to block. That layout is what reaches 6-7x ONNX
Runtime FP32 on an AMX Xeon; a Q/DQ placement for TensorRT reaches 2.4x there.

NNCF's own ranges and bias correction lose the ranking, though (Spearman 0.977 against FP32 on
32 OpenCV photos, ResMem calibrated on 15 images). Measured on those photos, three changes
bring it to 0.996 (batch 16, in one process on a loaded Xeon with amx_bf16 amx_int8
avx512_bf16 avx512_vnni, 7.2x ONNX Runtime FP32 with the FP32 parts in BF16):

- every activation range is memexport's percentile of |x| (:data:`~memexport.calibration.cpu_int8.CPU_PERCENTILE`,
  from the statistics calibration already gathered), not NNCF's mean of per-image extremes, which
  clips the rare large activations of ResNet's deep blocks and gives the small AlexNet-branch
  features of ResMem the range of the ResNet features they are concatenated with (Spearman 0.988);
- the spec's pinned layers (ResMem: the stem and layer1) and the fully connected head (``MatMul``)
  stay out of INT8, weights included (0.991 with both);
- no bias correction: NNCF's fast bias correction, fitted on 15 images, raised the error on new
  photos (0.9956 without it).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from memexport.core.errors import CalibrationError
from memexport.core.optional import require

# Fully connected layers (ONNX Gemm becomes OpenVINO MatMul): a tiny share of the time and the
# most rank-sensitive part of a scorer, as for the ONNX Runtime CPU artifact.
from memexport.core.spec import INT8_OPENVINO_FP32_OPS as FP32_OPS  # noqa: E402 - ResMem's, the default
# NNCF only places the quantizers from these images (every range and sign is memexport's, from
# each build's own statistics, :func:`apply_ranges`), so a few do.
PLACEMENT_IMAGES = 4
# Symmetric signed INT8 spans [-128, 127] steps: NNCF's low end is the high end times 128/127.
SIGNED_LOW = 128.0 / 127.0


@dataclass(frozen=True)
class OpenVinoInt8Options:
    """How to quantise for OpenVINO's CPU plugin.

    Attributes:
        pinned: Node-name prefixes kept out of INT8 (default none; ResMem's spec pins its stem and layer1).
        exclude: ONNX layer (node) names kept out of INT8: the guard's fallback set (default none).
        fp32_ops: OpenVINO op types kept out of INT8 (default :data:`FP32_OPS`).
    """

    pinned: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()
    fp32_ops: tuple[str, ...] = FP32_OPS


def require_modules() -> tuple[Any, Any]:
    ov = require("openvino", "openvino", "the OpenVINO INT8 artifact")
    nncf = require("nncf", "openvino", "the OpenVINO INT8 artifact")
    return ov, nncf


def ignored_patterns(options: OpenVinoInt8Options) -> list[str]:
    """NNCF ignored-scope patterns (``re.search`` on OpenVINO op names) for pinned and excluded layers.

    OpenVINO names a converted ONNX Conv ``<name>/WithoutBiases`` and its bias Add ``<name>``,
    so a layer's pattern matches its name and anything under it, never a longer sibling name.
    """
    return [f"^{re.escape(prefix)}" for prefix in options.pinned] + [f"^{re.escape(name)}(/|$)" for name in sorted(options.exclude)]


def _activation_quantizers(model: Any) -> list[tuple[Any, list[str]]]:
    """Each ``FakeQuantize`` with constant bounds, with the tensor names of its input."""
    out = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FakeQuantize":
            continue
        if all(node.input_value(index).get_node().get_type_name() == "Constant" for index in range(1, 5)):
            out.append((node, sorted(node.input_value(0).get_names())))
    return out


def ranged_tensors(model: Any, amax: Mapping[str, float]) -> list[str]:
    """The tensors of ``amax`` that feed a ``FakeQuantize`` of ``model`` (the ones :func:`apply_ranges` sets).

    Raises:
        CalibrationError: ``model`` has quantizers but none of them reads a tensor of ``amax``
            (OpenVINO renamed the tensors): every range would silently stay NNCF's.
    """
    quantizers = _activation_quantizers(model)
    names = sorted({name for _, inputs in quantizers for name in inputs if name in amax})
    if quantizers and not names:
        seen = sorted({name for _, inputs in quantizers for name in inputs})[:5]
        raise CalibrationError(
            f"none of the {len(quantizers)} OpenVINO quantizers reads a tensor named in the calibration statistics "
            f"(they read {seen}); the IR's tensor names no longer match the ONNX model's, so memexport's ranges cannot be set"
        )
    return names


def apply_ranges(model: Any, amax: Mapping[str, float], signed: Mapping[str, bool]) -> int:
    """Give the activation ``FakeQuantize`` of each tensor in ``amax`` memexport's range; returns how many changed.

    A quantizer takes unsigned ``[0, a]`` or symmetric ``[-a * 128/127, a]`` with ``a = amax[tensor]``,
    signed exactly when ``signed[tensor]`` says the statistics saw negative values (NNCF's own sign
    comes from its few placement images, which are calibration images of some fold: deciding it
    from the build's own statistics keeps a cross-validation fold's build free of the images it
    judges). Tensors missing from ``signed`` keep NNCF's sign. Quantizers on tensors without a range
    (inside OpenVINO-made subgraphs) keep NNCF's range; pass :func:`ranged_tensors` to set all.

    Args:
        model: ``openvino.Model`` from NNCF, changed in place.
        amax: Range per ONNX tensor name (OpenVINO keeps ONNX tensor names).
        signed: Whether each tensor took negative values during calibration.

    Raises:
        CalibrationError: A tensor of ``amax`` feeds no ``FakeQuantize`` (the error names them):
            silently skipping it would leave NNCF's range, built from other images, in its place.
    """
    from openvino import opset13 as ops

    changed, found = 0, set()
    for node, inputs in _activation_quantizers(model):
        names = [name for name in inputs if name in amax]
        if not names:
            continue
        found.update(names)
        bounds = [node.input_value(index).get_node() for index in range(1, 5)]
        high = np.float32(max(amax[names[0]], 1e-8))
        unsigned = not signed[names[0]] if names[0] in signed else float(bounds[0].get_data().min()) >= 0.0
        low = np.float32(0.0) if unsigned else -high * np.float32(SIGNED_LOW)
        for index, value in enumerate((low, high, low, high), start=1):
            shape = bounds[index - 1].get_data().shape
            node.input(index).replace_source_output(ops.constant(np.full(shape, value, np.float32)).output(0))
        changed += 1
    missing = sorted(set(amax) - found)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CalibrationError(
            f"{len(missing)} range(s) name no quantized tensor of the OpenVINO model: {shown}; "
            "expected the ONNX tensor names NNCF kept (pass ranged_tensors(model, amax) to choose them)"
        )
    model.validate_nodes_and_infer_types()
    return changed


def openvino_int8_model(
    model: Path | str, placement: np.ndarray, amax: Mapping[str, float], signed: Mapping[str, bool], options: OpenVinoInt8Options = OpenVinoInt8Options()
) -> Any:
    """The INT8 ``openvino.Model`` of an FP32 ONNX file.

    Args:
        model: FP32 ONNX file.
        placement: A few preprocessed images (float32 NCHW) NNCF runs while placing quantizers.
        amax: Activation range per tensor (see :func:`apply_ranges`).
        signed: Whether each tensor took negative values.
        options: See :class:`OpenVinoInt8Options`.

    Raises:
        BackendUnavailableError: openvino or nncf is not installed.
    """
    ov, nncf = require_modules()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    nncf.set_log_level(logging.ERROR)
    fp32 = ov.convert_model(str(model))
    dataset = nncf.Dataset([placement[index : index + 1] for index in range(len(placement))])
    scope = nncf.IgnoredScope(patterns=ignored_patterns(options), types=list(options.fp32_ops), validate=False)
    quantized = nncf.quantize(
        fp32, dataset, subset_size=len(placement), ignored_scope=scope,
        advanced_parameters=AdvancedQuantizationParameters(disable_bias_correction=True),
    )
    apply_ranges(quantized, {name: amax[name] for name in ranged_tensors(quantized, amax)}, signed)
    return quantized


def inference_precision(core: Any) -> str:
    """``bf16`` where OpenVINO says the CPU computes BF16 natively (AMX, AVX512-BF16), else ``f32``.

    The INT8 artifact's non-INT8 layers run in this precision; the guard scores it the same way.
    """
    return "bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


def openvino_scores(model: Any, batch: np.ndarray, precision: str = "f32", chunk: int = 16) -> np.ndarray:
    """Scores (first output, flattened) of ``batch`` from ``model`` on OpenVINO's CPU plugin.

    Args:
        model: ``openvino.Model``.
        batch: float32 NCHW images.
        precision: ``INFERENCE_PRECISION_HINT`` for the layers not in INT8 (default ``f32``).
        chunk: Images per inference (default 16).
    """
    ov, _ = require_modules()
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    parts = [np.array(request.infer({0: batch[i : i + chunk]})[0]).reshape(-1) for i in range(0, len(batch), chunk)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def save_openvino_artifact(model: Any, metadata: Any, output: Path | str) -> Path:
    """Write ``model`` as OpenVINO IR (``output`` ``.xml`` plus its ``.bin``) with ``metadata``, atomically.

    The metadata JSON goes into the IR's ``rt_info`` under ``memexport``, where the OpenVINO
    runner reads it, sealed (:func:`memexport.runtime.ir_integrity.seal_openvino_ir`). The ``.bin`` is renamed into place before the ``.xml``, so a reader never
    finds a new ``.xml`` beside old weights. FP32 weights stay FP32 (no FP16 compression).
    """
    ov, _ = require_modules()
    from memexport.core.atomic import atomic_path
    from memexport.runtime.ir_integrity import seal_openvino_ir
    from memexport.runtime.metadata import METADATA_KEY

    output = Path(output)
    model.set_rt_info(metadata.to_json(), [METADATA_KEY])
    # convert_model keeps the FP32 model's ONNX metadata under "framework"; it must not shadow this one.
    model.set_rt_info(metadata.to_json(), ["framework", METADATA_KEY])
    with atomic_path(output, ".xml") as xml, atomic_path(output.with_suffix(".bin"), ".bin") as weights:
        try:
            ov.save_model(model, str(xml), compress_to_fp16=False)
            seal_openvino_ir(xml)  # after the last save: the digest covers the .xml as written and its .bin
            xml.with_suffix(".bin").replace(weights)
        finally:
            xml.with_suffix(".bin").unlink(missing_ok=True)
    return output

