"""One declaration per model: inputs, preprocessing, dynamic axes and tolerances.

Everything else (export, runtime, calibration, engines, parity, tests) reads these
specs; nothing restates their constants. This module is pure Python so that the
torch-free runtime can import it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping

from memexport.core.errors import UsageError

PRECISIONS = ("fp32", "fp16", "int8")

# How images are decoded (``--decode``): ``exact`` is the original code's pixels; ``fast`` decodes
# JPEGs at a DCT scale and box-reduces other formats first, then resizes with a filter derived for
# shrunk images (runtime/preprocess.py, runtime/resample.py).
DECODE_MODES = ("exact", "fast")

# ``fast`` keeps at least this many times the model's resize on each side before the final
# resize. Measured with ResMem on two sets of 12 MP camera photos no one tuned on (docs/throughput.md,
# tools/decode_rule.py; 64 from OpenCV samples, 40 from scikit-image's): 2x (JPEG at 1/4 scale,
# 1008x756) moved the scores by Spearman 0.9998 / 0.9996, mean abs 0.0011 / 0.0008 against exact
# decoding, within the decode tolerance, for 2.3x less CPU; 1x (1/8 scale) failed Spearman on the
# scikit-image set (0.9989) with twice the mean abs.
FAST_DECODE_OVERSAMPLE = 2


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model input, mirroring resmem's ``transformer``.

    Attributes:
        mode: PIL mode every image is converted to first (default ``"RGB"``).
        resize: ``(height, width)`` after resizing (default ``(256, 256)``), aspect ratio not kept.
        interpolation: PIL resampling filter name (default ``"bilinear"``).
        crop: Side of the centre crop (default 227).
        scale: Multiplier applied to uint8 pixels (default ``1/255``).
        mean: Per-channel mean subtracted after scaling (default ``None``: no normalisation).
        std: Per-channel std divided after the mean (default ``None``).
    """

    mode: str = "RGB"
    resize: tuple[int, int] = (256, 256)
    interpolation: str = "bilinear"
    crop: int = 227
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def fast_decode_size(self, oversample: int = FAST_DECODE_OVERSAMPLE) -> tuple[int, int]:
        """``(width, height)`` that ``--decode fast`` keeps on each side before the final resize."""
        height, width = self.resize
        return width * oversample, height * oversample

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        data = json.loads(text)
        for key in ("resize", "mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class Tolerance:
    """What counts as agreement between an artifact and its FP32 torch reference.

    Scores pass when ``statistic(|candidate - reference|) <= atol + rtol * statistic(|reference|)``.
    Ranks pass when Spearman's rho and Kendall's tau-b both reach their minimum.

    Attributes:
        atol: Absolute tolerance on the score statistic.
        rtol: Relative tolerance on the score statistic (default 0).
        statistic: ``"max"``, ``"mean"`` or ``"median"`` of the absolute errors (default ``"max"``).
        min_spearman: Lowest acceptable Spearman rho (default 0.99).
        min_kendall: Lowest acceptable Kendall tau-b (default 0.9).
    """

    atol: float
    rtol: float = 0.0
    statistic: str = "max"
    min_spearman: float = 0.99
    min_kendall: float = 0.9

    def describe(self) -> str:
        return (
            f"{self.statistic} abs err <= {self.atol:g} + {self.rtol:g}*{self.statistic}|ref|, "
            f"spearman >= {self.min_spearman:g}, kendall >= {self.min_kendall:g}"
        )


@dataclass(frozen=True)
class ModelSpec:
    """A memorability model, declared once.

    Attributes:
        name: CLI and metadata name (``resmem``, ``m3m``).
        builder: ``"module:function"`` that returns the torch module given a
            :class:`memexport.export.weights.WeightsSource`; imported lazily so specs stay torch-free.
        input_name: ONNX input name.
        input_shape: Per-image input shape, CHW.
        output_name: ONNX output name.
        output_shape: Per-image output shape.
        dynamic_axes: ONNX dynamic axes by tensor name.
        preprocess: The preprocessing that feeds ``input_name``.
        tolerances: Parity tolerances by precision (``fp32``, ``fp16``, ``bf16``, ``int8``).
        parameters: Expected trainable parameter count, checked at export.
        opset: Default ONNX opset (17: the highest TensorRT 8.6 parses).
        external_data: Whether the ONNX needs external data (weights over 2 GB).
        description: One line for ``--help`` and ``inspect``.
        int8_fp32_layers: Node-name prefixes every INT8 artifact (CPU U8S8, Q/DQ, OpenVINO) keeps
            out of INT8, on top of what the fidelity guard adds (default none).
        weight_parts: Named checkpoints the builder accepts besides the main one (default none;
            M3M's ``segmentation``, fed by ``export --segmentation-weights``).
        decode_tolerance: What ``--decode fast`` must keep against ``--decode exact`` on the same
            artifact, on camera-size photos (``verify --decode fast`` checks it).
        bf16_fp32_until: Graph tensors that end the part of the model a BF16 back end (OpenVINO
            ``--precision bf16``) still computes in FP32: everything that feeds them runs in FP32,
            the rest in BF16 (default none: the whole graph in BF16).
    """

    name: str
    builder: str
    input_name: str = "image"
    input_shape: tuple[int, int, int] = (3, 227, 227)
    output_name: str = "score"
    output_shape: tuple[int, ...] = (1,)
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(
        default_factory=lambda: {"image": {0: "batch"}, "score": {0: "batch"}}
    )
    preprocess: PreprocessSpec = PreprocessSpec()
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    parameters: int | None = None
    opset: int = 17
    external_data: bool = False
    description: str = ""
    int8_fp32_layers: tuple[str, ...] = ()
    weight_parts: tuple[str, ...] = ()
    bf16_fp32_until: tuple[str, ...] = ()
    decode_tolerance: "Tolerance" = field(default_factory=lambda: FAST_DECODE_TOLERANCE)

    def tolerance(self, precision: str) -> Tolerance:
        try:
            return self.tolerances[precision]
        except KeyError:
            raise UsageError(
                f"model {self.name!r} declares no tolerance for precision {precision!r}; "
                f"expected one of {sorted(self.tolerances)}"
            ) from None


# Tolerances follow what each precision can honestly promise against FP32 torch:
# FP32 ONNX differs only by kernel order; FP16 by half-precision rounding; BF16 (OpenVINO on
# AMX/AVX512-BF16: 8 mantissa bits) by about 1e-3 per score; INT8 is judged on ranks first,
# which is what memorability users consume. BF16's Kendall bound is what OpenVINO 2026.4 BF16
# measured on photos (0.976-0.988, 1.0 on tests/data; docs/measurements/2026-11-30-xeon-amx.md).
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, statistic="max", min_spearman=0.9999, min_kendall=0.99),
    "fp16": Tolerance(atol=1e-3, statistic="max", min_spearman=0.999, min_kendall=0.98),
    "bf16": Tolerance(atol=1e-2, statistic="max", min_spearman=0.999, min_kendall=0.97),
    "int8": Tolerance(atol=1e-2, statistic="mean", min_spearman=0.99, min_kendall=0.9),
}

