"""Tiny user models for the CLI tests, reached as ``--model tests.cli_models:tiny_cnn``."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv, batch norm, ReLU, average pooling, a depthwise conv and a 5-class classifier."""

    class_names = ("red thing", "green thing", "blue thing", "bright thing", "dark thing")

    def __init__(self, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
            nn.Conv2d(width, width, 3, padding=1, groups=width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(width, len(self.class_names))

    def forward(self, x):
        return self.classifier(self.features(x))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial running statistics
        model.features[1].running_mean.uniform_(-0.2, 0.2)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def wider_cnn() -> nn.Module:
    torch.manual_seed(1)
    return TinyCNN(width=16).eval()


def not_a_model():
    return "not a module"
