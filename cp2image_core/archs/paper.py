"""cp2image-paper: the CP2Image generator and discriminator (Ji et al., MIDL 2024), in PyTorch.

Four 5x5 convolutions of 32 channels on zero padding 4, nearest up-sampling after the first three,
batch norm + leaky ReLU(0.01), then a 1x1 "reconstructor" with batch norm + ReLU. At 68x68 the
up-sampled sizes are 10, 28, 64 as in the reference; other crop sizes follow the same arithmetic.
Inference uses eval mode (running statistics), so a cell's image does not depend on its batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import register


def paper_sizes(crop_size: int) -> list[int]:
    """Nearest up-sampling targets so that three padded valid 5x5 convs end at ``crop_size``."""
    up3 = crop_size - 4
    up2 = round(up3 / 2) - 4
    up1 = round(up2 / 2) - 4
    if up1 < 5:
        raise ValueError(f"crop_size {crop_size} is too small for cp2image-paper (needs >= 44)")
    return [up1, up2, up3]


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ZeroPad2d(4), nn.Conv2d(cin, cout, 5), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01)]


@register("cp2image-paper")
class PaperGenerator(nn.Module):
    def __init__(self, n_features: int, n_channels: int, crop_size: int, width: int = 32) -> None:
        super().__init__()
        s1, s2, s3 = paper_sizes(crop_size)
        self.net = nn.Sequential(
            *_conv_bn(n_features, width), nn.Upsample(size=(s1, s1), mode="nearest"),
            *_conv_bn(width, width), nn.Upsample(size=(s2, s2), mode="nearest"),
            *_conv_bn(width, width), nn.Upsample(size=(s3, s3), mode="nearest"),
            *_conv_bn(width, width),
            nn.Conv2d(width, n_channels, 1), nn.BatchNorm2d(n_channels), nn.ReLU(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class PaperDiscriminator(nn.Module):
    """5x5 convs 32-32-32 with max-pool, batch norm, leaky ReLU, then 64 and 1 (logit).

    ``forward`` returns the logit and each layer's activations (for feature matching).
    """

    def __init__(self, n_channels: int, width: int = 32) -> None:
        super().__init__()
        layers, cin = [], n_channels
        for cout in (width, width, width, 64):
            layers.append(nn.Sequential(nn.Conv2d(cin, cout, 5, padding=2), nn.BatchNorm2d(cout),
                                        nn.LeakyReLU(0.01), nn.MaxPool2d(2)))
            cin = cout
        self.layers = nn.ModuleList(layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return self.head(x).squeeze(1), feats
