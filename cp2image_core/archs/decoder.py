"""cp2image-decoder, our default: MLP to a small map, then bilinear up-sampling + 3x3 convs.

GroupNorm (no batch statistics) keeps one cell's image independent of its batch-mates. With ``subpixel=1`` the
last x2 step is a sub-pixel convolution (the last conv predicts the 2 x 2 pixels of each output position, then
``pixel_shuffle``): no conv runs at full resolution, where few channels make convs memory-bound on a CPU.
``low_res_first=1`` runs each block's first conv before its up-sampling (at a quarter of the pixels).
``smooth=1`` adds one 3x3 conv on the full-resolution output channels (about 1% of the FLOPs), so that
neighbouring 2 x 2 groups can be blended instead of forming a checkerboard; ``icnr=1`` initializes the sub-pixel
conv so that training starts from nearest-neighbour up-sampling (no checkerboard at the start). ``replicate=1`` pads
every conv by repeating the edge pixels instead of zeros, so the crop's border is not drawn as a frame.
``antialias=1`` blurs the sub-pixel output with a fixed binomial filter, which removes exactly the 2-pixel period that
the four sub-pixel filters otherwise drift into (a regular dotted texture).
``anchor=1`` draws each channel relative to intensities the cell's own features state: the decoder's output u
becomes ``lo + (hi - lo) * u`` per channel, with lo the lowest ``Intensity_MinIntensity_<channel>`` of the feature
objects and hi the crop objects' ``Intensity_MeanIntensity_<channel>`` (``bind_spec`` finds them in the spec). A
field imaged dimmer or brighter than the training fields then gives a dimmer or brighter cell instead of the
training fields' level.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SpecError
from . import register


def _block(cin: int, cout: int, size: int, low_res_first: bool = False, pad: str = "zeros") -> nn.Sequential:
    """Bilinear up-sampling to ``size`` and two 3x3 conv + GroupNorm + SiLU; with ``low_res_first`` the first conv
    (cin -> cout) runs before the up-sampling, at a quarter of the pixels."""
    up = nn.Upsample(size=(size, size), mode="bilinear", align_corners=False)
    first = [nn.Conv2d(cin, cout, 3, padding=1, padding_mode=pad), nn.GroupNorm(min(8, cout), cout), nn.SiLU()]
    second = [nn.Conv2d(cout, cout, 3, padding=1, padding_mode=pad), nn.GroupNorm(min(8, cout), cout), nn.SiLU()]
    return nn.Sequential(*first, up, *second) if low_res_first else nn.Sequential(up, *first, *second)


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """SiLU(GroupNorm(x)) as one scale-and-shift per sample and channel: the same values as the two modules, about
    4x faster than PyTorch's channels-last GroupNorm kernel on a CPU (inference only: no autograd-friendly ops)."""
    n, c = x.shape[:2]
    g = norm.num_groups
    mean = x.mean((2, 3)).view(n, g, -1).mean(-1, keepdim=True)
    mean_sq = (x * x).mean((2, 3)).view(n, g, -1).mean(-1, keepdim=True)
    inv = torch.rsqrt((mean_sq - mean * mean).clamp_min(0) + norm.eps)
    scale = inv * norm.weight.view(1, g, -1)
    shift = norm.bias.view(1, g, -1) - mean * scale
    return F.silu(torch.addcmul(shift.view(n, c, 1, 1), x, scale.view(n, c, 1, 1)), inplace=True)


