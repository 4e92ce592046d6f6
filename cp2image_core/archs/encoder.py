"""A feature encoder used in training only: image -> standardized CellProfiler features.

Pre-trained on real crops, then frozen; the generator is penalized when the encoder reads different
features from its image than from the real cell's image (a perceptual loss in CellProfiler's terms).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class FeatureEncoder(nn.Module):
    def __init__(self, n_channels: int, n_features: int, width: int = 32) -> None:
        super().__init__()
        layers, cin = [], n_channels
        for cout in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
            cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, n_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
