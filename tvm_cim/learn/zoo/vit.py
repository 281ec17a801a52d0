"""Vision transformers with torchvision's module names: ViT-B/32, ViT-B/16 and a small ViT
for scikit-learn's digits.

The layout is torchvision's ``VisionTransformer``: ``conv_proj`` cuts the image into
patches, ``class_token`` is prepended, ``encoder`` adds ``pos_embedding`` and runs the
pre-norm blocks ``encoder.layers.encoder_layer_{i}`` (``ln_1``, ``self_attention``,
``dropout``, ``ln_2``, ``mlp``) and ``encoder.ln``; ``heads.head`` classifies the class
token. Only the attention differs: it is ``tvm_cim.learn.zoo.attention.SelfAttention``, whose
matmuls are modules, so each block's crossbar operators in ``named_modules()`` order are
``self_attention.in_proj``, ``self_attention.qk``, ``self_attention.av``,
``self_attention.out_proj``, ``mlp.0`` and ``mlp.3``. torchvision state dicts load as they
are.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from tvm_cim.core.errors import CimError
from tvm_cim.learn.zoo.attention import SelfAttention

__all__ = [
    "MLPBlock",
    "EncoderBlock",
    "Encoder",
    "VisionTransformer",
    "ViTB32",
    "ViTB16",
    "DigitsViT",
]

#: torchvision's LayerNorm epsilon for vision transformers.
LAYER_NORM_EPS = 1e-6


class MLPBlock(nn.Sequential):
    """torchvision's transformer MLP: ``0`` Linear, ``1`` GELU, ``2`` Dropout, ``3`` Linear,
    ``4`` Dropout.

    Parameters
    ----------
    hidden_dim, mlp_dim
        Token width and the width of the hidden layer.
    dropout
        Dropout probability.
    """

    def __init__(self, hidden_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(hidden_dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, hidden_dim),
            nn.Dropout(dropout),
        )
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + dropout(attention(ln_1(x)))``, then
    ``x + mlp(ln_2(x))``.

    Parameters
    ----------
    num_heads, hidden_dim, mlp_dim
        Attention heads, token width, MLP width.
    dropout
        Dropout probability after the attention and in the MLP.
    """

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.self_attention = SelfAttention(hidden_dim, num_heads)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Positional embedding, dropout, ``layers.encoder_layer_{i}`` and the final ``ln``.

    Parameters
    ----------
    seq_length
        Tokens, the class token included.
    num_layers, num_heads, hidden_dim, mlp_dim, dropout
        As for ``EncoderBlock``.
    """

    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            OrderedDict(
                (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout))
                for i in range(num_layers)
            )
        )
        self.ln = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """torchvision's ``VisionTransformer`` (no representation layer, no convolutional stem).

    Parameters
    ----------
    image_size
        Height and width of the (square) input.
    patch_size
        Side of a patch; ``image_size`` must be a multiple of it.
    num_layers, num_heads, hidden_dim, mlp_dim
        Encoder blocks, attention heads, token width, MLP width.
    num_classes
        Number of outputs.
    in_channels
        Input channels.
    dropout
        Dropout probability (0 in torchvision's ViT-B models).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise CimError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(self.seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        # torchvision's initialisation of the patch projection and the head.
        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=(1 / fan_in) ** 0.5)
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [N, patches, hidden]
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


class ViTB32(VisionTransformer):
    """torchvision's ``vit_b_32``: 224x224 inputs, 32x32 patches, 12 blocks of width 768
    with 12 heads and MLPs of width 3072 (74 crossbar operators).

    Parameters
    ----------
    num_classes
        Number of outputs.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(224, 32, 12, 12, 768, 3072, num_classes=num_classes)


class ViTB16(VisionTransformer):
    """torchvision's ``vit_b_16``: as ``ViTB32`` with 16x16 patches (197 tokens).

    Parameters
    ----------
    num_classes
        Number of outputs.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(224, 16, 12, 12, 768, 3072, num_classes=num_classes)


class DigitsViT(VisionTransformer):
    """A small ViT for 8x8 digit images: 4x4 patches (4 tokens and the class token), 2
    blocks of width 64 with 4 heads and MLPs of width 128 (14 crossbar operators).

    4x4 patches generalise better than 2x2 ones (17 tokens) on the 1,257 training images:
    about 97 % test accuracy against about 90 % at the same widths after 20 epochs of
    ``tvm_cim.learn.train.fit`` with its default settings.

    Parameters
    ----------
    num_classes
        Number of outputs.
    hidden_dim, num_layers, num_heads, mlp_dim
        Token width, encoder blocks, attention heads and MLP width.
    dropout
        Dropout probability.
    patch_size
        Side of a patch, a divisor of 8.
    """

    def __init__(
        self,
        num_classes: int = 10,
        hidden_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_dim: int = 128,
        dropout: float = 0.0,
        patch_size: int = 4,
    ) -> None:
        super().__init__(
            8,
            patch_size,
            num_layers,
            num_heads,
            hidden_dim,
            mlp_dim,
            num_classes=num_classes,
            in_channels=1,
            dropout=dropout,
        )
