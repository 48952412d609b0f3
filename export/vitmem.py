"""ViTMem in plain torch, without timm, with timm's parameter names.

ViTMem (Hagen & Espeseth, 2023; ``vitmem`` 1.0.1, MIT) is timm's ``vit_base_patch16_224_miil``
with ``num_classes=1``, followed by a sigmoid. Its published checkpoint
(``vitmem_base_patch16_224_miil_v1-f580d24a.pth``) is the state_dict of ``ViTMem_model``, whose
ViT sits under ``vit``: :class:`ViTMem` keeps that attribute, so the file loads strictly as it is.

What the MIIL variant is, as timm 1.0.31 builds it: ViT-B/16 (patch 16, width 768, 12 blocks of
12 heads, MLP ratio 4), **no bias on qkv** (the projection ``proj`` has one), LayerNorm with
eps 1e-6, exact (erf) GELU, a class token, a learned position embedding of 197 tokens that covers
the class token (added after the concatenation), no distillation token, no pre-norm, no layer
scale, the final norm before pooling and the class token's output as the pooled feature. Its
ImageNet mean/std are 0 and 1, so normalisation is nothing here and preprocessing stays outside.

Attention is written out (MatMul, Softmax, MatMul) rather than through
``scaled_dot_product_attention``, and every reshape takes the token count and widths as
constants, so the traced opset-17 graph holds only operators that ONNX Runtime, OpenVINO and
TensorRT 8.6's parser read, and no shape arithmetic except the class token's batch expansion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from memexport.export.weights import WeightsSource

IMAGE_SIZE = 224
PATCH = 16
WIDTH = 768
DEPTH = 12
HEADS = 12
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6
TOKENS = (IMAGE_SIZE // PATCH) ** 2 + 1  # 196 patches and the class token


class Attention(nn.Module):
    """Multi-head self-attention, timm's unfused path: ``softmax(q * scale @ k^T) @ v``.

    Args:
        width: Token width.
        heads: Number of heads; each is ``width // heads`` wide.
    """

    def __init__(self, width: int = WIDTH, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.width = width
        self.head_width = width // heads
        self.scale = self.head_width ** -0.5
        self.qkv = nn.Linear(width, width * 3, bias=False)  # the MIIL variant: qkv_bias=False
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Constant token count and widths (batch as -1): the traced graph needs no Shape arithmetic.
        qkv = self.qkv(x).reshape(-1, TOKENS, 3, self.heads, self.head_width).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(-1, TOKENS, self.width))


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` with the exact (erf) GELU, as timm's default ``nn.GELU``."""

    def __init__(self, width: int = WIDTH, hidden: int = WIDTH * MLP_RATIO) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """16x16 patches to tokens: a stride-16 convolution, reshaped to ``(N, 196, 768)``."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).reshape(-1, self.proj.out_channels, TOKENS - 1).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` as ``vit_base_patch16_224_miil(num_classes=1)`` configures it.

    Attribute names are timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``), so its
    state_dict loads unchanged. Returns the logit, ``(N, 1)``.
    """

    def __init__(self, num_classes: int = 1) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, TOKENS, WIDTH))
        self.blocks = nn.Sequential(*[Block() for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(WIDTH, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(WIDTH, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        # The position embedding covers the class token: concatenate first, then add (timm's
        # no_embed_class=False, the original ViT's order).
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # global_pool="token": the class token's output


class ViTMem(nn.Module):
    """ViTMem: ``sigmoid(vit(x))``, the ViT under ``vit`` as in the published ``ViTMem_model``."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = VisionTransformer(num_classes=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.vit(x))


def vitmem_from_weights(source: "WeightsSource") -> ViTMem:
    """Build ViTMem in eval mode and load its weights strictly (keys ``vit.*``, as published).

    Args:
        source: Where the checkpoint comes from (see :func:`memexport.export.weights.resolve`);
            ViTMem has no installed weights, so ``source.path`` must name the user's file.

    Raises:
        CheckpointError: No checkpoint given, or a missing, unsafe or mismatched one.
    """
    from memexport.core.errors import CheckpointError
    from memexport.core.spec import get_spec
    from memexport.export.weights import loaded

    if source.path is None:
        raise CheckpointError(f"vitmem has no installed weights; {get_spec('vitmem').weights.install}")
    return loaded(ViTMem(), source)
