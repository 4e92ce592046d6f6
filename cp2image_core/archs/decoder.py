"""cp2image-decoder, our default: MLP to a small map, then bilinear up-sampling + 3x3 convs.

GroupNorm (no batch statistics) keeps one cell's image independent of its batch-mates.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import register


def _block(cin: int, cout: int, size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(size=(size, size), mode="bilinear", align_corners=False),
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
    )


@register("cp2image-decoder")
class Decoder(nn.Module):
    def __init__(self, n_features: int, n_channels: int, crop_size: int,
                 width: int = 128, n_up: int = 4, hidden: int = 512) -> None:
        super().__init__()
        self.base = max(2, round(crop_size / 2 ** n_up))
        self.width = width
        self.mlp = nn.Sequential(
            nn.Linear(n_features, hidden), nn.SiLU(),
            nn.Linear(hidden, width * self.base * self.base), nn.SiLU(),
        )
        sizes = [round(crop_size / 2 ** (n_up - i - 1)) for i in range(n_up)]
        sizes[-1] = crop_size
        chans = [max(16, width // 2 ** i) for i in range(n_up + 1)]
        self.ups = nn.Sequential(*[_block(chans[i], chans[i + 1], sizes[i]) for i in range(n_up)])
        self.out = nn.Conv2d(chans[-1], n_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mlp(z).view(-1, self.width, self.base, self.base)
        return torch.sigmoid(self.out(self.ups(x)))
