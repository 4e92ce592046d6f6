"""Crops, features and architectures on inputs whose answer is known."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cp2image_core import archs
from cp2image_core.archs import layers, paper
from cp2image_core.archs.decoder import match_object_intensity, match_object_shape
from cp2image_core.archs.paper import paper_sizes
from cp2image_core.crops import FieldComposer, FieldPainter, compose_field, crop_objects, paste_into_objects
from cp2image_core.errors import SpecError
from cp2image_core.features import select_features, standardize
from cp2image_core.spec import ModelSpec
from cp2image_core.synthesize import build_generator


def test_crop_is_centred_and_padded():
    rng = np.random.default_rng(0)
    img = rng.random((50, 60, 2)).astype(np.float32)
    centers = np.array([[10.4, 20.6], [0.0, 0.0], [59.0, 49.0]])
    crops = crop_objects(img, centers, 16)
    assert crops.shape == (3, 2, 16, 16)
    assert np.array_equal(crops[0, :, 8, 8], img[21, 10])  # (x, y) rounded -> row 21, column 10
    assert np.array_equal(crops[1, :, 8, 8], img[0, 0])
    assert np.all(crops[1, :, :8, :] == 0) and np.all(crops[1, :, :, :8] == 0)  # padded, not shifted
    assert np.array_equal(crops[2, :, 8, 8], img[49, 59])
    assert np.all(crops[2, :, 9:, :] == 0)


def test_crops_equal_a_padded_image_cut_pixel_by_pixel():
    """Centres inside, on and beyond every edge, missing (NaN: the top-left pixel), odd and even sizes, integer
    images: each crop is the zero-padded image around the rounded centre, as a plain per-pixel loop cuts it."""
    rng = np.random.default_rng(7)
    for size in (7, 8):
        for img in (rng.random((9, 13, 2)).astype(np.float32), rng.integers(0, 9, (9, 13))):
            h, w = img.shape[:2]
            centers = np.concatenate([rng.uniform(-size - 3, w + size + 3, (40, 2)),
                                      [[np.nan, 4.0], [0, 0], [w - 1, h - 1], [w, h], [-size, 2], [w + size, h]]])
            crops = crop_objects(img, centers, size)
            plane = img.reshape(h, w, -1)
            for crop, (cx, cy) in zip(crops, np.nan_to_num(centers)):
                expected = np.zeros_like(crop)
                for i in range(size):
                    for j in range(size):
                        y, x = int(np.round(cy)) - size // 2 + i, int(np.round(cx)) - size // 2 + j
                        if 0 <= y < h and 0 <= x < w:
                            expected[:, i, j] = plane[y, x]
                assert np.array_equal(crop, expected), (size, cx, cy)


def test_paste_is_zero_outside_objects_and_matches_crop_inside():
    labels = np.zeros((40, 40), int)
    labels[5:10, 5:12] = 1
    labels[20:30, 25:33] = 2
    centers = np.array([[8.0, 7.0], [28.5, 24.5]])
    crops = np.random.default_rng(1).random((2, 3, 16, 16)).astype(np.float32) + 0.1
    field = paste_into_objects(crops, labels, centers)
    assert field.shape == (40, 40, 3)
    assert np.all(field[labels == 0] == 0)
    assert np.all(field[labels > 0] > 0)
    # a pixel of object 2 at (row 22, col 27): offset from centre (24 -> rounds 24, 28 -> 28)
    assert np.array_equal(field[22, 27], crops[1, :, 22 - 24 + 8, 27 - 28 + 8])
    # cropping the field back at each centre returns the crop inside the object
    back = crop_objects(field, centers, 16)
    inside = crop_objects(labels.astype(np.float32), centers, 16)[:, 0] == np.array([1, 2])[:, None, None]
    assert np.allclose(back.transpose(0, 2, 3, 1)[inside], crops.transpose(0, 2, 3, 1)[inside])


def test_field_painter_in_batches_equals_a_per_object_paste():
    """Batch by batch, objects far from their centre or with no centre (NaN) included, as one object at a time."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 8, (30, 40))  # scattered pixels: many fall outside their object's 8-pixel crop
    labels[0, 0], labels[29, 39] = 1, 7
    centers = rng.random((7, 2)) * [40, 30]
    centers[3] = np.nan
    crops = rng.random((7, 2, 8, 8)).astype(np.float32) + 0.1
    expected = np.zeros((30, 40, 2), np.float32)
    for k in range(7):
        if np.isnan(centers[k]).any():
            continue
        x0, y0 = (np.round(centers[k]).astype(int) - 4)
        for y, x in zip(*np.nonzero(labels == k + 1)):
            if 0 <= y - y0 < 8 and 0 <= x - x0 < 8:
                expected[y, x] = crops[k, :, y - y0, x - x0]
    painter = FieldPainter(labels, centers, 8)
    field = np.zeros((30, 40, 2), np.float32)
    for first in (1, 4, 6):  # objects 1-3, 4-5, 6-7
        painter.paint(crops[first - 1:first - 1 + (3 if first == 1 else 2)], first, field)
    assert np.array_equal(field, expected)
    assert np.any(expected[labels == 1])  # not trivially empty