@register("cp2image-decoder")
class Decoder(nn.Module):
    def __init__(self, n_features: int, n_channels: int, crop_size: int,
                 width: int = 128, n_up: int = 4, hidden: int = 512, subpixel: int = 0, smooth: int = 0,
                 low_res_first: int = 0, icnr: int = 0, replicate: int = 0, antialias: int = 0,
                 anchor: int = 0) -> None:
        super().__init__()
        self.anchor = bool(anchor)
        for name in ("anchor_index", "anchor_mean", "anchor_std"):  # set by bind_spec: (C, K lo + 1 hi) features
            self.register_buffer(name, None, persistent=False)
        if subpixel and crop_size % 2:
            raise ValueError(f"subpixel=1 needs an even crop size, not {crop_size}")
        self.subpixel = bool(subpixel)
        final = crop_size // 2 if subpixel else crop_size
        self.base = max(2, round(final / 2 ** n_up))
        self.width = width
        self.mlp = nn.Sequential(
            nn.Linear(n_features, hidden), nn.SiLU(),
            nn.Linear(hidden, width * self.base * self.base), nn.SiLU(),
        )
        sizes = [round(final / 2 ** (n_up - i - 1)) for i in range(n_up)]
        sizes[-1] = final
        chans = [max(16, width // 2 ** i) for i in range(n_up + 1)]
        pad = "replicate" if replicate else "zeros"
        self.ups = nn.Sequential(*[_block(chans[i], chans[i + 1], sizes[i], bool(low_res_first), pad)
                                   for i in range(n_up)])
        self.out = nn.Conv2d(chans[-1], n_channels * (4 if subpixel else 1), 3, padding=1, padding_mode=pad)
        self.smooth = nn.Conv2d(n_channels, n_channels, 3, padding=1, padding_mode=pad) if smooth else None
        self.pad = pad
        if antialias:  # a fixed [1 2 1] x [1 2 1] / 16 blur after the shuffle: zero gain at the 2-pixel period
            taps = torch.tensor([1.0, 2.0, 1.0])
            kernel = (torch.outer(taps, taps) / 16).expand(n_channels, 1, 3, 3).contiguous()
            self.register_buffer("blur", kernel, persistent=False)
        else:
            self.blur = None
        if subpixel and icnr:  # start with the four sub-pixels of each output pixel equal (Aitken et al. 2017)
            with torch.no_grad():
                self.out.weight.copy_(self.out.weight[::4].repeat_interleave(4, 0))
                self.out.bias.copy_(self.out.bias[::4].repeat_interleave(4, 0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mlp(z).view(-1, self.width, self.base, self.base)
        if self.training or torch.is_grad_enabled():
            x = self.ups(x)
        else:  # inference: the fused GroupNorm + SiLU
            for layer in (m for block in self.ups for m in block):
                if isinstance(layer, nn.GroupNorm):
                    x = group_norm_silu(x, layer)
                elif not isinstance(layer, nn.SiLU):  # applied with its GroupNorm
                    x = layer(x)
        x = self.out(x)
        if self.subpixel:
            x = F.pixel_shuffle(x, 2)
        if self.blur is not None:
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate" if self.pad == "replicate" else "constant"),
                         self.blur, groups=x.shape[1])
        if self.smooth is not None:
            x = x + self.smooth(x)
        if not self.anchor:
            return torch.sigmoid(x)
        if self.anchor_index is None:
            raise SpecError("cp2image-decoder with anchor=1 needs its spec's features: build it with "
                            "cp2image_core.synthesize.build_generator(spec)")
        raw = z.float()[:, self.anchor_index] * self.anchor_std + self.anchor_mean  # (N, C, K + 1) raw features
        lo = raw[..., :-1].amin(-1)
        hi = raw[..., -1]
        lo, scale = lo[..., None, None], (hi - lo).clamp_min(1e-3)[..., None, None]
        if self.training:
            return lo + scale * x
        return torch.addcmul(lo, scale, x).clamp_(0.0, 1.0)  # inference: one fused pass, in place

    def bind_spec(self, spec) -> None:
        """Find the anchoring features of each channel in ``spec`` (a no-op without ``anchor=1``)."""
        if not self.anchor:
            return
        names = {(o, f): i for i, (o, f) in enumerate(spec.features)}
        objects = list(dict.fromkeys(o for o, _ in spec.features))
        rows = []
        for ch in spec.channels:
            lo = [names[(o, f"Intensity_MinIntensity_{ch}")] for o in objects
                  if (o, f"Intensity_MinIntensity_{ch}") in names]
            hi = names.get((spec.object_name, f"Intensity_MeanIntensity_{ch}"))
            if not lo or hi is None:
                raise SpecError(
                    f"anchor=1 needs, for channel {ch!r}, MeasureObjectIntensity's Intensity_MinIntensity_{ch} of "
                    f"some feature object and Intensity_MeanIntensity_{ch} of {spec.object_name}; the features "
                    "lack them: measure intensity on that image or train without anchor=1")
            rows.append(lo + [lo[-1]] * (len(objects) - len(lo)) + [hi])
        index = torch.tensor(rows)
        mean = torch.tensor(spec.feature_mean, dtype=torch.float32)[index]
        std = torch.tensor(spec.feature_std, dtype=torch.float32)[index]
        dev = self.out.weight.device
        self.anchor_index, self.anchor_mean, self.anchor_std = index.to(dev), mean.to(dev), std.to(dev)
