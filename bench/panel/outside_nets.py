"""Small plain CNNs defined outside the product's ``models/`` (as a user's own code would be), for the
detection panel: ``bna train --arch outside_nets:plain_cnn5`` with ``bench/panel`` on PYTHONPATH.

Their BatchNorm layers have their own names and sit in their own structure, so detection and BNA meet
them exactly as they would meet a model nobody in this repository made.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class PlainCNN5(nn.Module):
    """Five conv-BN-ReLU blocks (two of them strided), global average pooling, one linear layer."""

    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        w = width
        self.trunk = nn.Sequential(ConvNormAct(in_channels, w), ConvNormAct(w, w), ConvNormAct(w, 2 * w, 2),
                                   ConvNormAct(2 * w, 2 * w), ConvNormAct(2 * w, 4 * w, 2))
        self.classify = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.trunk(x).mean(dim=(2, 3)))


class LeNetBN(nn.Module):
    """LeNet-like: two conv-BN-ReLU-pool stages and a fully connected head with BatchNorm1d."""

    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.features = nn.ModuleDict({
            "c1": nn.Conv2d(in_channels, width, 5, padding=2), "b1": nn.BatchNorm2d(width),
            "c2": nn.Conv2d(width, 2 * width, 5, padding=2), "b2": nn.BatchNorm2d(2 * width),
        })
        self.fc = nn.Linear(2 * width * 7 * 7, 64)
        self.fc_norm = nn.BatchNorm1d(64)
        self.out = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features
        x = nn.functional.max_pool2d(torch.relu(f["b1"](f["c1"](x))), 2)
        x = nn.functional.adaptive_avg_pool2d(torch.relu(f["b2"](f["c2"](x))), 7)
        return self.out(torch.relu(self.fc_norm(self.fc(x.flatten(1)))))


def plain_cnn5(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    return PlainCNN5(num_classes, in_channels, width)


def lenet_bn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    return LeNetBN(num_classes, in_channels, width)
