"""torchvision's weight initialisation of the ImageNet and CIFAR architectures."""

from __future__ import annotations

from torch import nn

__all__ = ["torchvision_init"]


def torchvision_init(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """Initialise ``model`` in place as torchvision initialises its classifiers.

    Convolutions get Kaiming-normal weights (fan out, ReLU gain) and zero biases, batch
    norms unit scales and zero shifts, and linear layers ``N(0, linear_std)`` weights and
    zero biases. Modules are visited in ``modules()`` order, so a seeded generator gives
    the same weights every time.

    Parameters
    ----------
    model
        The freshly built model.
    linear_std
        Standard deviation of linear weights; ``None`` keeps PyTorch's default
        initialisation of linear layers (as torchvision's ResNets do).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
