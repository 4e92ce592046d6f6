"""Discriminators ("critics") used in training only; never stored in a model file."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import spectral_norm

from .paper import PaperDiscriminator


class PatchCritic(nn.Module):
    """A spectrally normalized patch critic: one realism score per overlapping patch.

    ``forward`` returns the patch logits (flattened) and each stage's activations (for feature matching).
    """

    def __init__(self, n_channels: int, width: int = 32, n_down: int = 3) -> None:
        super().__init__()
        stages, cin = [], n_channels
        for i in range(n_down):
            cout = width * 2 ** i
            stages.append(nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)),
                                        nn.LeakyReLU(0.2)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.head = spectral_norm(nn.Conv2d(cin, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return self.head(x).flatten(1).mean(1), feats


def build_critic(arch: str, n_channels: int) -> nn.Module:
    """The paper's discriminator for cp2image-paper, the patch critic otherwise."""
    return PaperDiscriminator(n_channels) if arch == "cp2image-paper" else PatchCritic(n_channels)
