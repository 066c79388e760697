"""Networks of the reference examples: an MLP, a small CNN and CIFAR-style ResNets with or without skips.

The CIFAR ResNets follow He et al. (2016), section 4.2: a 3x3 stem with 16 channels, three stages of
``n`` basic blocks with 16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), global
average pooling and a linear classifier; depth ``6n + 2`` (ResNet-20: n=3, ResNet-56: n=9). Shortcuts
are parameter-free ("option A": subsample and zero-pad channels). ``skip_connections=False`` removes
the shortcuts and leaves everything else identical, the comparison of Li et al. (2018), "Visualizing
the Loss Landscape of Neural Nets", figure 5.

Example::

    >>> import torch
    >>> net = cifar_resnet(depth=20, skip_connections=False)
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in cifar_resnet(depth=20).parameters())  # 0.27M, as in He et al. (2016)
    269722
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def _activation(name: str) -> type[nn.Module]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {name!r}.")
    return _ACTIVATIONS[name]


class MLP(nn.Sequential):
    """Fully connected network ``in -> hidden[0] -> ... -> out`` (inputs are flattened).

    Args:
        in_features: input dimension (e.g. 2 for the Gaussian mixtures, 784 for MNIST).
        out_features: output dimension (classes, or 1 for regression).
        hidden: widths of the hidden layers.
        activation: ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"silu"``.
        batch_norm: a BatchNorm1d after each hidden linear layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        batch_norm: bool = False,
    ) -> None:
        act = _activation(activation)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(act())
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class SmallCNN(nn.Sequential):
    """Two conv blocks (conv-[BN]-ReLU-maxpool) and a linear classifier; for 28x28 (MNIST) or 32x32 inputs."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (16, 32), batch_norm: bool = True
    ) -> None:
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(c)] if batch_norm else []
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, skip: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = skip
        self.stride = stride
        self.pad = c_out - c_in

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.skip:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016) with depth ``6n + 2``; see the module docstring."""

    def __init__(self, depth: int = 20, num_classes: int = 10, skip_connections: bool = True, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"`depth` must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}.")
        n = (depth - 2) // 6
        self.depth, self.skip_connections = depth, skip_connections
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(_BasicBlock(c_in, c, 2 if stage > 0 and i == 0 else 1, skip_connections))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(depth: int = 20, skip_connections: bool = True, num_classes: int = 10) -> CifarResNet:
    """ResNet-``depth`` for 32x32 images; ``skip_connections=False`` gives Li et al.'s "noshort" variant."""
    return CifarResNet(depth=depth, num_classes=num_classes, skip_connections=skip_connections)
