"""Small trainable models for the offline datasets: digits (8x8 images) and MNIST-1D."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsMLP", "DigitsCNN", "Mnist1dCNN"]


class DigitsMLP(nn.Module):
    """Multi-layer perceptron 64-128-64-10 for 8x8 digit images.

    Parameters
    ----------
    num_classes
        Number of outputs.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 128)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(128, 64)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digit images.

    ``conv1`` (1->16, 3x3, padding 1), ``conv2`` (16->32, 3x3, padding 1), 2x2 max pooling,
    ``dropout``, ``fc1`` (512->64) and ``fc2`` (64->classes), with ReLU after every layer
    but the last. Dropout only acts in training mode; exported graphs do not contain it.

    Parameters
    ----------
    num_classes
        Number of outputs.
    channels
        Output channels of ``conv1`` and ``conv2``.
    hidden
        Width of ``fc1``.
    dropout
        Dropout probability before ``fc1``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.pool(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.dropout(self.flatten(x))))
        return self.fc2(x)


class Mnist1dCNN(nn.Module):
    """CNN for MNIST-1D signals laid out as ``(N, 1, 1, 40)`` images of height 1.

    ``conv1`` (1->32, kernel (1, 5)), ``conv2`` and ``conv3`` (32->32, kernel (1, 3),
    stride (1, 2)), each followed by batch norm (``bn1``..``bn3``) and ReLU, then ``fc``
    (32 * 10 -> classes). The convolutions are ``nn.Conv2d`` with kernels of height 1, so
    the exported graph holds 2-D convolutions.

    Parameters
    ----------
    num_classes
        Number of outputs.
    length
        Signal length (the input's width).
    channels
        Channels of the three convolutions.
    """

    def __init__(self, num_classes: int = 10, length: int = 40, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(1, c, (1, 5), padding=(0, 2), bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, (1, 3), stride=(1, 2), padding=(0, 1), bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(c, c, (1, 3), stride=(1, 2), padding=(0, 1), bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        width = ((length + 1) // 2 + 1) // 2
        self.fc = nn.Linear(c * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.flatten(x))
