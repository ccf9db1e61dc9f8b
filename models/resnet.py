"""ResNet-20 (He et al. 2016, the CIFAR variant) adapted to 28x28 grayscale input.

Three stages of 3 basic blocks with 16, 32, 64 channels; the first block of stages 2 and 3
downsamples by 2 with a 1x1 convolution + BatchNorm shortcut (option B). A 28x28 input gives 7x7
feature maps before global average pooling.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, three stages of ``BasicBlock``, global pooling, a linear head."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, int, int] = (3, 3, 3),
        widths: tuple[int, int, int] = (16, 32, 64),
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, in_planes = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, stride if j == 0 else 1))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(
    in_channels: int = 1, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)
) -> ResNet:
    """ResNet-20: 3 stages x 3 basic blocks, 16/32/64 channels, about 0.27 M parameters.

    >>> import torch
    >>> from bayesprune.models import resnet20
    >>> resnet20()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    return ResNet((3, 3, 3), widths, in_channels, num_classes)