def test_composed_field_takes_each_object_from_its_own_crop_and_the_darkest_background_between():
    """Inside an object its own crop draws the field; between objects the darkest covering crop; where no crop
    reaches, the crops' darker rims; batch by batch gives the same field as all at once."""
    yy, xx = np.mgrid[:32, :32] - 16
    near = np.sqrt(yy ** 2 + xx ** 2) <= 12
    crops = np.stack([np.where(near, 0.8, 0.1), np.where(near, 0.5, 0.05), np.where(near, 0.6, 0.2),
                      np.where(near, 0.7, 0.3)])
    crops = np.repeat(crops[:, None], 2, 1).astype(np.float32)
    crops[:, 1] *= 0.5  # a second channel
    centers = np.array([[20.0, 20.0], [45.0, 20.0], [100.0, 20.0], [np.nan, np.nan]])
    radii = np.full(4, 6.0)
    field = compose_field(crops, (40, 130), centers, radii, grow=4, fade=2)
    assert field.shape == (40, 130, 2) and field.dtype == np.float32
    for k in range(3):  # each object's centre: its own crop
        assert np.allclose(field[20, int(centers[k, 0])], crops[k, :, 16, 16], atol=1e-3)
    assert np.allclose(field[12, 33], [0.05, 0.025], atol=2e-3)  # beyond both cells: the darker crop's background
    fill = np.percentile([0.1, 0.05, 0.2], 10)  # no crop reaches (object 4 has no centre): the rims' 10th percentile
    assert np.allclose(field[20, 125], [fill, fill / 2])
    faded = compose_field(crops, (40, 130), centers, radii, grow=4)[20, 104:125, 0]  # fading over 8 pixels
    assert np.all(np.diff(faded) <= 1e-6) and fill < faded[115 - 104] < 0.2 and faded[-1] == pytest.approx(fill)
    assert abs(field[20, 32, 0] - field[20, 33, 0]) < 0.2  # two cells meet without a step to the background
    composer = FieldComposer((40, 130), centers, radii, 32, 2, grow=4, fade=2)
    for first in (1, 2, 3, 4):
        composer.add(crops[first - 1:first], first)
    assert np.allclose(composer.field(), field, atol=1e-6)


def test_standardize_imputes_counts_and_clips():
    spec = ModelSpec(arch="cp2image-decoder", arch_params={}, object_name="Nuclei",
                     features=[("Nuclei", "A"), ("Nuclei", "B")], feature_mean=[10.0, 0.0],
                     feature_std=[2.0, 1.0], channels=["DNA"], crop_size=16)
    z, n = standardize(np.array([[12.0, np.nan], [np.inf, 100.0], [10.0, -1.0]]), spec)
    assert z.dtype == np.float32
    assert np.allclose(z, [[1.0, 0.0], [0.0, 5.0], [0.0, -1.0]])
    assert n.tolist() == [1, 1, 0]


def test_select_features_follows_design_rules():
    names = [("Nuclei", "AreaShape_Area"), ("Nuclei", "Location_Center_X"), ("Nuclei", "AreaShape_Center_X"),
             ("Nuclei", "Number_Object_Number"), ("Cells", "AreaShape_EulerNumber"),
             ("Cells", "Texture_Contrast_DNA_3_00_256"), ("Cells", "Parent_Nuclei"),
             ("Nuclei", "Neighbors_FirstClosestObjectNumber_32"), ("Nuclei", "Neighbors_FirstClosestDistance_32")]
    v = np.random.default_rng(0).random((20, len(names)))
    v[:, 4] = 1.0  # constant
    v[:5, 5] = np.nan  # 25% missing
    keep, dropped = select_features(names, v)
    assert keep == [0, 8]
    assert set(dropped["not a feature"]) == {"Nuclei.Location_Center_X", "Nuclei.AreaShape_Center_X",
                                             "Nuclei.Number_Object_Number", "Cells.Parent_Nuclei",
                                             "Nuclei.Neighbors_FirstClosestObjectNumber_32"}
    assert dropped["constant"] == ["Cells.AreaShape_EulerNumber"]
    assert dropped["mostly missing"] == ["Cells.Texture_Contrast_DNA_3_00_256"]


