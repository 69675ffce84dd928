"""CIFAR ResNet-20/32/44/56 of He et al. (2016, Sec. 4.2) with the parameter-free "option A" shortcut.

Weights: the standard-training checkpoints of akamaster/pytorch_resnet_cifar10 (BSD-2-Clause), found at
``$BENCH_WEIGHTS_DIR/akamaster_resnet_cifar10/resnet{depth}-{hash}.th``. They expect ImageNet
normalization statistics (the upstream trainer used them for CIFAR-10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.classifiers.base import (
    ARCHITECTURES,
    Architecture,
    CLASSIFIERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    ClassifierInfo,
    build_strict,
    load_state_dict,
)
from bench.core.paths import WEIGHTS_ENV, require_file, weights_dir

_FILES = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th", 56: "resnet56-4bfd9763.th"}


class _ShortcutA(nn.Module):
    """Subsample by 2 and zero-pad channels on both sides (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        changed = stride != 1 or c_in != c_out
        self.shortcut: nn.Module = _ShortcutA((c_out - c_in) // 2) if changed else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem 3x3/16, three stages of ``n`` blocks (16, 32, 64 channels), global pool, linear head."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(c_in: int, c_out: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(c_in, c_out, stride)] + [BasicBlock(c_out, c_out, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _pretrained(depth: int) -> Classifier:
    path = require_file(weights_dir() / "akamaster_resnet_cifar10" / _FILES[depth], f"ResNet-{depth} weights", WEIGHTS_ENV)
    net = build_strict(CifarResNet((depth - 2) // 6), load_state_dict(path, key="state_dict"), path)
    info = ClassifierInfo(
        name=f"resnet{depth}", architecture=f"resnet{depth}", dataset="cifar10", num_classes=10,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, training="standard", train_eps=None,
        weights=f"akamaster_resnet_cifar10/{_FILES[depth]}", source="akamaster/pytorch_resnet_cifar10 (BSD-2-Clause)",
    )
    return Classifier(net, info)


for _depth in _FILES:
    ARCHITECTURES.add(f"resnet{_depth}", Architecture(lambda n=(_depth - 2) // 6: CifarResNet(n), IMAGENET_MEAN, IMAGENET_STD))
    CLASSIFIERS.add(f"resnet{_depth}", lambda d=_depth: _pretrained(d))
