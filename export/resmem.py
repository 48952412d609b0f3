"""ResMem in plain torch, without torchvision, with the published parameter names.

The layer layout reproduces ``resmem`` 1.1.6 exactly so that its ``model.pt`` loads
with ``strict=True``: a torchvision-layout ResNet-152 under ``features`` (with its
1000-logit ``fc``), an AlexNet-style branch (``conv1``..``conv5``) and the fully
connected head ``fc6``..``fc12``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:  # pragma: no cover
    from memexport.export.weights import WeightsSource


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (expansion 4), stride on the 3x3 conv (v1.5).

    Args:
        inplanes: Input channels.
        planes: Bottleneck width; the block outputs ``planes * 4`` channels.
        stride: Stride of the 3x3 convolution (default 1).
        downsample: Projection for the identity path (default ``None``).
        dilation: Dilation of the 3x3 convolution (default 1); DeepLab backbones dilate.
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout bottleneck ResNet.

    Args:
        layers: Blocks per stage, e.g. ``(3, 8, 36, 3)`` for ResNet-152.
        num_classes: Width of ``fc``; ``None`` drops the pooling and ``fc`` so the network
            returns its stage-4 feature map (as DeepLab backbones do). Default 1000.
        replace_stride_with_dilation: Per stage 2..4, trade stride for dilation (default none).
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        num_classes: int | None = 1000,
        replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(512, layers[3], 2, replace_stride_with_dilation[2])
        self.num_classes = num_classes
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * 4, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        modules = [Bottleneck(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * 4
        modules += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.num_classes is None:
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet152(num_classes: int | None = 1000, dilated: bool = False) -> ResNet:
    """ResNet-152; ``dilated=True`` gives DeepLab's output-stride-8 variant."""
    return ResNet((3, 8, 36, 3), num_classes, (False, dilated, dilated))


class AlexBranch(nn.Module):
    """The AlexNet-style branch as ResMem lays it out (flat attribute names, no container).

    It is not used as a submodule of :class:`ResMem` (whose state_dict keys are flat);
    :meth:`features` applies the same layers given any module that owns them.
    """

    @staticmethod
    def add_to(module: nn.Module) -> None:
        module.conv1 = nn.Conv2d(3, 48, kernel_size=11, stride=4)
        module.pool1 = nn.MaxPool2d(3, 2)
        module.lrn1 = nn.LocalResponseNorm(5)
        module.conv2 = nn.Conv2d(48, 256, kernel_size=5, padding=2, groups=2)
        module.pool2 = nn.MaxPool2d(3, 2)
        module.lrn2 = nn.LocalResponseNorm(5)
        module.conv3 = nn.Conv2d(256, 384, kernel_size=3, padding=1, groups=2)
        module.conv4 = nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2)
        module.conv5 = nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2)
        module.pool5 = nn.MaxPool2d(3, 2)

    @staticmethod
    def features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = m.lrn1(m.pool1(F.relu(m.conv1(x))))
        x = m.lrn2(m.pool2(F.relu(m.conv2(x))))
        x = F.relu(m.conv5(F.relu(m.conv4(F.relu(m.conv3(x))))))
        return torch.flatten(m.pool5(x), 1)  # 256 x 6 x 6 = 9216 for a 227 input


HEAD_WIDTHS = (4096, 4096, 2048, 1024, 512, 256, 1)


def add_head(module: nn.Module, in_features: int) -> None:
    """Add ``fc6``..``fc12`` to ``module`` with ResMem's widths."""
    width = in_features
    for index, out in enumerate(HEAD_WIDTHS, start=6):
        setattr(module, f"fc{index}", nn.Linear(width, out))
        width = out


def head_forward(module: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """ReLU between the head layers, sigmoid at the end (dropout is a no-op at inference)."""
    x = features
    for index in range(6, 12):
        x = F.relu(getattr(module, f"fc{index}")(x))
    return torch.sigmoid(module.fc12(x))


class ResMem(nn.Module):
    """ResMem: ``sigmoid(head(cat(alexnet_features(x), resnet152_logits(x))))``.

    The AlexNet features come first in the concatenation (9216 + 1000 = 10216), as in the
    published code.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = resnet152()
        AlexBranch.add_to(self)
        add_head(self, 9216 + 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_forward(self, torch.cat((AlexBranch.features(self, x), self.features(x)), 1))


def resmem_from_weights(source: "WeightsSource") -> ResMem:
    """Build ResMem in eval mode and load its weights strictly.

    Args:
        source: Where the checkpoint comes from (see :func:`memexport.export.weights.resolve`).

    Raises:
        CheckpointError: Missing, unsafe or mismatched checkpoint.
    """
    from memexport.export.weights import loaded

    return loaded(ResMem(), source)