def test_paper_sizes_match_reference():
    assert paper_sizes(68) == [10, 28, 64]


@pytest.mark.parametrize("arch", archs.available())
@pytest.mark.parametrize("crop", [64, 68])
def test_generators_shape_and_batch_independence(arch, crop):
    torch.manual_seed(0)
    gen = archs.build(arch, 12, 3, crop)
    gen.train()
    gen(torch.randn(8, 12))  # a training step moves batch-norm statistics away from their defaults
    gen.eval()
    z = torch.randn(5, 12)
    with torch.no_grad():
        batched = gen(z)
        single = torch.cat([gen(z[i:i + 1]) for i in range(5)])
    assert batched.shape == (5, 3, crop, crop)
    assert torch.allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("params", [{}, {"n_up": 3, "subpixel": 1}, {"n_up": 3, "subpixel": 1, "smooth": 1},
                                    {"n_up": 3, "subpixel": 1, "smooth": 1, "replicate": 1, "antialias": 1},
                                    {"n_up": 3, "subpixel": 1, "smooth": 1, "low_res_first": 1},
                                    {"n_up": 3, "subpixel": 2, "smooth": 1, "low_res_first": 1}])
def test_decoder_inference_path_equals_its_modules(params):
    """The decoder's fused GroupNorm + SiLU (inference) gives what its nn modules give, channels-last too; the
    sub-pixel variants have no full-resolution conv (x4: none at half resolution) and still return full-size crops."""
    torch.manual_seed(0)
    gen = archs.build("cp2image-decoder", 40, 3, 64, **params)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.1 * torch.randn_like(p))  # GroupNorm affine away from (1, 0)
    gen.eval()
    z = torch.randn(6, 40)
    modules = gen(z).detach()  # with autograd on: the nn.Sequential path
    with torch.no_grad():
        fused = gen(z)
    with torch.inference_mode():
        fused_cl = gen.to(memory_format=torch.channels_last)(z)
    assert fused.shape == (6, 3, 64, 64)
    assert torch.allclose(fused, modules, atol=1e-5) and torch.allclose(fused_cl, modules, atol=1e-5)
    assert not torch.allclose(modules[:3], modules[3:], atol=1e-3)  # cells differ: the check is not vacuous
    if params:
        r = 2 ** params["subpixel"]
        sizes = [m.out_channels for m in gen.modules() if isinstance(m, torch.nn.Conv2d)]
        ups = [m for m in gen.ups[-1] if isinstance(m, torch.nn.Upsample)]
        assert 3 * r * r in sizes[-2:] and ups[0].size == (64 // r, 64 // r)


def test_anchored_calibrated_decoder_inference_path_equals_its_autograd_path():
    """The shipped default's kind (anchor, calibrate, sub-pixel, smooth): its inference path (NCHW anchor written
    in one pass, the calibration in place, channels-last convs) gives what the autograd-friendly path gives."""
    torch.manual_seed(0)
    spec = dataclasses.replace(_calibrate_spec(), arch_params={"n_up": 2, "subpixel": 1, "smooth": 1, "anchor": 1,
                                                               "calibrate": 1})
    spec = dataclasses.replace(spec, features=spec.features + [("Nuclei", f"Intensity_MinIntensity_{ch}")
                                                               for ch in spec.channels],
                               feature_mean=[*spec.feature_mean, 0.05, 0.05], feature_std=spec.feature_std + [0.01] * 2)
    gen = build_generator(spec).eval()
    z = torch.randn(6, spec.n_features)
    autograd = gen(z).detach()
    with torch.inference_mode():
        fast = gen.to(memory_format=torch.channels_last)(z)
    assert fast.shape == (6, 2, 32, 32) and fast.is_contiguous()
    assert torch.allclose(fast, autograd, atol=1e-5)
    assert autograd.std() > 0.01 and not torch.allclose(autograd[:3], autograd[3:], atol=1e-3)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a PyTorch without oneDNN")
def test_packed_linear_is_the_linear_layer_and_its_activation():
    """oneDNN's fused linear with a pre-packed weight: same values as nn.Linear + the activation, renewed when the
    weight changes in place, dropped with the weight, and not used where autograd or autocast is on."""
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(20, 30), torch.randn(5, 20)
    with torch.inference_mode():
        silu = layers.packed_linear(linear.weight, linear.bias, "swish")
        leaky = layers.packed_linear(linear.weight, None, "leaky_relu", (0.1,))
        assert torch.allclose(silu(x), torch.nn.functional.silu(linear(x)), atol=1e-5)
        assert torch.allclose(leaky(x), torch.nn.functional.leaky_relu(x @ linear.weight.T, 0.1), atol=1e-5)
        with torch.no_grad():
            linear.weight.mul_(-3.0)
        renewed = layers.packed_linear(linear.weight, linear.bias, "swish")(x)
        assert torch.allclose(renewed, torch.nn.functional.silu(linear(x)), atol=1e-5)
        assert not torch.allclose(renewed, silu(x), atol=1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layers.packed_linear(linear.weight, linear.bias) is None
        assert layers.packed_linear(linear.weight, linear.bias, "no-such-activation") is None  # oneDNN refuses it
    assert layers.packed_linear(linear.weight, linear.bias) is None  # autograd on
    keys = [k for k in layers._PACKED if k[0] == id(linear.weight)]
    assert len(keys) == 3  # swish, leaky_relu and the refused one
    del linear
    assert not set(keys) & set(layers._PACKED)


@pytest.mark.parametrize("subpixel", [1, 2])
def test_decoder_icnr_starts_without_a_checkerboard(subpixel):
    r = 2 ** subpixel
    gen = archs.build("cp2image-decoder", 10, 3, 64, n_up=3, subpixel=subpixel, icnr=1)
    with torch.no_grad():
        x = gen.ups(gen.mlp(torch.randn(2, 10)).view(-1, gen.width, gen.base, gen.base))
        y = torch.nn.functional.pixel_shuffle(gen.out(x), r)
    assert y.shape == (2, 3, 64, 64)
    for i in range(r):
        for j in range(r):
            assert torch.equal(y[..., i::r, j::r], y[..., ::r, ::r])
    assert y.std() > 0


@pytest.mark.parametrize("replicate", [0, 1])
def test_decoder_antialias_removes_the_two_pixel_dots(replicate):
    """A sub-pixel layer that draws a pure 2 x 2 dot pattern gives a flat image once ``antialias=1`` blurs it."""
    def output(antialias):
        gen = archs.build("cp2image-decoder", 10, 1, 16, n_up=2, subpixel=1, antialias=antialias, replicate=replicate)
        with torch.no_grad():
            gen.out.weight.zero_()
            gen.out.bias.copy_(torch.tensor([-1.0, 1.0, 0.5, -0.5]))  # the four sub-pixels of every output pixel
        return torch.logit(gen.eval()(torch.randn(2, 10)))[..., 1:-1, 1:-1]

    dotted, flat = output(0), output(1)
    assert dotted.std() > 0.5
    assert torch.allclose(flat, torch.zeros_like(flat), atol=1e-5)


def _anchor_spec(channels=("DNA", "FITC")) -> ModelSpec:
    feats = [("Nuclei", "AreaShape_Area")]
    for ch in channels:
        feats += [("Nuclei", f"Intensity_MinIntensity_{ch}"), ("Nuclei", f"Intensity_MeanIntensity_{ch}"),
                  ("Cells", f"Intensity_MinIntensity_{ch}")]
    n = len(feats)
    return ModelSpec(arch="cp2image-decoder", arch_params={"n_up": 2, "subpixel": 1, "anchor": 1},
                     object_name="Nuclei", features=feats, feature_mean=[0.1 + 0.01 * i for i in range(n)],
                     feature_std=[0.02] * n, channels=["DNA", "FITC"], crop_size=16)


def test_decoder_anchor_draws_each_channel_relative_to_its_stated_intensities():
    """With the MLP blind to the anchoring features, their raw values move each channel affinely: lo + (hi-lo) u,
    lo the lowest MinIntensity of the channel's objects, hi the crop objects' MeanIntensity."""
    spec = _anchor_spec()
    gen = build_generator(spec).train()  # train mode: not clamped to 0..1
    assert gen.anchor_index.tolist() == [[1, 3, 2], [4, 6, 5]]
    with torch.no_grad():
        gen.mlp[0].weight[:, 1:] = 0.0
    mean, std = np.array(spec.feature_mean), np.array(spec.feature_std)

    def image(raw):
        with torch.no_grad():
            return gen(torch.tensor((raw - mean) / std, dtype=torch.float32)[None])[0]

    a = mean.copy()
    b = mean.copy()
    b[[1, 2, 3]] = [0.30, 0.70, 0.05]  # DNA: Nuclei min, Nuclei mean, Cells min (the lowest: lo)
    b[[4, 5, 6]] = [0.02, 0.10, 0.08]  # FITC: Nuclei min is the lowest here
    ya, yb = image(a), image(b)
    expected = [(min(a[1], a[3]), a[2], 0.05, 0.70), (min(a[4], a[6]), a[5], 0.02, 0.10)]
    for c, (lo_a, hi_a, lo_b, hi_b) in enumerate(expected):
        u = (ya[c] - lo_a) / (hi_a - lo_a)
        assert torch.allclose(yb[c], lo_b + (hi_b - lo_b) * u, atol=1e-5)
    assert ya.std() > 0


def test_decoder_anchor_names_the_channel_whose_intensity_features_are_missing():
    spec = _anchor_spec(channels=("DNA",))
    with pytest.raises(SpecError, match=r"channel 'FITC'.*Intensity_MinIntensity_FITC.*Nuclei"):
        build_generator(spec)


def _calibrate_spec(channels=("DNA", "FITC"), std=True) -> ModelSpec:
    feats = [("Nuclei", "AreaShape_Area"), ("Cells", "AreaShape_Area")]
    for ch in channels:
        feats += [("Nuclei", f"Intensity_MeanIntensity_{ch}")] + ([("Nuclei", f"Intensity_StdIntensity_{ch}")] if std
                                                                  else [])
    return ModelSpec(arch="cp2image-decoder", arch_params={"n_up": 2, "subpixel": 1, "calibrate": 1},
                     object_name="Nuclei", features=feats, feature_mean=[40.0, 300.0] + [0.2, 0.03] * len(channels),
                     feature_std=[10.0, 50.0] + [0.05, 0.01] * len(channels), channels=["DNA", "FITC"], crop_size=32)


def test_match_object_intensity_sets_the_objects_mean_and_sd_and_leaves_the_surroundings():
    """The object is the ``area`` brightest pixels of the first channel near the centre (a neighbour's brighter
    pixels at the border are not it); inside it each channel gets the stated mean and SD; far away nothing moves."""
    torch.manual_seed(0)
    x = 0.1 + 0.02 * torch.rand(3, 2, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 36).float()  # 112 pixels, radius 6
    phase = torch.rand(3, 1, 1) * 6
    x[:, 0] += 0.3 * blob + 0.03 * torch.sin(yy / 2 + phase) * torch.cos(xx / 3) * blob  # smooth, as drawn cells are
    x[:, 1] += 0.05 * blob * (1 + torch.cos(xx / 2 + yy / 3 + phase))
    x[:, 0, :3, :3] = 0.9  # a bright neighbour in the corner
    mean = torch.tensor([[0.5, 0.2], [0.3, 0.25], [0.6, 0.1]])
    std = torch.tensor([[0.03, 0.02], [0.01, 0.03], [0.025, 0.01]])  # gains within 0.3-3
    y = match_object_intensity(x, mean, std, torch.full((3,), blob.sum()))
    inside = blob.bool()
    for i in range(3):
        for c in range(2):
            assert abs(y[i, c][inside].mean() - mean[i, c]) < 1e-5
            assert abs(y[i, c][inside].std(unbiased=False) - std[i, c]) < 1e-5
    far = torch.ones(32, 32, dtype=torch.bool)
    far[3:29, 3:29] = False  # the object (radius 6) and its 5-pixel fade
    assert torch.equal(y[:, :, far], x[:, :, far])  # the corner neighbour included
    # a flat object would need a huge gain: it is capped
    flat = match_object_intensity(torch.full((1, 1, 32, 32), 0.5), torch.tensor([[0.5]]), torch.tensor([[0.1]]),
                                  torch.tensor([50.0]))
    assert torch.isfinite(flat).all()


def test_decoder_calibrate_reads_the_objects_stated_intensities_unclipped():
    """calibrate=1 maps the decoder's image by ``match_object_intensity`` with the object's MeanIntensity,
    StdIntensity and Area features read as values, even beyond the spec's clip (a cell 8 SDs brighter than the mean
    is drawn that bright), while the MLP sees clipped features as in training."""
    spec = _calibrate_spec()
    gen = build_generator(spec).eval()
    assert gen.calib_index.tolist() == [2, 4, 3, 5, 0]
    plain = archs.build("cp2image-decoder", spec.n_features, 2, 32, n_up=2, subpixel=1).eval()
    plain.load_state_dict(gen.state_dict())
    plain.input_clip = spec.clip
    mean, std = np.array(spec.feature_mean), np.array(spec.feature_std)
    raw = mean.copy()
    raw[[2, 3, 4, 5]] = [0.2 + 8 * 0.05, 0.03, 0.35, 0.05]  # DNA mean 0.6: 8 SDs, beyond the clip of 5
    z = torch.tensor((raw - mean) / std, dtype=torch.float32)[None]
    with torch.no_grad():
        y = gen(z)
        expected = match_object_intensity(plain(z), torch.tensor([[0.6, 0.35]]), torch.tensor([[0.03, 0.05]]),
                                          torch.tensor([40.0])).clamp(0, 1)
        assert torch.allclose(y, expected, atol=1e-6)
        r = torch.arange(32.0) - 15.5
        near = (r[:, None] ** 2 + r[None, :] ** 2).sqrt().flatten() <= 1.5 * (40 / np.pi) ** 0.5 + 2
        top = plain(z)[0, 0].flatten().masked_fill(~near, -1).argsort(descending=True)[:40]  # the object: the 40
        assert abs(y[0, 0].flatten()[top].mean() - 0.6) < 2e-3  # brightest DNA pixels near the centre; not 0.45
        other, same = z.clone(), z.clone()
        other[0, 1], same[0, 1] = 30.0, 5.0  # Cells area, not read as a value: the MLP's clip makes 30 SDs 5
        assert torch.equal(gen(other), gen(same))


def test_decoder_calibrate_names_the_missing_features():
    with pytest.raises(SpecError, match=r"calibrate=1 needs Nuclei's Intensity_StdIntensity_DNA, "
                                        r"Intensity_StdIntensity_FITC"):
        build_generator(_calibrate_spec(std=False))
    with pytest.raises(SpecError, match=r"calibrate=3.*1 to 2"):
        archs.build("cp2image-decoder", 6, 2, 32, calibrate=3)


def _ellipse(size: int, a: float, b: float, degrees: float) -> torch.Tensor:
    """A filled ellipse (semi-axes a along ``degrees`` from the rows axis, b across) centred in a size x size crop."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    th = np.radians(degrees)
    along = r[:, None] * np.cos(th) + r[None, :] * np.sin(th)
    across = -r[:, None] * np.sin(th) + r[None, :] * np.cos(th)
    return ((along / a) ** 2 + (across / b) ** 2 <= 1).float()


def _regionprops(mask) -> tuple[float, float, float, float]:
    """Area, major and minor axis lengths and orientation (degrees) of the mask's component at the crop's centre, as
    MeasureObjectSizeShape computes them."""
    from skimage.measure import label, regionprops

    labels = label(np.asarray(mask, dtype=np.uint8))
    p = regionprops((labels == labels[labels.shape[0] // 2, labels.shape[1] // 2]).astype(np.uint8))[0]
    return p.area, p.major_axis_length, p.minor_axis_length, np.degrees(p.orientation)


def test_match_object_shape_gives_the_drawn_object_the_stated_ellipse():
    """A drawn ellipse is rotated and stretched onto the stated axes and orientation (re-measured by skimage's
    regionprops, which MeasureObjectSizeShape uses), though a brighter neighbour lies within the disk the object is
    looked for in; stated = drawn leaves the crop as it is; far away nothing moves."""
    torch.manual_seed(0)
    drawn = _ellipse(64, 10, 7, 20)
    x = (0.1 + 0.7 * drawn + 0.01 * torch.rand(2, 64, 64))[:, None].float()  # two crops, one channel
    x[:, :, :2, :2] = 0.9  # a bright corner: not the object, and too far to move
    x[0, :, 44:47, 30:33] = 0.95  # a brighter neighbour near the object, among its Area brightest pixels
    area, major, minor, orientation = _regionprops(_ellipse(64, 12, 6, -40))
    own = _regionprops(drawn)
    y = match_object_shape(x, torch.tensor([major, own[1]]), torch.tensor([minor, own[2]]),
                           torch.tensor([orientation, own[3]]), torch.full((2,), float(drawn.sum())))
    got = _regionprops(y[0, 0] > 0.45)
    assert abs(got[0] - area) <= 0.05 * area
    assert abs(got[1] - major) < 0.5 and abs(got[2] - minor) < 0.5 and abs(got[3] - orientation) < 1.5, got
    assert (y[1] - x[1]).abs().max() < 1e-4  # already the stated ellipse
    assert torch.allclose(y[:, :, :2, :2], x[:, :, :2, :2], atol=1e-5)
    # the stretch is capped: a stated major axis 3x the drawn one gives 1.4x
    long = match_object_shape(x[:1], torch.tensor([3 * own[1]]), torch.tensor([own[2]]), torch.tensor([own[3]]),
                              torch.tensor([float(drawn.sum())]))
    assert abs(_regionprops(long[0, 0] > 0.45)[1] / own[1] - 1.4) < 0.05


def test_match_object_shape_reads_measureobjectsizeshape_features(fly_export):
    """On real ExampleFly nuclei, CellProfiler's own AreaShape features drive the warp in its conventions: a
    nucleus's mask warped with its own features stays put, and warped with another nucleus's features takes that
    nucleus's orientation and axes (where the stretch stays within the cap)."""
    from conftest import CHANNELS

    from cp2image_core.dataset import build_training_set

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 64, val_images=[1], mask_image="NucleiLabels")
    index = {f: j for j, f in enumerate(ts.feature_names)}
    feats = {f: torch.tensor(ts.features[:, index[("Nuclei", f"AreaShape_{f}")]], dtype=torch.float32)
             for f in ("MajorAxisLength", "MinorAxisLength", "Orientation", "Area")}
    elongated = np.flatnonzero((feats["MajorAxisLength"] > 1.3 * feats["MinorAxisLength"]).numpy()
                               & (ts.masks[:, 1:-1, 1:-1].sum((1, 2)) == ts.masks.sum((1, 2))))[:40]
    masks = torch.tensor(ts.masks[elongated], dtype=torch.float32)[:, None]
    own = match_object_shape(masks, *(feats[f][elongated] for f in feats))
    assert (own - masks).abs().mean() < 0.01
    other = np.roll(elongated, 1)  # each mask given its neighbour's features
    warped = match_object_shape(masks, *(feats[f][other] for f in ("MajorAxisLength", "MinorAxisLength",
                                                                   "Orientation")), feats["Area"][elongated])
    angle_err, checked = [], 0
    for i, j in zip(range(len(elongated)), other):
        ratio = feats["MajorAxisLength"][j] / feats["MajorAxisLength"][elongated[i]]
        ratio2 = feats["MinorAxisLength"][j] / feats["MinorAxisLength"][elongated[i]]
        if not (0.8 < ratio < 1.25 and 0.8 < ratio2 < 1.25):
            continue  # a stretch near or beyond the cap
        _, major, minor, orientation = _regionprops(warped[i, 0] > 0.5)
        assert abs(major - feats["MajorAxisLength"][j]) < 1.5 and abs(minor - feats["MinorAxisLength"][j]) < 1.5
        angle_err.append(abs((orientation - feats["Orientation"][j].item() + 90) % 180 - 90))
        checked += 1
    assert checked >= 10 and np.median(angle_err) < 3, (checked, angle_err)


def test_decoder_warp_names_the_missing_features():
    spec = _calibrate_spec()
    spec = dataclasses.replace(spec, arch_params={"n_up": 2, "subpixel": 1, "warp": 1})
    with pytest.raises(SpecError, match=r"warp=1 needs Nuclei's AreaShape_MajorAxisLength, AreaShape_MinorAxisLength, "
                                        r"AreaShape_Orientation"):
        build_generator(spec)
    with pytest.raises(SpecError, match=r"warp=3.*1 to 2"):
        archs.build("cp2image-decoder", 6, 2, 32, warp=3)


def test_generators_clip_their_own_input():
    """Callers pass unclipped standardized features (``standardize(..., clip=False)``); both architectures, built
    from a spec, clip what their networks see to the spec's range."""
    spec = ModelSpec(arch="cp2image-paper", arch_params={}, object_name="Nuclei", features=[("Nuclei", "A")] * 4,
                     feature_mean=[0.0] * 4, feature_std=[1.0] * 4, channels=["DNA"], crop_size=48)
    gen = build_generator(spec).eval()
    z = torch.tensor([[9.0, -7.0, 1.0, 0.0]])
    with torch.no_grad():
        assert torch.equal(gen(z), gen(z.clamp(-5, 5)))
    raw = np.array([[9.0, -7.0, np.nan, 0.5]])
    assert np.allclose(standardize(raw, spec, clip=False)[0], [[9.0, -7.0, 0.0, 0.5]])
    assert np.allclose(standardize(raw, spec)[0], [[5.0, -5.0, 0.0, 0.5]])


def test_architecture_parameters_the_crop_does_not_allow_are_named():
    with pytest.raises(SpecError, match=r"63-pixel crops.*subpixel=1.*divisible by 2"):
        archs.build("cp2image-decoder", 12, 3, 63, subpixel=1)
    with pytest.raises(SpecError, match=r"66-pixel crops.*subpixel=2.*divisible by 4"):
        archs.build("cp2image-decoder", 12, 3, 66, subpixel=2)
    with pytest.raises(SpecError, match=r"subpixel=3: 0 \(off\), 1"):
        archs.build("cp2image-decoder", 12, 3, 64, subpixel=3)
    with pytest.raises(SpecError, match=r"cp2image-paper.*too small"):
        archs.build("cp2image-paper", 12, 3, 32)


def test_fast_paper_generator_equals_the_dense_one():
    """The phase-decomposed eval path (same weights) gives the dense network's outputs at 68x68."""
    torch.manual_seed(0)
    gen = archs.build("cp2image-paper", 40, 3, 68)
    gen.train()
    for _ in range(3):
        gen(torch.randn(16, 40))  # move the batch-norm statistics
    gen.eval()
    assert gen.exact_doubling
    z = torch.randn(2 * paper.CPU_CHUNK + 6, 40)  # on the CPU: two whole chunks and a part of one
    with torch.no_grad():
        dense = gen.net(z[:, :, None, None])
        fast = gen(z)
    assert fast.shape == dense.shape == (len(z), 3, 68, 68)
    assert torch.allclose(fast, dense, atol=1e-5, rtol=1e-4)
    # folded weights are cached: a weight changed in place (training, load_state_dict) invalidates them
    with torch.no_grad():
        gen.net[11].weight.mul_(1.5)
        gen.net[12].running_var.mul_(0.5)
        dense2 = gen.net(z[:, :, None, None])
        fast2 = gen.to(memory_format=torch.channels_last)(z)
    assert not torch.allclose(dense2, dense, atol=1e-3)
    assert torch.allclose(fast2, dense2, atol=1e-5, rtol=1e-4) and fast2.is_contiguous()
    assert not archs.build("cp2image-paper", 40, 3, 64).exact_doubling  # other sizes use the dense path


def test_16_bit_pixels_are_clipped_and_rounded_to_cellprofilers_scale():
    from cp2image_core.module_support import to_pixels

    values = np.array([-0.1, 0.0, 0.4 / 65535, 0.6 / 65535, 0.5, 1.0, 1.2], np.float32)
    assert to_pixels(values, np.uint16).tolist() == [0, 0, 0, 1, 32768, 65535, 65535]
    assert to_pixels(values).dtype == np.float32 and np.array_equal(to_pixels(values), values)


def test_the_roofline_times_the_same_matrix_product_in_each_library():
    """benchmarks/generator_throughput.py's ceiling: MKL's GEMM and oneDNN's 1x1 convolution compute a @ b."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from generator_throughput import matmul_paths, matmul_rate, matmul_rates

    a, b = torch.randn(96, 80), torch.randn(80, 112)
    paths = matmul_paths(a, b)
    assert sorted(paths) == ["gemm", "onednn"]
    with torch.inference_mode():
        for fn in paths.values():
            assert torch.allclose(fn(), a @ b, atol=1e-4)
    rates = matmul_rates(torch.device("cpu"), n=128, reps=2)
    assert sorted(rates) == ["gemm", "onednn"] and min(rates.values()) > 0
    assert matmul_rate(torch.device("cpu"), n=128, reps=2) > 0


def test_flops_per_cell_counts_the_decoders_mlp():
    """benchmarks/generator_throughput.py's FLOPs per cell include the MLP that runs through oneDNN's fused linear at
    inference (PyTorch's counter does not see it): 2 x the MLP's multiply-adds plus the convolutions' count."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from generator_throughput import flops_per_cell

    gen = archs.build("cp2image-decoder", 40, 3, 32, n_up=2, subpixel=1, hidden=64).eval()
    mlp = 2 * (40 * 64 + 64 * gen.width * gen.base * gen.base)
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as convs:
        gen.ups(torch.zeros(4, gen.width, gen.base, gen.base))
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as out:
        gen.out(torch.zeros(4, gen.out.in_channels, 16, 16))
    assert flops_per_cell(gen, 40) == mlp + (convs.get_total_flops() + out.get_total_flops()) / 4
