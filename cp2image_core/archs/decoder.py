"""cp2image-decoder, our default: MLP to a small map, then bilinear up-sampling + 3x3 convs.

GroupNorm (no batch statistics) keeps one cell's image independent of its batch-mates. With ``subpixel=1`` the
last x2 step is a sub-pixel convolution (the last conv predicts the 2 x 2 pixels of each output position, then
``pixel_shuffle``): no conv runs at full resolution, where few channels make convs memory-bound on a CPU.
``subpixel=2`` makes it a x4 step (4 x 4 pixels per position): no conv runs at half resolution either.
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
``calibrate=K`` then matches, per channel, the mean and standard deviation of the drawn object to the object's own
``Intensity_MeanIntensity_<channel>`` and ``Intensity_StdIntensity_<channel>``: the object is taken as the
``AreaShape_Area`` brightest pixels of channel K (1-based: the channel the objects were found on) within a disk
around the crop's centre, and each channel is mapped by one gain and offset (``match_object_intensity``). It fixes
what a pixel loss leaves loose — the contrast inside the object, which CellProfiler's texture features scale with.
``warp=K`` (before the calibration) rotates and stretches the drawn object so that its second moments are the
ones its ``AreaShape_MajorAxisLength``, ``MinorAxisLength`` and ``Orientation`` state (``match_object_shape``): the
object is found as for ``calibrate``, and the map fades to no change at twice the radius it is looked for in.
Eccentricity and orientation are what the pixel losses leave loosest among the shape features. The module's *Match
each object's stated shape?* switches it on at inference (``synthesize.with_shape_matching``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SpecError
from . import register
from .layers import packed_linear, phase_shuffle


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


# what warp=K reads of the model's objects, in this order
WARP_FEATURES = ("AreaShape_MajorAxisLength", "AreaShape_MinorAxisLength", "AreaShape_Orientation", "AreaShape_Area")


@register("cp2image-decoder")
class Decoder(nn.Module):
    def __init__(self, n_features: int, n_channels: int, crop_size: int,
                 width: int = 128, n_up: int = 4, hidden: int = 512, subpixel: int = 0, smooth: int = 0,
                 low_res_first: int = 0, icnr: int = 0, replicate: int = 0, antialias: int = 0,
                 anchor: int = 0, calibrate: int = 0, warp: int = 0) -> None:
        super().__init__()
        self.anchor = bool(anchor)
        for name, value in (("calibrate", calibrate), ("warp", warp)):
            if not 0 <= value <= n_channels:
                raise ValueError(f"{name}={value}: the object's channel, 1 to {n_channels} (0: off)")
        self.calibrate, self.warp = calibrate, warp
        self.input_clip = math.inf  # the spec's clip, set by bind_spec: the MLP sees clipped z, anchors raw values
        # set by bind_spec: anchors (C, K lo + 1 hi) and the calibration's (2 C + 1) features: means, SDs, area
        # and warp's 4: major and minor axis lengths, orientation, area
        for name in ("anchor_index", "anchor_mean", "anchor_std", "calib_index", "calib_mean", "calib_std",
                     "warp_index", "warp_mean", "warp_std"):
            self.register_buffer(name, None, persistent=False)
        if not 0 <= subpixel <= 2:
            raise ValueError(f"subpixel={subpixel}: 0 (off), 1 (a x2 step) or 2 (a x4 step)")
        self.factor = 2 ** subpixel  # the sub-pixel step's up-sampling (1: none)
        if crop_size % self.factor:
            raise ValueError(f"subpixel={subpixel} needs a crop size divisible by {self.factor}, not {crop_size}")
        final = crop_size // self.factor
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
        self.out = nn.Conv2d(chans[-1], n_channels * self.factor ** 2, 3, padding=1, padding_mode=pad)
        self.smooth = nn.Conv2d(n_channels, n_channels, 3, padding=1, padding_mode=pad) if smooth else None
        self.pad = pad
        if antialias:  # a fixed [1 2 1] x [1 2 1] / 16 blur after the shuffle: zero gain at the 2-pixel period
            taps = torch.tensor([1.0, 2.0, 1.0])
            kernel = (torch.outer(taps, taps) / 16).expand(n_channels, 1, 3, 3).contiguous()
            self.register_buffer("blur", kernel, persistent=False)
        else:
            self.blur = None
        if subpixel and icnr:  # start with the sub-pixels of each output pixel equal (Aitken et al. 2017)
            k = self.factor ** 2
            with torch.no_grad():
                self.out.weight.copy_(self.out.weight[::k].repeat_interleave(k, 0))
                self.out.bias.copy_(self.out.bias[::k].repeat_interleave(k, 0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        fast = not (self.training or torch.is_grad_enabled())  # inference: fused and reordered steps below
        x = self._mlp(z.clamp(-self.input_clip, self.input_clip), fast).view(-1, self.width, self.base, self.base)
        if not fast:
            x = self.ups(x)
        else:  # the fused GroupNorm + SiLU
            for layer in (m for block in self.ups for m in block):
                if isinstance(layer, nn.GroupNorm):
                    x = group_norm_silu(x, layer)
                elif not isinstance(layer, nn.SiLU):  # applied with its GroupNorm
                    x = layer(x)
        if self.factor > 1 and fast:
            x = _subpixel_conv(x, self.out, self.factor)
        else:
            x = self.out(x)
            if self.factor > 1:
                x = F.pixel_shuffle(x, self.factor)
        if self.blur is not None:
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate" if self.pad == "replicate" else "constant"),
                         self.blur, groups=x.shape[1])
        if self.smooth is not None:
            if fast:  # x + smooth(x) as one conv: the identity added to the kernel's centre tap
                w = self.smooth.weight.clone()
                w[:, :, 1, 1] += torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
                x = self.smooth._conv_forward(x, w, self.smooth.bias)
            else:
                x = x + self.smooth(x)
        x = self._anchored(x, z) if self.anchor else torch.sigmoid(x)
        if self.warp:
            if self.warp_index is None:
                raise SpecError("cp2image-decoder with warp=K needs its spec's features: build it with "
                                "cp2image_core.synthesize.build_generator(spec)")
            raw = z.float()[:, self.warp_index] * self.warp_std + self.warp_mean  # (N, 4) raw features
            x = match_object_shape(x, raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3], self.warp - 1)
            if not self.training:
                x = x.clamp_(0.0, 1.0)
        if not self.calibrate:
            return x
        if self.calib_index is None:
            raise SpecError("cp2image-decoder with calibrate=K needs its spec's features: build it with "
                            "cp2image_core.synthesize.build_generator(spec)")
        raw = z.float()[:, self.calib_index] * self.calib_std + self.calib_mean  # (N, 2 C + 1) raw features
        c = x.shape[1]
        # at inference the output outside the window is already 0..1 (anchored and clamped, or a sigmoid)
        return match_object_intensity(x, raw[:, :c], raw[:, c:2 * c], raw[:, -1], self.calibrate - 1,
                                      inplace=not self.training, clip=not self.training)

    def _mlp(self, z: torch.Tensor, fast: bool) -> torch.Tensor:
        """The MLP (Linear, SiLU, Linear, SiLU); at inference on a CPU as oneDNN's fused linears (``packed_linear``)."""
        if fast and z.dtype == torch.float32:
            first, second = (packed_linear(self.mlp[i].weight, self.mlp[i].bias, "swish") for i in (0, 2))
            if first is not None and second is not None:
                return second(first(z))
        return self.mlp(z)

    def _anchored(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.anchor_index is None:
            raise SpecError("cp2image-decoder with anchor=1 needs its spec's features: build it with "
                            "cp2image_core.synthesize.build_generator(spec)")
        raw = z.float()[:, self.anchor_index] * self.anchor_std + self.anchor_mean  # (N, C, K + 1) raw features
        lo = raw[..., :-1].amin(-1)
        hi = raw[..., -1]
        lo, scale = lo[..., None, None], (hi - lo).clamp_min(1e-3)[..., None, None]
        if self.training:
            return lo + scale * x
        if torch.is_grad_enabled():  # eval mode with autograd on: no out= below
            return torch.addcmul(lo, scale, x).clamp(0.0, 1.0)
        # inference: one fused pass into NCHW memory, the layout the module writes pages in (the channels-last input
        # is read once; an addcmul in channels-last memory broadcasts over runs of C values: 3x slower on a CPU)
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, lo.dtype), device=x.device)
        return torch.addcmul(lo, scale, x, out=out).clamp_(0.0, 1.0)

    def bind_spec(self, spec) -> None:
        """Take the spec's clip for the MLP's input and find the features that ``anchor=1`` and ``calibrate=K``
        read as values (they see them unclipped: a cell 8 SDs brighter than the training mean is drawn that bright)."""
        self.input_clip = spec.clip
        names = {(o, f): i for i, (o, f) in enumerate(spec.features)}
        dev = self.out.weight.device
        mean_all = torch.tensor(spec.feature_mean, dtype=torch.float32)
        std_all = torch.tensor(spec.feature_std, dtype=torch.float32)
        def read(param: str, wanted: list[str], modules: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Index, mean and SD of the model's objects' features that ``param`` reads, or a SpecError naming the
            missing ones."""
            missing = [f for f in wanted if (spec.object_name, f) not in names]
            if missing:
                raise SpecError(f"{param} needs {spec.object_name}'s {', '.join(missing)} ({modules} on the model's "
                                f"objects); the features lack them: measure them or train without "
                                f"{param.split('=')[0]}")
            index = torch.tensor([names[(spec.object_name, f)] for f in wanted])
            return index.to(dev), mean_all[index].to(dev), std_all[index].to(dev)

        if self.calibrate:
            self.calib_index, self.calib_mean, self.calib_std = read(
                f"calibrate={self.calibrate}", [f"Intensity_MeanIntensity_{ch}" for ch in spec.channels]
                + [f"Intensity_StdIntensity_{ch}" for ch in spec.channels] + ["AreaShape_Area"],
                "MeasureObjectIntensity and MeasureObjectSizeShape")
        if self.warp:
            self.warp_index, self.warp_mean, self.warp_std = read(f"warp={self.warp}", list(WARP_FEATURES),
                                                                  "MeasureObjectSizeShape")
        if not self.anchor:
            return
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
        self.anchor_index, self.anchor_mean, self.anchor_std = index.to(dev), mean_all[index].to(dev), \
            std_all[index].to(dev)


def _subpixel_conv(x: torch.Tensor, conv: nn.Conv2d, r: int = 2) -> torch.Tensor:
    """``pixel_shuffle(conv(x), r)`` (inference), in channels-last memory: the conv's output channels are put in
    (row, column, channel) order, so that the shuffle is ``phase_shuffle``'s one copy."""
    c = conv.out_channels // (r * r)
    order = torch.arange(r * r * c, device=x.device).view(c, r * r).T.flatten()  # (i, j, ch) <- ch * r² + i * r + j
    bias = None if conv.bias is None else conv.bias[order]
    return phase_shuffle(conv._conv_forward(x, conv.weight[order], bias), r)  # (N, r² C, H, W) -> (N, C, r H, r W)


def match_object_intensity(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, area: torch.Tensor,
                           channel: int = 0, max_gain: float = 4.0, inplace: bool = False,
                           clip: bool = False) -> torch.Tensor:
    """``x`` (N, C, S, S) with each channel mapped by one gain and offset so that, inside the object, its mean and
    standard deviation are ``mean`` and ``std`` (N, C).

    The object is the ``area`` (N,) brightest pixels of ``channel`` within a disk of 1.5 x the equivalent radius
    + 2 pixels around the centre (the crops are centred on the objects). The gain is kept within
    [1 / ``max_gain``, ``max_gain``]. The mapping fades out from 2 to 5 pixels outside the object, so the
    surroundings keep their level; only a centred window that holds the disks and that fade is touched. Gradients
    flow through the statistics, not through the choice of pixels. ``inplace`` writes into ``x`` (inference only);
    ``clip`` clamps the mapped window to 0..1 (for an ``x`` already in 0..1 elsewhere: one pass over the window,
    not a second one over every crop).
    """
    n, _, s, _ = x.shape
    area = area.float().clamp_min(1.0)
    radius = 1.5 * (area / math.pi).sqrt() + 2
    # the disks + the fade; the whole crop on a GPU, where reading the largest radius would stall the pipeline
    half = s // 2 if x.device.type != "cpu" else min(s // 2, int(radius.max().ceil()) + 6)
    lo, size = s // 2 - half, 2 * half
    window = x[:, :, lo:lo + size, lo:lo + size]
    xw = window.float().contiguous()
    ref = xw[:, channel].detach().reshape(n, -1)
    inside = _object_pixels(ref, area, radius, lo, size, s)
    region = inside.to(torch.float32).view(n, 1, size, size)
    count = region.sum((2, 3))  # (N, 1)
    # the sums of x and x^2 over the object: the object's row of weights times the pixels (fewer passes than centring
    # the window; 10x faster on a CPU than pixels times a column), in fp32 under autocast too (in bf16,
    # E[x^2] - E[x]^2 loses the SD of a flat object: a 0.27 pixel error)
    pixels, picked = xw.view(n, -1, size * size).transpose(1, 2), region.view(n, 1, -1)
    with torch.autocast(x.device.type, enabled=False):
        m = torch.bmm(picked, pixels).squeeze(1) / count
        sd = (torch.bmm(picked, pixels * pixels).squeeze(1) / count - m * m).clamp_min(1e-10).sqrt()
    gain = (std.float() / sd.clamp_min(1e-4)).clamp(1 / max_gain, max_gain)
    offset = mean.float() - gain * m
    mapped = torch.addcmul(offset[..., None, None], xw, gain[..., None, None])
    # the object and a 2-pixel rim take the mapping, fading out over 3 more pixels (5 x 5 dilation, 7 x 7 mean)
    weight = _box_sum(_dilate(inside.view(n, size, size), 2).to(torch.float32).unsqueeze(1), 7)
    weight = torch.maximum(weight * (2 / 49), region).clamp_(max=1.0)
    if inplace and not torch.is_grad_enabled():
        new = xw.lerp_(mapped, weight)
        window.copy_(new.clamp_(0.0, 1.0) if clip else new)
        return x
    new = torch.lerp(xw, mapped, weight)
    out = x.clone()
    out[:, :, lo:lo + size, lo:lo + size] = (new.clamp(0.0, 1.0) if clip else new).to(x.dtype)
    return out


def match_object_shape(x: torch.Tensor, major: torch.Tensor, minor: torch.Tensor, orientation: torch.Tensor,
                       area: torch.Tensor, channel: int = 0, max_scale: float = 1.4) -> torch.Tensor:
    """``x`` (N, C, S, S) resampled so that the drawn object's second moments are those of the ellipse with axis
    lengths ``major``, ``minor`` (pixels) and ``orientation`` (degrees), as MeasureObjectSizeShape states them (N,).

    The drawn object is found as ``match_object_intensity`` finds it (the ``area`` brightest pixels of ``channel``
    near the centre), less what is not connected to its centre (``_central_component``), and its ellipse (axes and
    orientation, from its covariance) is mapped onto the stated one
    about its centroid: a rotation by the difference of the orientations (the smaller way round) and a stretch
    along each axis, kept within [1 / ``max_scale``, ``max_scale``]. The map applies fully within the disk the
    object was looked for in (radius R) and, between R and 2 R, by a fraction that falls to 0 — rotation angle
    and log-stretch together, a swirl that never folds the ring; the surroundings beyond stay. Bicubic resampling
    (which can overshoot 0..1 a little). Inside the drawn object (eroded by 2 pixels) only the image's coarse part
    (a Gaussian blur of 3 pixels) moves and the finer detail stays as drawn: rotating the decoder's texture cost
    its directional texture features more. Gradients flow to ``x``.
    """
    n, _, s, _ = x.shape
    area = area.float().clamp_min(1.0)
    radius = 1.5 * (area / math.pi).sqrt() + 2
    xf = x.float()
    region = _object_pixels(xf[:, channel].detach().reshape(n, -1), area, radius, 0, s, s)
    radius = radius[:, None]
    r = torch.arange(s, device=x.device, dtype=torch.float32) - (s - 1) / 2
    rows, cols = r[:, None].expand(s, s).reshape(1, -1), r[None, :].expand(s, s).reshape(1, -1)
    region = _central_component(region.view(n, s, s), rows * rows + cols * cols <= ((radius - 2) / 3) ** 2,
                                radius).view(n, -1).to(torch.float32)
    count = region.sum(1, keepdim=True)
    cr, cc = (region * rows).sum(1, keepdim=True) / count, (region * cols).sum(1, keepdim=True) / count
    dr, dc = rows - cr, cols - cc  # (N, P) from the drawn centroid
    var_r, cov, var_c = ((region * dr * dr).sum(1) / count[:, 0], (region * dr * dc).sum(1) / count[:, 0],
                         (region * dc * dc).sum(1) / count[:, 0])
    half = ((var_r - var_c) ** 2 / 4 + cov * cov).sqrt()
    drawn_l1 = ((var_r + var_c) / 2 + half).clamp_min(1 / 12)
    drawn_l2 = ((var_r + var_c) / 2 - half).clamp_min(1 / 12)
    drawn_theta = 0.5 * torch.atan2(2 * cov, var_r - var_c)  # MeasureObjectSizeShape's orientation, in radians
    delta = torch.deg2rad(orientation.float()) - drawn_theta
    delta = torch.remainder(delta + math.pi / 2, math.pi) - math.pi / 2  # an axis: the smaller way round
    limit = math.log(max_scale)
    log_s1 = (0.5 * torch.log((major.float().clamp_min(1.0) / 4) ** 2 / drawn_l1)).clamp(-limit, limit)[:, None]
    log_s2 = (0.5 * torch.log((minor.float().clamp_min(1.0) / 4) ** 2 / drawn_l2)).clamp(-limit, limit)[:, None]
    # output pixel p takes the drawn image at centroid + R(theta) S^-w R(-theta - w delta) (p - centroid)
    w = ((2 * radius - (dr * dr + dc * dc).sqrt()) / radius).clamp(0.0, 1.0)
    alpha = drawn_theta[:, None] + w * delta[:, None]
    ca, sa = alpha.cos(), alpha.sin()
    v_r = (ca * dr + sa * dc) * torch.exp(-w * log_s1)
    v_c = (ca * dc - sa * dr) * torch.exp(-w * log_s2)
    ct, st = drawn_theta.cos()[:, None], drawn_theta.sin()[:, None]
    src_r, src_c = cr + ct * v_r - st * v_c, cc + st * v_r + ct * v_c
    grid = torch.stack([src_c, src_r], -1).view(n, s, s, 2) / ((s - 1) / 2)  # (x, y) in -1..1, align_corners
    # bicubic: on ExampleFly it kept the outline's detail (solidity, form factor) that bilinear and nearest lost;
    # the detail finer than a Gaussian of 3 px is resampled too, and put back unmoved inside the object
    low = _gaussian_blur(xf, 3.0, 8)
    warped = F.grid_sample(xf, grid, mode="bicubic", padding_mode="border", align_corners=True)
    warped_low = F.grid_sample(low, grid, mode="bilinear", padding_mode="border", align_corners=True)  # smooth
    inner = (_box_sum(region.view(n, 1, s, s), 5) > 24.5).to(torch.float32)  # the drawn object, eroded by 2 px
    return (warped + inner * ((xf - low) - (warped - warped_low))).to(x.dtype)


def _central_component(region: torch.Tensor, seed: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """The part of each ``region`` (N, S, S bool) connected (8-neighbours) to its pixels in ``seed`` (N, S * S: a
    small disk at the centre) — a neighbour's bright pixels inside the disk are not the object; a region with no
    pixel in the seed is kept whole. Grown one ring per step for twice the largest ``radius`` (N, 1), on a CPU
    until nothing grows (a nucleus takes about its radius in steps); on a GPU for S steps, so that nothing waits."""
    n, s, _ = region.shape
    seed = region & seed.view(n, s, s)
    part = seed
    on_cpu = region.device.type == "cpu"
    for _ in range(min(s, 2 * int(radius.max().ceil()) + 2) if on_cpu else s):
        wider = _dilate(part, 1) & region
        if on_cpu and torch.equal(wider, part):
            break
        part = wider
    return torch.where(seed.flatten(1).any(1)[:, None, None], part, region)


def _gaussian_blur(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """``x`` (N, C, H, W) blurred by a separable Gaussian (taps -radius..radius), edges repeated: one band matrix
    per axis (4x faster than a depthwise convolution on a CPU)."""
    taps = torch.arange(-radius, radius + 1, device=x.device)
    g = torch.exp(-(taps * taps).to(torch.float32) / (2 * sigma * sigma))
    g = g / g.sum()

    def band(size: int) -> torch.Tensor:  # row i: the weights of the pixels it averages, the edge's repeated
        cols = (torch.arange(size, device=x.device)[:, None] + taps).clamp(0, size - 1)
        return torch.zeros(size, size, device=x.device).scatter_add_(1, cols, g.expand(size, -1)).to(x.dtype)

    rows_blurred = (x @ band(x.shape[3]).T).transpose(2, 3)  # along W, then along H as the last axis
    return (rows_blurred @ band(x.shape[2]).T).transpose(2, 3)


def _object_pixels(ref: torch.Tensor, area: torch.Tensor, radius: torch.Tensor, lo: int, size: int,
                   s: int) -> torch.Tensor:
    """(N, size * size) mask of the drawn object: the ``area`` (N,) brightest pixels of ``ref`` within ``radius``
    (N,) of the centre of the s x s crop; ``ref`` (N, size * size) covers its rows and columns lo..lo + size - 1."""
    r = torch.arange(lo, lo + size, device=ref.device, dtype=torch.float32) - (s - 1) / 2
    disk = (r[:, None] ** 2 + r[None, :] ** 2).reshape(1, -1) <= (radius * radius)[:, None]
    k = torch.minimum(area.round().clamp_min(5), disk.sum(1)).long().clamp_min(1)
    return _top_k_mask(ref, disk.expand_as(ref), k)


def _dilate(mask: torch.Tensor, p: int) -> torch.Tensor:
    """``mask`` (N, H, W bool) dilated by a (2 p + 1)-pixel square: shifted ORs, one axis at a time (a few times
    faster than thresholding a box sum)."""
    for dim in (1, 2):
        size, out = mask.shape[dim], mask.clone()
        for k in range(1, min(p, size - 1) + 1):
            out.narrow(dim, k, size - k).logical_or_(mask.narrow(dim, 0, size - k))
            out.narrow(dim, 0, size - k).logical_or_(mask.narrow(dim, k, size - k))
        mask = out
    return mask


def _box_sum(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sums of ``x`` (N, 1, H, W) over size x size squares (odd size), zero outside: running sums along each axis,
    a few passes instead of PyTorch's CPU pooling kernels (10x slower on these small maps)."""
    p = size // 2
    for dim in (2, 3):
        run = F.pad(x, (0, 0, p + 1, p) if dim == 2 else (p + 1, p, 0, 0)).cumsum(dim)
        x = run.narrow(dim, size, x.shape[dim]) - run.narrow(dim, 0, x.shape[dim])
    return x


def _top_k_mask(values: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, bins: int = 1024) -> torch.Tensor:
    """(N, P) mask of the ``k`` (N,) largest ``values`` (N, P) where ``mask``, to within one histogram bin (1/1024
    of the row's range; the bin where the count from the top reaches k is taken whole). A sort or ``topk`` of
    every row costs as much as the decoder's last layers on a CPU."""
    outside = ~mask
    lo = values.masked_fill(outside, math.inf).amin(1, keepdim=True)
    hi = values.masked_fill(outside, -math.inf).amax(1, keepdim=True)
    width = ((hi - lo) / bins).clamp_min(1e-12)
    idx = ((values - lo) / width).clamp_(0, bins - 1).long().masked_fill_(outside, 0)
    hist = torch.zeros(values.shape[0], bins, device=values.device).scatter_add_(1, idx, mask.float())
    from_top = hist.flip(1).cumsum(1).flip(1)  # pixels in each bin or above it
    edge = (from_top >= k[:, None]).sum(1, keepdim=True) - 1  # the highest bin whose count from the top reaches k
    return (idx >= edge) & mask