# Fast decoding against exact decoding, same artifact: users consume a ranking, so Spearman first;
# mean abs 0.002 is a fifth of INT8's. Kendall follows Spearman 0.999 loosely (0.995-0.996 measured
# at 2x on the unseen camera photos; 0.97 leaves room for near-ties on small folders).
FAST_DECODE_TOLERANCE = Tolerance(atol=0.002, statistic="mean", min_spearman=0.999, min_kendall=0.97)

RESMEM = ModelSpec(
    name="resmem",
    builder="memexport.export.resmem:resmem_from_weights",
    tolerances=DEFAULT_TOLERANCES,
    parameters=131_688_809,
    description="ResMem (Needell & Bainbridge): ResNet-152 + AlexNet-style branch, sigmoid head",
    # The ResNet stem and first stage: about 8% of the FLOPs but, requantised layer by layer in
    # UINT8, as much rank error as the 36 blocks of layer3. Quantising layer1 alone costs
    # Spearman 0.994 / mean abs 0.005 on 47 held-out photos (docs/measurements/2026-11-22-epyc-vnni.md). Pinned in
    # the Q/DQ artifact too: with the same ranges (15 ../shared/images, p99.99), its score error
    # on the 32 OpenCV photos fell from 0.115 to 0.090 of the FP32 score spread (mean abs 0.0096
    # to 0.0068), and TensorRT runs the two stages in FP16/FP32 at little cost.
    int8_fp32_layers=("/features/conv1/", "/features/relu/", "/features/maxpool/", "/features/layer1/"),
    # The ResNet stem (conv1 7x7 on the normalised pixels, BN, ReLU, max pool) in FP32 under BF16:
    # BF16's 8-bit mantissa rounds the input about as coarsely as the pixels' own steps. In FP32 it
    # cut BF16's mean score error on 45 unseen photos from 0.0011 to 0.0009 (Spearman 0.9986 to
    # 0.9999) and on 400 synthetic JPEGs from 0.0010 to 0.0007, for about 2% of BF16's time
    # (docs/measurements/2026-11-30-xeon-amx.md). The AlexNet branch or the head in FP32 changed nothing; layer1 costs 10% more.
    bf16_fp32_until=("/features/maxpool/MaxPool_output_0",),
)

# A reconstruction (no M3M code or weights are public); see docs/models.md for the layer table.
# Only FP32 is declared: it is the precision whose parity CI checks for M3M.
M3M = ModelSpec(
    name="m3m",
    builder="memexport.export.m3m:m3m_from_weights",
    tolerances={"fp32": DEFAULT_TOLERANCES["fp32"]},
    parameters=509_742_158,
    external_data=True,
    weight_parts=("segmentation",),
    description="M3M (reconstruction): ResMem + frozen DeepLabV3-ResNet-101 segmentation branch, 13 classes",
)

MODELS: dict[str, ModelSpec] = {RESMEM.name: RESMEM, M3M.name: M3M}


def get_spec(name: str) -> ModelSpec:
    """Return the declared spec for ``name``.

    Raises:
        UsageError: When no model of that name is declared.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; expected one of: {', '.join(sorted(MODELS))}") from None
