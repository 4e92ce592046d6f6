"""cp2image-paper: the CP2Image generator and discriminator (Ji et al., MIDL 2023), in PyTorch.

Four 5x5 convolutions of 32 channels on zero padding 4, nearest up-sampling after the first three,
batch norm + leaky ReLU(0.01), then a 1x1 "reconstructor" with batch norm + ReLU. At 68x68 the
up-sampled sizes are 10, 28, 64 as in the reference; other crop sizes follow the same arithmetic.
Inference uses eval mode (running statistics), so a cell's image does not depend on its batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register
from .layers import packed_linear, phase_shuffle

CPU_CHUNK = 16  # cells per pass of the eval path on a CPU (unchunked, batches of 8 / 32 / 64 ran at 0.93 / 0.94 /
# 0.57-0.89x the cells/s of 16 on a 2-core Zen 5)

# Nearest x2 up-sampling, zero padding 4 and a valid 5x5 conv equal, per output phase (row and column
# parity), a 3x3 conv of the low-resolution input padded by 2 whose taps sum groups of the 5x5 taps.
_PHASE = torch.tensor([[[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],   # even outputs
                       [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]]],  # odd outputs
                      dtype=torch.float32)


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

        self.sizes = (s1, s2, s3)
        self.input_clip = math.inf  # the spec's clip on the standardized features (bind_spec)
        self.exact_doubling = all(s == 2 * n for s, n in zip(self.sizes, (5, s1 + 4, s2 + 4)))

    def bind_spec(self, spec) -> None:
        """Clip the standardized features to the spec's range, as in training."""
        self.input_clip = spec.clip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.clamp(-self.input_clip, self.input_clip)
        if not self.training and self.exact_doubling:
            return self.forward_fast(z)
        return self.net(z[:, :, None, None])

    def forward_fast(self, z: torch.Tensor) -> torch.Tensor:
        """The same function as the dense network in eval mode, skipping work whose result is known.

        The first conv sees one non-zero pixel of its padded input: a matrix product (on a CPU oneDNN's, with the
        leaky ReLU fused: ``packed_linear``). Each x2 nearest up-sampling + 5x5 conv becomes four 3x3 convs (one per
        output phase) on the low-resolution map: 9 instead of 25 multiply-adds per output, about 2.9x fewer FLOPs
        at 68x68. Batch norms are folded into the convs once (cached until a weight changes); maps stay
        channels-last for the CPU's conv kernels, each phase conv's channels in (row phase, column phase, channel)
        order, so that a shuffle is one copy of runs of 2C values (PyTorch's pixel_shuffle copies single values),
        and the last one writes the NCHW output with the ReLU.
        On a CPU a batch runs in chunks of ``CPU_CHUNK`` cells, whose maps stay in cache.
        """
        w1, b1, phases, out_conv = self._folded()
        first = packed_linear(w1, b1, "leaky_relu", (0.01,)) if z.dtype == torch.float32 else None  # once a batch
        if first is None:
            def first(x: torch.Tensor) -> torch.Tensor:
                return F.leaky_relu(F.linear(x, w1, b1), 0.01)
        chunk = CPU_CHUNK if z.device.type == "cpu" else len(z)
        if len(z) <= chunk:
            return self._fast_chunk(z, first, phases, out_conv)
        parts = [self._fast_chunk(z[i:i + chunk], first, phases, out_conv) for i in range(0, len(z), chunk)]
        return torch.cat(parts)

    @staticmethod
    def _fast_chunk(z: torch.Tensor, first, phases, out_conv) -> torch.Tensor:
        """``forward_fast`` on one chunk: ``first`` the first layer (with its leaky ReLU), then the folded weights."""
        w_out, b_out = out_conv
        x = first(z).view(len(z), 5, 5, -1).permute(0, 3, 1, 2)  # channels-last (N, C, 5, 5)
        for i, (k, b) in enumerate(phases):
            y = F.conv2d(x, k, b, padding=2)  # (N, 4C, h, w), channel = (row phase * 2 + col phase) * C + c
            y = F.leaky_relu(y, 0.01, inplace=True)
            if i < len(phases) - 1:
                x = phase_shuffle(y)
        # the 1x1 reconstructor per phase, before the last shuffle: 3 full-size channels are moved, not 32
        y = F.conv2d(y, w_out, b_out)  # (N, 4 * 3, h, w) in phase order
        n, c4, h, w = y.shape
        src = y.permute(0, 2, 3, 1).reshape(n, h, w, 2, 2, c4 // 4).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, i, w, j)
        out = torch.empty((n, c4 // 4, 2 * h, 2 * w), dtype=y.dtype, device=y.device)
        torch.clamp_min(src, 0.0, out=out.view(n, c4 // 4, h, 2, w, 2))
        return out

    def _folded(self):
        """Eval-mode weights with batch norm folded in, phase kernels built; recomputed when weights change."""
        w0 = self.net[1].weight
        key = (*(t._version for t in (*self.parameters(), *self.buffers())), w0.device, w0.dtype)
        cache = getattr(self, "_fast_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        net = self.net
        with torch.no_grad():
            def fold(conv, bn):
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                return conv.weight * scale[:, None, None, None], (conv.bias - bn.running_mean) * scale + bn.bias

            w, b = fold(net[1], net[2])
            co = w.shape[0]
            w1 = w.flip(2, 3).permute(1, 2, 3, 0).reshape(w.shape[1], 25 * co).T.contiguous()  # z w1^T: (N, 5, 5, C)
            b1 = b.repeat(25)
            g = _PHASE.to(w)
            phases = []
            for conv, bn in ((net[6], net[7]), (net[11], net[12]), (net[16], net[17])):
                w, b = fold(conv, bn)
                k = torch.einsum("pau,oiuv,qbv->pqoiab", g, w, g).reshape(4 * w.shape[0], w.shape[1], 3, 3)
                phases.append((k.contiguous(memory_format=torch.channels_last), b.repeat(4)))
            w, b = fold(net[19], net[20])  # (O, C) -> block-diagonal over the 4 phases: (4*O, 4*C)
            w_out = torch.einsum("pq,oc->poqc", torch.eye(4, dtype=w.dtype, device=w.device), w[:, :, 0, 0])
            w_out = w_out.reshape(4 * w.shape[0], 4 * w.shape[1], 1, 1)
            out = (w1, b1, phases, (w_out.contiguous(memory_format=torch.channels_last), b.repeat(4)))
        self._fast_cache = (key, out)
        return out


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
