"""VGG-16 with torchvision's module names."""

from __future__ import annotations

import torch
from torch import nn

from tvm_cim.learn.zoo.initialization import torchvision_init

__all__ = ["VGG16"]

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M")
_VGG16_CFG = _VGG16_CFG + (512, 512, 512, "M")


class VGG16(nn.Module):
    """ImageNet VGG-16 (configuration D) with torchvision's layout and module names.

    ``features`` holds 13 3x3 convolutions (``features.0``, ``features.2``, ...,
    ``features.28`` without batch norm) with ReLU and five max pools; ``avgpool`` pools to
    7x7; ``classifier.0``, ``classifier.3`` and ``classifier.6`` are the three linear layers.

    Parameters
    ----------
    num_classes
        Number of outputs.
    batch_norm
        Insert batch norm after each convolution (torchvision's ``vgg16_bn`` layout).
    hidden
        Width of the two hidden linear layers (4096 in the original).
    dropout
        Dropout probability in the classifier.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        batch_norm: bool = False,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
                continue
            layers.append(nn.Conv2d(cin, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
