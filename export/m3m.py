"""M3M rebuilt from its published description, and its export past the 2 GB ONNX limit.

M3M (by the ResMem authors) adds a frozen semantic-segmentation branch to ResMem. Neither
code nor weights are public, so this module is a **reconstruction** from the paper's text:

* ResMem's modules, reused as they are (:mod:`memexport.export.resmem`): the ResNet-152
  ``features`` with its 1000 logits, the AlexNet-style branch ``conv1``..``conv5`` and the
  head ``fc6``..``fc12`` + sigmoid; only ``fc6`` is wider.
* ``segmentation``: a DeepLabV3 head (ASPP) on a dilated ResNet-101 backbone, laid out like
  torchvision's ``deeplabv3_resnet101`` (``backbone.*``, ``classifier.0.convs.*``,
  ``classifier.0.project.*``, ``classifier.1``..``classifier.4``) so a user's segmentation
  checkpoint loads, ending in 13 classes. Its logits are upsampled (bilinear) to 227x227 and
  turned into probabilities with a softmax.
* The "couple of convolution layers" (``segconv1``, ``segconv2``) shrink the 13x227x227 maps
  to 24x57x57 = 77,976 values, concatenated after the AlexNet (9216) and ResNet (1000)
  features, so ``fc6`` reads 88,192 values. That puts the model at 509,742,158 parameters,
  in the published "about 500M".

The layer table lives in docs/models.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from memexport.core.errors import ArtifactError, CheckpointError, UsageError
from memexport.export.resmem import AlexBranch, ResNet, add_head, head_forward, resnet152

if TYPE_CHECKING:  # pragma: no cover
    from memexport.export.onnx_export import ExportOptions
    from memexport.export.weights import WeightsSource
    from memexport.runtime.metadata import ArtifactMetadata
    from memexport.core.spec import ModelSpec

SEGMENTATION_CLASSES = 13
ALEX_FEATURES = 9216
RESNET_FEATURES = 1000
# segconv2 output: 24 channels at 57x57 (227 -> 114 -> 57 with two stride-2 convolutions).
SEGCONV_CHANNELS = (64, 24)
SEGCONV_FEATURES = SEGCONV_CHANNELS[-1] * 57 * 57
FC6_IN = ALEX_FEATURES + RESNET_FEATURES + SEGCONV_FEATURES
ASPP_RATES = (12, 24, 36)
# The segmentation checkpoint's training-only auxiliary head (torchvision's ``aux_loss=True``);
# inference never runs it, so its keys are dropped on load rather than rejected.
AUX_PREFIX = "aux_classifier."
# torchvision segmentation checkpoints expect ImageNet-normalised input; ResMem's input is [0, 1] RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESMEM_PART = "resmem"
SEGMENTATION_PART = "segmentation"
FUSION_PART = "fusion"


def resnet101(num_classes: int | None = 1000, dilated: bool = False) -> ResNet:
    """ResNet-101 (ResMem's :class:`~memexport.export.resmem.ResNet`); ``dilated=True`` gives output stride 8."""
    return ResNet((3, 4, 23, 3), num_classes, (False, dilated, dilated))


def conv_bn_relu(inplanes: int, planes: int, kernel: int, dilation: int = 1) -> list[nn.Module]:
    padding = 0 if kernel == 1 else dilation
    return [nn.Conv2d(inplanes, planes, kernel, padding=padding, dilation=dilation, bias=False), nn.BatchNorm2d(planes), nn.ReLU()]


class ASPPPooling(nn.Sequential):
    """Image-level ASPP branch: global pool, 1x1 conv, BN, ReLU, upsampled back (torchvision layout)."""

    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(inplanes, planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling, torchvision's ``classifier.0`` (``convs.0..4``, ``project``).

    Args:
        inplanes: Input channels (2048 for a ResNet backbone).
        rates: Dilation of the three 3x3 branches (default DeepLabV3's 12, 24, 36).
        planes: Channels of every branch and of the projection (default 256).
    """

    def __init__(self, inplanes: int, rates: tuple[int, int, int] = ASPP_RATES, planes: int = 256) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(*conv_bn_relu(inplanes, planes, 1))]
        branches += [nn.Sequential(*conv_bn_relu(inplanes, planes, 3, rate)) for rate in rates]
        branches.append(ASPPPooling(inplanes, planes))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*conv_bn_relu(len(branches) * planes, planes, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """torchvision's ``DeepLabHead``: ASPP, 3x3 conv + BN + ReLU, 1x1 conv to the classes."""

    def __init__(self, inplanes: int, num_classes: int) -> None:
        super().__init__(ASPP(inplanes), *conv_bn_relu(256, 256, 3), nn.Conv2d(256, num_classes, 1))


class SegmentationBranch(nn.Module):
    """DeepLabV3 on a dilated ResNet-101: image in [0, 1] -> class probabilities at input size.

    The state_dict keys are exactly torchvision's ``deeplabv3_resnet101`` without the auxiliary
    head, so ``segmentation.load_state_dict(torchvision_checkpoint)`` works.

    Args:
        num_classes: Segmentation classes (default 13).
    """

    def __init__(self, num_classes: int = SEGMENTATION_CLASSES) -> None:
        super().__init__()
        self.backbone = resnet101(num_classes=None, dilated=True)
        self.classifier = DeepLabHead(2048, num_classes)
        # Not persistent: constants of the reconstruction, never part of a checkpoint.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        logits = self.classifier(self.backbone((x - self.mean) / self.std))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return torch.softmax(logits, dim=1)


class M3M(nn.Module):
    """M3M: ``sigmoid(head(cat(alexnet(x), resnet152(x), segconv(segmentation(x)))))``.

    ResMem's parameter names are kept for the shared parts (``features.*``, ``conv1``..``conv5``,
    ``fc6``..``fc12``), so ResMem's published weights load into them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = resnet152()
        AlexBranch.add_to(self)
        self.segmentation = SegmentationBranch()
        self.segconv1 = nn.Conv2d(SEGMENTATION_CLASSES, SEGCONV_CHANNELS[0], 5, stride=2, padding=2)
        self.segconv2 = nn.Conv2d(SEGCONV_CHANNELS[0], SEGCONV_CHANNELS[1], 3, stride=2, padding=1)
        add_head(self, FC6_IN)
        self.random_init_parts: list[str] = []

    def segmentation_features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.segmentation(x)
        return torch.flatten(F.relu(self.segconv2(F.relu(self.segconv1(maps)))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (AlexBranch.features(self, x), self.features(x), self.segmentation_features(x))
        return head_forward(self, torch.cat(parts, 1))


# --- loading -------------------------------------------------------------------------------


def is_full_m3m_checkpoint(state: Mapping[str, Any]) -> bool:
    """A full M3M state_dict has the segmentation branch and the fusion convolutions in it."""
    return any(k.startswith(("segmentation.", "segconv")) for k in state)


def load_segmentation(branch: SegmentationBranch, path: Path) -> list[str]:
    """Load a torchvision-layout DeepLabV3-ResNet-101 checkpoint (13 classes) strictly.

    Accepts the bare ``backbone.*``/``classifier.*`` keys or the same keys under ``segmentation.``.
    ``aux_classifier.*`` keys (training-only) are dropped.

    Returns:
        The dropped keys.

    Raises:
        CheckpointError: Missing, unexpected or mis-shaped keys (e.g. 21 classes instead of 13).
    """
    from memexport.export.weights import check_keys, check_shapes, load_checkpoint

    state = load_checkpoint(path)
    if any(k.startswith("segmentation.") for k in state) and not any(k.startswith("backbone.") for k in state):
        state = {k[len("segmentation."):]: v for k, v in state.items() if k.startswith("segmentation.")}
    dropped = sorted(k for k in state if k.startswith(AUX_PREFIX))
    state = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}
    own = branch.state_dict()
    check_keys(set(own), state, path, "DeepLabV3-ResNet-101 segmentation (torchvision layout, --segmentation-weights)")
    check_shapes(own, state, path, f"DeepLabV3-ResNet-101 with {SEGMENTATION_CLASSES} classes")
    branch.load_state_dict(state, strict=True)
    return dropped


def load_resmem_parts(model: M3M, path: Path, state: Mapping[str, Any] | None = None) -> None:
    """Load ResMem's published state_dict into the parts M3M shares with it.

    ResMem's ``fc6`` reads 10,216 features; its columns land in the first 10,216 columns of
    M3M's wider ``fc6`` (the AlexNet and ResNet features come first in both). The columns for
    the segmentation features keep their seeded random initialisation.

    Args:
        model: The M3M module.
        path: ResMem's ``model.pt`` (named in errors).
        state: Its already loaded state_dict (default ``None``: load ``path``).

    Raises:
        CheckpointError: Missing, unexpected or mis-shaped keys.
    """
    from memexport.export.weights import check_keys, check_shapes, load_checkpoint

    state = load_checkpoint(path) if state is None else state
    own = model.state_dict()
    shared = {k for k in own if not k.startswith(("segmentation.", "segconv"))}
    check_keys(shared, state, path, "ResMem (the shared parts of M3M; or pass a full M3M state_dict)")
    fc6 = state["fc6.weight"]
    expected = (own["fc6.weight"].shape[0], ALEX_FEATURES + RESNET_FEATURES)
    if tuple(fc6.shape) != expected:
        raise CheckpointError(f"{path}: fc6.weight has shape {tuple(fc6.shape)}, expected ResMem's {expected}; pass ResMem's published model.pt")
    check_shapes({k: v for k, v in own.items() if k in shared and k != "fc6.weight"}, state, path, "ResMem")
    with torch.no_grad():
        own["fc6.weight"][:, : expected[1]].copy_(fc6)
        for key in shared - {"fc6.weight"}:
            own[key].copy_(state[key])


def m3m_from_weights(source: "WeightsSource") -> M3M:
    """Build M3M in eval mode from a full checkpoint, or from ResMem's weights plus a segmentation one.

    Every parameter is first initialised from ``source.seed`` (torch's default initialisers,
    in construction order), so the parts no checkpoint covers are the same on every rebuild;
    ``model.random_init_parts`` names them.

    Args:
        source: ``path`` is a full M3M state_dict, ResMem's ``model.pt`` (shared parts only) or
            ``None`` (everything random); ``parts["segmentation"]`` is an optional torchvision-layout
            DeepLabV3-ResNet-101 checkpoint with 13 classes.

    Raises:
        CheckpointError: Missing, unsafe or mismatched checkpoints.
        UsageError: A segmentation checkpoint given together with a full M3M checkpoint.
    """
    from memexport.export.weights import check_keys, check_shapes, load_checkpoint

    unknown = sorted(set(source.parts) - {SEGMENTATION_PART})
    if unknown:
        raise UsageError(f"m3m takes only a {SEGMENTATION_PART!r} part checkpoint, got {unknown}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        model = M3M()
    random_parts = []
    segmentation_path = source.parts.get(SEGMENTATION_PART)
    if source.path is None:
        random_parts += [RESMEM_PART]
    else:
        state = load_checkpoint(source.path)
        if is_full_m3m_checkpoint(state):
            if segmentation_path is not None:
                raise UsageError(
                    f"{source.path} is a full M3M checkpoint (it holds the segmentation branch); drop --segmentation-weights"
                )
            own = model.state_dict()
            check_keys(set(own), state, source.path, "full M3M")
            check_shapes(own, state, source.path, "M3M")
            model.load_state_dict(state, strict=True)
            model.random_init_parts = []
            return model.eval()
        load_resmem_parts(model, source.path, state)
        del state
    if segmentation_path is not None:
        load_segmentation(model.segmentation, Path(segmentation_path))
    else:
        random_parts.append(SEGMENTATION_PART)
    # Without a full M3M checkpoint, segconv1/2 and fc6's segmentation columns were never trained.
    random_parts.append(FUSION_PART)
    model.random_init_parts = random_parts
    return model.eval()


RANDOM_PART_MEANING = {
    RESMEM_PART: "ResNet-152, AlexNet branch and head (no --weights checkpoint)",
    SEGMENTATION_PART: "segmentation branch (no --segmentation-weights)",
    FUSION_PART: "segconv1/segconv2 and fc6's segmentation columns (only a full M3M checkpoint has them)",
}


def random_init_warning(parts: list[str], seed: int) -> str:
    """The loud one-paragraph warning printed when an export holds random weights."""
    listed = "; ".join(f"{p}: {RANDOM_PART_MEANING[p]}" for p in parts)
    return (
        f"WARNING: M3M HAS RANDOMLY INITIALISED PARTS (seed {seed}): {listed}. Its scores are NOT M3M's published "
        "predictions (no M3M weights are public). Pass a full M3M state_dict with --weights for real scores. "
        "The metadata records this under weights.random_init."
    )


# --- export past 2 GB -----------------------------------------------------------------------

# Tensors this small stay inside the .onnx: shape inference and graph tools read constants
# without opening the data file.
INLINE_TENSOR_BYTES = 1024
# Offsets aligned to 4 KiB let runtimes memory-map the tensors page by page.
DATA_ALIGNMENT = 4096


def data_file_name(output: Path) -> str:
    """External-data location for ``output``: ``<name>.onnx.data`` in the same folder."""
    return output.name + ".data"


def attach_initializers(proto: Any, tensors: Mapping[str, torch.Tensor], sink: Any, data_name: str) -> int:
    """Turn the graph inputs named in ``tensors`` into initializers stored in ``sink``.

    Each tensor is written straight from torch's memory (no copy of the whole model) at a
    4 KiB aligned offset; tensors under 1 KiB stay inline.

    Args:
        proto: An ``onnx.ModelProto`` exported with ``export_params=False``.
        tensors: Parameters and buffers by state_dict name.
        sink: Binary file open for writing, placed beside the model as ``data_name``.
        data_name: The relative ``location`` recorded for every external tensor.

    Returns:
        Number of parameter elements attached.

    """
    import onnx
    from onnx import helper

    graph = proto.graph
    keep, elements = [], 0
    for value in graph.input:
        tensor = tensors.get(value.name)
        if tensor is None:
            keep.append(value)
            continue
        array = tensor.detach().contiguous().numpy()
        initializer = onnx.TensorProto(name=value.name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        if array.nbytes < INLINE_TENSOR_BYTES:
            initializer.raw_data = array.tobytes()
        else:
            offset = -(-sink.tell() // DATA_ALIGNMENT) * DATA_ALIGNMENT
            sink.seek(offset)
            sink.write(memoryview(array.reshape(-1)).cast("B"))
            initializer.data_location = onnx.TensorProto.EXTERNAL
            for key, text in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = initializer.external_data.add()
                entry.key, entry.value = key, text
        graph.initializer.append(initializer)
        elements += array.size
    del graph.input[:]
    graph.input.extend(keep)
    return elements


def declare_io(proto: Any, spec: "ModelSpec", output: Path) -> None:
    """Check that only the image is left as a graph input, and state the declared output shape.

    With the weights as graph inputs, the tracer could not tell that fc12 has one output
    column; the declared per-image shape is written as the inline export has it.

    Raises:
        ArtifactError: A graph input that matched no parameter (the exporter renamed it).
    """
    stray = [i.name for i in proto.graph.input if i.name != spec.input_name]
    if stray:
        raise ArtifactError(f"{output}: graph inputs {stray[:4]} match no parameter of {spec.name}; the exporter renamed them")
    for output_value in proto.graph.output:
        if output_value.name == spec.output_name:
            dims = output_value.type.tensor_type.shape.dim
            for dim, size in zip(dims[1:], spec.output_shape):
                dim.Clear()
                dim.dim_value = size


@dataclass(frozen=True)
class ExternalExport:
    """What :func:`onnx_with_external_data_from_torch` wrote.

    Attributes:
        metadata: The metadata embedded in the model.
        model: The ``.onnx`` path.
        data: Its single external-data file.
        seconds: Wall time of the export.
    """

    metadata: "ArtifactMetadata"
    model: Path
    data: Path
    seconds: float


def onnx_with_external_data_from_torch(
    spec: "ModelSpec",
    weights: "WeightsSource",
    output: Path | str,
    options: "ExportOptions",
    warn: Callable[[str], None] = print,
) -> ExternalExport:
    """Export a model of about 2 GB or more to ``output`` plus ONE data file ``<name>.onnx.data`` beside it.

    Layout: the graph is traced by the TorchScript exporter (``dynamo=False``: opset 17 for
    TensorRT 8.6) with ``export_params=False``, so the exporter never serialises the weights in
    memory (inline, that costs three extra copies of 2 GB; and it writes one file per tensor
    only above 2 GiB, which M3M is not). Every parameter and buffer is then written from torch's
    own memory into ``<name>.onnx.data`` at 4 KiB aligned offsets, with the relative
    ``location`` ``<name>.onnx.data``; tensors under 1 KiB stay inside the ``.onnx``. Constant
    folding is off (it would rename and copy the weights): BatchNorm stays a node, which ONNX
    Runtime and TensorRT fuse when they load the model.

    Crash safety: both files are written and fsynced in a temporary folder beside ``output``;
    then an old ``output`` is removed, the data file is renamed into place, and the model last.
    An interrupted export never leaves a model under the final name that points at missing or
    foreign data.

    Args:
        spec: The model (``spec.external_data`` true).
        weights: Its checkpoints.
        output: Destination ``.onnx``.
        options: Opset, trace batch and checker switch (``options.check`` runs ``onnx.checker``
            on the path, full check).
        warn: Receives the random-initialisation warning (default ``print``).

    Raises:
        CheckpointError: Bad weights or a parameter count out of step with the spec.
        ArtifactError: The result fails ``onnx.checker``.
        MemexportError: The disk fills or the folder is not writable.
    """
    import onnx

    from memexport.core.atomic import fsync_dir, fsync_file
    from memexport.core.errors import MemexportError
    from memexport.export.onnx_export import checked_torch_model, export_metadata, require_valid_onnx, stamp, trace_to_onnx
    from memexport.runtime.integrity import seal_onnx

    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise UsageError(f"{output}: the output must end in .onnx (its data file becomes {output.name}.data)")
    started = time.perf_counter()
    model = checked_torch_model(spec, weights, options)
    random_parts = list(getattr(model, "random_init_parts", []))
    if random_parts:
        warn(random_init_warning(random_parts, weights.seed))
    metadata = export_metadata(spec, weights, options.opset, model)
    output.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    data_name = data_file_name(output)
    data_final = output.with_name(data_name)
    try:
        staged = workdir / output.name
        trace_to_onnx(model, spec, staged, options, export_params=False, do_constant_folding=False)
        proto = onnx.load(str(staged))
        tensors = dict(model.state_dict(keep_vars=False))
        with open(workdir / data_name, "wb") as sink:
            attach_initializers(proto, tensors, sink, data_name)
            sink.flush()
            os.fsync(sink.fileno())
        del tensors, model
        declare_io(proto, spec, output)
        stamp(proto, spec, metadata)
        onnx.save(proto, str(staged))
        fsync_file(staged)
        if options.check:
            require_valid_onnx(staged, output)
        # Last step before the renames: sha256 of the model and of its data file, so every
        # runner detects later tampering or a data file swapped from another export.
        metadata = metadata.with_extra(integrity=seal_onnx(staged, [data_name]))
        output.unlink(missing_ok=True)
        os.replace(workdir / data_name, data_final)
        os.replace(staged, output)
        fsync_dir(output.parent)
    except OSError as exc:
        raise MemexportError(
            f"{output}: could not write ({exc.strerror or exc}); free disk space (about 2.1 GB) or choose another folder"
        ) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return ExternalExport(metadata, output, data_final, time.perf_counter() - started)
