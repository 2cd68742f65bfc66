"""The networks of the study: SimpleCNN (the small baseline and distillation student) and
ResNet18Cifar (the CIFAR-style ResNet-18 teacher), both for 32x32 RGB inputs.

Imports only ``config``; a model knows nothing of data.
"""

from __future__ import annotations

import torch
from torch import nn

import config

# Alternative spellings accepted by build_model (lower case) -> canonical name in config.MODELS.
MODEL_ALIASES = {"resnet18cifar": "resnet18"}


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # Plain nn.Conv2d with its default bias, as in the original study (its 0.141 M count includes them).
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SimpleCNN(nn.Module):
    """Five 3x3 conv-BN-ReLU layers in three pooled blocks (32, 64, 128 channels), global average
    pooling, dropout 0.25 and a linear classifier: 141,354 parameters for 10 classes."""

    def __init__(self, num_classes: int = config.NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 32),
            *_conv_bn_relu(32, 32),
            nn.MaxPool2d(2),  # (B, 32, 16, 16)
            *_conv_bn_relu(32, 64),
            *_conv_bn_relu(64, 64),
            nn.MaxPool2d(2),  # (B, 64, 8, 8)
            *_conv_bn_relu(64, 128),
            nn.MaxPool2d(2),  # (B, 128, 4, 4)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.25)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, 128)
        return self.classifier(self.dropout(x))  # (B, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, or a 1x1 conv-BN projection when the
    stride or the width changes. Convolutions before BN carry no bias (BN's shift replaces it)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem with 64 channels and no max-pool, four stages
    of two BasicBlocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2), global average pooling and
    a linear classifier: 11,173,962 parameters for 10 classes."""

    def __init__(self, num_classes: int = config.NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        stages, in_channels = [], 64
        for width, stride in zip(widths, strides, strict=True):
            stages.append(nn.Sequential(BasicBlock(in_channels, width, stride), BasicBlock(width, width, 1)))
            in_channels = width
        # Spatial size 32 -> 32 -> 16 -> 8 -> 4 through the four stages.
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, 64, 32, 32)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 4, 4)
        return self.fc(self.pool(x).flatten(1))  # (B, num_classes)


_BUILDERS = {"simplecnn": SimpleCNN, "resnet18": ResNet18Cifar}


def build_model(name: str, num_classes: int = config.NUM_CLASSES) -> nn.Module:
    """A freshly initialised network by name (one of config.MODELS; "resnet18cifar" also works).

    Initialisation draws from torch's global RNG: seed it first for a reproducible model.
    """
    key = name.lower()
    key = MODEL_ALIASES.get(key, key)
    if key not in config.MODELS:
        raise config.ConfigError(f"unknown model {name!r}; choose one of {config.MODELS}")
    return _BUILDERS[key](num_classes=num_classes)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
