"""Training set from a real headless CellProfiler export, the training entry point, resume, DDP."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHANNELS, ROOT, examplefly_dir

from cp2image_core.dataset import _numeric, _read_csv, build_training_set, load_image
from cp2image_core.errors import CP2ImageError, DataError
from cp2image_core.modelfile import load_model
from cp2image_core.synthesize import load_synthesizer_uncached
from cp2image_core.train import main as train_main

ARGS = ["--feature-objects", "Nuclei", "Cells", "Cytoplasm", "--channels", *CHANNELS, "--val-images", "1"]


def test_training_set_from_real_export(fly_export, tmp_path):
    ts = build_training_set(fly_export, "Nuclei", ["Nuclei", "Cells", "Cytoplasm"], CHANNELS, 48,
                            val_images=[1], cache=tmp_path / "c.npz")
    n = len(_read_csv(fly_export / "Nuclei.csv")[1])
    assert ts.crops.shape == (n, 3, 48, 48)
    objs = {o for o, _ in ts.feature_names}
    assert objs == {"Nuclei", "Cells", "Cytoplasm"}
    feats = {f for _, f in ts.feature_names}
    assert "AreaShape_Area" in feats and "Intensity_MeanIntensity_FITC" in feats
    assert not any(f.startswith(("Location_", "Number_", "Parent_", "Children_", "AreaShape_Center"))
                   for f in feats)
    assert "Nuclei.AreaShape_EulerNumber" in ts.dropped["constant"]
    # crops are centred: the centre pixel is the source image's pixel at the rounded centre
    ih, irows = _read_csv(fly_export / "Image.csv")
    oh, orows = _read_csv(fly_export / "Nuclei.csv")
    dna = load_image(examplefly_dir() / irows[0][ih.index("FileName_DNA")])
    x = _numeric(fly_export / "Nuclei.csv", oh, orows, "Location_Center_X")
    y = _numeric(fly_export / "Nuclei.csv", oh, orows, "Location_Center_Y")
    for i in (0, 10, 50):
        assert ts.crops[i, 0, 24, 24] == dna[round(y[i]), round(x[i])]
    # the split is by image: validation cells all come from image 1, training cells from the others
    assert set(ts.image_number[ts.is_val]) == {1} and 1 not in set(ts.image_number[~ts.is_val])
    # intensities as CellProfiler measured them: a nucleus's max DNA intensity is within its crop
    maxi = _numeric(fly_export / "Nuclei.csv", oh, orows, "Intensity_MaxIntensity_DNA")
    assert np.all(ts.crops[:, 0].reshape(n, -1).max(1) >= maxi - 1e-6)
    # the cache returns the same set without re-reading images
    again = build_training_set(fly_export, "Nuclei", ["Nuclei", "Cells", "Cytoplasm"], CHANNELS, 48,
                               val_images=[1], cache=tmp_path / "c.npz")
    assert np.array_equal(again.crops, ts.crops) and again.feature_names == ts.feature_names
    # with the exported label image: each crop's own nucleus mask, and optionally zero outside it
    masked = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 48, val_images=[1],
                                mask_image="NucleiLabels", zero_outside_mask=True)
    assert masked.masks.shape == (n, 48, 48) and masked.masks[:, 24, 24].mean() > 0.95
    areas = _numeric(fly_export / "Nuclei.csv", oh, orows, "AreaShape_Area")
    assert np.allclose(masked.masks.reshape(n, -1).sum(1)[:20], areas[:20])
    inside = masked.masks[:, None].repeat(3, 1)
    assert np.all(masked.crops[~inside] == 0)
    assert np.array_equal(masked.crops[inside], build_training_set(
        fly_export, "Nuclei", ["Nuclei"], CHANNELS, 48, val_images=[1]).crops[inside])


def test_trained_model_loss_falls_and_inference_is_batch_independent(tiny_model):
    history = json.loads((Path(f"{tiny_model}.run") / "history.json").read_text())
    assert history[-1]["val_l1"] < history[0]["val_l1"]
    synth = load_synthesizer_uncached(tiny_model, "cpu")
    z = np.random.default_rng(0).standard_normal((7, synth.spec.n_features)).astype(np.float32)
    a = synth.generate(z, batch_size=7)
    b = np.concatenate([synth.generate(z[i:i + 1], batch_size=1) for i in range(7)])
    c = synth.generate(z, batch_size=3)
    assert np.allclose(a, b, atol=1e-5) and np.allclose(a, c, atol=1e-5)
    assert np.array_equal(synth.generate(z), synth.generate(z))


@pytest.mark.parametrize("arch", ["cp2image-paper"])
def test_paper_architecture_trains_with_its_losses(fly_export, tmp_path, arch):
    out = tmp_path / "paper.safetensors"
    assert train_main(["--export-dir", str(fly_export), *ARGS, "--arch", arch, "--crop-size", "48",
                       "--steps", "6", "--batch-size", "8", "--adv-start", "2", "--val-every", "3",
                       "--out", str(out)]) == 0
    spec, _ = load_model(out)
    assert spec.arch == arch and spec.training["loss"] == "paper"


def test_resume_gives_the_same_result_as_an_uninterrupted_run(fly_export, tmp_path):
    common = ["--export-dir", str(fly_export), *ARGS, "--crop-size", "32", "--batch-size", "8",
              "--val-every", "4", "--adv-start", "2"]
    straight = tmp_path / "a.safetensors"
    assert train_main([*common, "--steps", "8", "--out", str(straight)]) == 0
    part = tmp_path / "b.safetensors"
    assert train_main([*common, "--steps", "4", "--out", str(part)]) == 0
    assert train_main([*common, "--steps", "8", "--out", str(part), "--resume"]) == 0
    _, wa = load_model(straight)
    _, wb = load_model(part)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_torchrun_two_cpu_processes(fly_export, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp.safetensors"
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port=29517", "-m", "cp2image_core.train",
           "--export-dir", str(fly_export), *ARGS, "--crop-size", "32", "--steps", "4", "--batch-size", "4",
           "--val-every", "2", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec, _ = load_model(out)
    assert spec.training["batch_size"] == 8  # 2 processes x 4


def test_bad_inputs_name_the_file_and_column(fly_export, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(fly_export, d)
    with pytest.raises(DataError, match=r"channel 'GFP' is not an image of this export.*DNA"):
        build_training_set(d, "Nuclei", ["Nuclei"], ["GFP"], 32, val_images=[1])
    h, rows = _read_csv(d / "Nuclei.csv")
    j = h.index("Location_Center_X")
    lines = [",".join(c for i, c in enumerate(r) if i != j) for r in [h, *rows]]
    (d / "Nuclei.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"Nuclei.csv has no column 'Location_Center_X'"):
        build_training_set(d, "Nuclei", ["Nuclei"], CHANNELS, 32, val_images=[1])
    shutil.copy(fly_export / "Nuclei.csv", d / "Nuclei.csv")
    empty = tmp_path / "img"
    empty.mkdir()
    with pytest.raises(DataError, match=r"Image file .*01_POS002_D.TIF not found.*--image-root"):
        build_training_set(d, "Nuclei", ["Nuclei"], CHANNELS, 32, val_images=[1], image_root=empty)
    (empty / "01_POS002_D.TIF").write_bytes(b"not a tiff")
    with pytest.raises(DataError, match=r"01_POS002_D.TIF could not be read"):
        build_training_set(d, "Nuclei", ["Nuclei"], CHANNELS, 32, val_images=[1], image_root=empty)
    (d / "Image.csv").unlink()
    with pytest.raises(DataError, match=r"Image.csv not found"):
        build_training_set(d, "Nuclei", ["Nuclei"], CHANNELS, 32, val_images=[1])


def test_cli_help_and_error_exit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cp2image_core.train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--export-dir" in proc.stdout and "--resume" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "cp2image_core.train", "--export-dir", str(tmp_path),
                           "--channels", "DNA", "--out", str(tmp_path / "m.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Image.csv not found" in proc.stderr


def test_texture_and_intensity_losses_measure_what_cellprofiler_measures():
    """The loss statistics equal their definitions on masked pixel pairs (CellProfiler's scale-3 offsets)."""
    from cp2image_core.losses import masked_quantiles, texture_loss, texture_stats

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 24, 24, generator=g)
    mask = torch.zeros(2, 1, 24, 24)
    mask[:, :, 4:20, 3:18] = 1
    a = x[0, 0].numpy()
    m = mask[0, 0].numpy() > 0
    for d, (dy, dx) in enumerate(((0, 3), (3, 3), (3, 0), (3, -3))):
        pairs = np.array([(a[i, j], a[i + dy, j + dx]) for i in range(24 - dy) for j in range(24)
                          if 0 <= j + dx < 24 and m[i, j] and m[i + dy, j + dx]])
        p, q = pairs[:, 0], pairs[:, 1]
        want = [(p.mean() + q.mean()) / 2, (p.var() + q.var()) / 2, ((p - q) ** 2).mean(),
                np.corrcoef(p, q)[0, 1], (p + q).var()]
        assert np.allclose(texture_stats(x, mask)[0, 0, d].numpy(), want, rtol=1e-3, atol=1e-6), d
    inside = np.sort(a[m])
    got = masked_quantiles(x, mask, torch.tensor([0.0, 0.5, 1.0]))[0, 0].numpy()
    assert np.allclose(got, [inside[0], inside[round(0.5 * (len(inside) - 1))], inside[-1]])
    assert texture_loss(x, x, mask) == 0
    assert texture_loss(0.5 + 0.1 * x, x, mask) > 0.5  # lower contrast is penalised
    # per-channel weights scale each channel's share: all 1 is the plain mean, (1, 0, 0) keeps channel 0's third
    x3 = torch.rand(2, 3, 24, 24, generator=g)
    fake3 = 0.5 + 0.1 * x3 * torch.tensor([1.0, 2.0, 4.0])[:, None, None]
    plain = texture_loss(fake3, x3, mask)
    assert torch.isclose(texture_loss(fake3, x3, mask, channel_weights=torch.ones(3)), plain)
    first = texture_loss(fake3, x3, mask, channel_weights=torch.tensor([1.0, 0.0, 0.0]))
    assert torch.isclose(first, texture_loss(fake3[:, :1], x3[:, :1], mask) / 3)
    assert texture_loss(fake3, x3, mask, channel_weights=torch.tensor([3.0, 0.0, 0.0])) > plain  # the worst one


def test_outline_loss_thresholds_as_the_evaluation_segments(fly_export):
    """Otsu thresholds equal skimage's on real blurred crops; the outline loss is low for a crop whose bright
    region is the object's mask and rises when a touching neighbour is merged in or the object is dimmed."""
    from skimage.filters import gaussian, threshold_otsu

    from cp2image_core.losses import _gaussian_blur, otsu_threshold, outline_loss

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 48, val_images=[1], seed=0,
                            mask_image="NucleiLabels")
    crops = torch.from_numpy(ts.crops[:40])
    blurred = _gaussian_blur(crops[:, :1])[:, 0]
    want = np.array([threshold_otsu(gaussian(c[0], sigma=1.0)) for c in ts.crops[:40]])
    width = (blurred.flatten(1).max(1).values - blurred.flatten(1).min(1).values).numpy() / 256
    assert np.all(np.abs(otsu_threshold(blurred).numpy() - want) <= 1e-3 * width)
    mask = torch.from_numpy(ts.masks[:40]).float()[:, None]
    ideal = 0.05 + 0.5 * mask.expand(-1, 3, -1, -1)  # bright exactly on the object
    merged = ideal.clone()
    merged[:, :, :, :24] = torch.maximum(merged[:, :, :, :24], torch.tensor(0.4))  # a bright neighbour touching
    dim = 0.05 + 0.5 * (1 - mask).expand(-1, 3, -1, -1)  # the object dark, the rest bright
    base = outline_loss(ideal, mask)
    assert base < 0.1 < outline_loss(merged, mask) < outline_loss(dim, mask)
    assert 0.1 < outline_loss(crops, mask) < outline_loss(dim, mask)  # real crops: between the two
    # --outline-threshold field: the threshold IdentifyPrimaryObjects used on each cell's own field
    from cp2image_core.train import field_thresholds

    t = field_thresholds(fly_export, "Nuclei", ts.image_number[:40])
    ih, irows = _read_csv(fly_export / "Image.csv")
    own = dict(zip(_numeric(fly_export / "Image.csv", ih, irows, "ImageNumber").astype(int),
                   _numeric(fly_export / "Image.csv", ih, irows, "Threshold_FinalThreshold_Nuclei")))
    assert torch.allclose(t, torch.tensor([own[int(i)] for i in ts.image_number[:40]], dtype=torch.float32))
    # the real crops' own pixels sit on the right side of their field's threshold far more than of a per-crop Otsu
    assert outline_loss(crops, mask, threshold=t) < outline_loss(crops, mask)
    level = t.view(-1, 1, 1, 1) * torch.ones_like(crops)
    above = level * (0.5 + 1.5 * mask)  # the object at twice its field's threshold, the rest at half
    faint = level * (0.25 + 0.25 * mask)  # the object under it
    assert outline_loss(faint, mask, threshold=t) > 1.0 > outline_loss(above, mask, threshold=t)
    with pytest.raises(CP2ImageError, match="Threshold_FinalThreshold_Cytoplasm"):
        field_thresholds(fly_export, "Cytoplasm", ts.image_number[:3])


def test_field_thresholds_name_the_image_set_without_one(fly_export, tmp_path):
    """An Image.csv whose threshold is blank for an image set (or lacks the image set) is named, not read as NaN."""
    import csv

    from cp2image_core.train import field_thresholds

    with open(fly_export / "Image.csv", newline="") as f:
        rows = list(csv.reader(f))
    column = rows[0].index("Threshold_FinalThreshold_Nuclei")
    rows[2][column] = ""  # image set 2
    with open(tmp_path / "Image.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert torch.isfinite(field_thresholds(tmp_path, "Nuclei", np.array([1, 1]))).all()
    with pytest.raises(CP2ImageError, match=r"image set\(s\) \[2\]"):
        field_thresholds(tmp_path, "Nuclei", np.array([1, 2, 2]))
    with pytest.raises(CP2ImageError, match=r"\[7\]"):
        field_thresholds(fly_export, "Nuclei", np.array([1, 7]))


def test_edge_loss_reads_the_pixels_cellprofiler_calls_the_edge(fly_export):
    """The edge pixels are centrosome's outline of each real nucleus (what MeasureObjectIntensity's *Edge features
    read); the edge loss is 0 for the real crop and rises when its outline is blurred into a ramp."""
    from centrosome.outline import outline
    from skimage.filters import gaussian

    from cp2image_core.losses import edge_intensity_loss, object_edge

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 48, val_images=[1], seed=0,
                            mask_image="NucleiLabels")
    mask = torch.from_numpy(ts.masks[:40]).float()[:, None]
    ours = object_edge(mask)[:, 0].numpy() > 0
    assert np.array_equal(ours, np.stack([outline(m.astype(int)) > 0 for m in ts.masks[:40]])) and ours.any()
    real = torch.from_numpy(ts.crops[:40])
    blurred = torch.from_numpy(np.stack([np.stack([gaussian(ch, sigma=2.0) for ch in c]) for c in ts.crops[:40]]))
    assert edge_intensity_loss(real, real, mask) == 0
    assert edge_intensity_loss(blurred, real, mask) > 0.05


def test_pattern_loss_sees_a_pattern_drawn_at_the_same_place_in_every_cell(fly_export):
    """On real crops the pattern loss is 0 against themselves; the same faint grid added to every crop raises it
    far more than that grid at a random place in each crop (what real cells' detail looks like to a batch mean),
    although both add the same detail to each crop. The level loss is the relative error of the mean inside the
    real mask; the fine-scale loss sees blur and the grid."""
    from cp2image_core.losses import fine_detail, level_loss, pattern_loss

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 48, val_images=[1], seed=0,
                            mask_image="NucleiLabels")
    real = torch.from_numpy(ts.crops[:64])
    assert pattern_loss(real, real) == 0
    amp = 0.5 * fine_detail(real).std()
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    grid = amp * torch.sign(torch.cos(np.pi * yy) * torch.cos(np.pi * xx))  # the 2-pixel lattice
    g = torch.Generator().manual_seed(0)
    shifts = torch.randint(0, 2, (64, 2), generator=g)
    moved = torch.stack([torch.roll(grid, (int(dy), int(dx)), (0, 1)) for dy, dx in shifts])[:, None]
    same, scattered = pattern_loss(real + grid, real), pattern_loss(real + moved, real)
    assert abs(fine_detail(real + grid).std() - fine_detail(real + moved).std()) < 1e-3
    assert same > 0.3 and scattered < same / 4, (same, scattered)
    # the level loss is blind to what lies outside the mask
    mask = torch.from_numpy(ts.masks[:64]).float()[:, None]
    assert level_loss(real, real, mask) == 0
    assert torch.isclose(level_loss(1.2 * real, real, mask), torch.tensor(0.2), atol=1e-4)
    assert level_loss(real + 0.3 * (1 - mask), real, mask) == 0
    # the fine-scale loss: 0 against the crops themselves; a 1-pixel blur (too smooth, as a pixel-loss decoder draws)
    # and the faint 2-pixel grid (a sub-pixel layer's checkerboard) both raise it
    from scipy.ndimage import gaussian_filter

    from cp2image_core.losses import fine_scale_loss

    assert fine_scale_loss(real, real) == 0
    smooth = torch.from_numpy(gaussian_filter(ts.crops[:64], (0, 0, 1, 1)))
    assert fine_scale_loss(smooth, real) > 0.3 and fine_scale_loss(real + grid, real) > 0.1


def test_outline_loss_ring_on_the_background_spares_a_touching_neighbour(fly_export):
    """``real=``: the dark ring only where the real crop is background, so a neighbour that touches the real object
    is not pushed dark (the synthesized nuclei's dark band), while one drawn where the real crop is dark still is."""
    from cp2image_core.losses import outline_loss
    from cp2image_core.train import field_thresholds

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 48, val_images=[1], seed=0,
                            mask_image="NucleiLabels")
    crops = torch.from_numpy(ts.crops[:40])
    mask = torch.from_numpy(ts.masks[:40]).float()[:, None]
    t = field_thresholds(fly_export, "Nuclei", ts.image_number[:40])
    # the real crops' own touching neighbours and bright rims no longer count against them
    assert outline_loss(crops, mask, threshold=t, real=crops) < 0.8 * outline_loss(crops, mask, threshold=t)
    level = t.view(-1, 1, 1, 1) * torch.ones_like(crops)
    ideal = level * (0.5 + 1.5 * mask)  # the object above its field's threshold, dark around it
    merged = ideal.clone()
    merged[:, :, :, :24] = torch.maximum(merged[:, :, :, :24], 1.5 * level[:, :, :, :24])  # a bright neighbour
    for threshold in (t, None):  # the field's threshold, or each crop's Otsu threshold
        alone = outline_loss(merged, mask, threshold=threshold, real=ideal)  # the real crop is dark there
        assert alone > 2 * outline_loss(ideal, mask, threshold=threshold, real=ideal)
        assert outline_loss(merged, mask, threshold=threshold, real=merged) < 0.5 * alone  # the real one is there


def test_lattice_loss_sees_dots_locked_to_the_pixel_lattice_inside_the_object(fly_export):
    """0 for real crops against themselves and against the same crops moved by a pixel (real detail falls anywhere,
    so its mean per lattice phase is noise); dots every 4 pixels inside the nucleus — what a x4 sub-pixel layer
    draws — raise it, and the 4-pixel loss sees a 2-pixel lattice too; the same dots outside the object are not its
    business."""
    from cp2image_core.losses import fine_detail, lattice_energy, lattice_loss, pattern_loss

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 48, val_images=[1], seed=0,
                            mask_image="NucleiLabels")
    real = torch.from_numpy(ts.crops[:64])
    mask = torch.from_numpy(ts.masks[:64]).float()[:, None]
    assert lattice_loss(real, real, mask) == 0
    assert lattice_loss(torch.roll(real, (1, 1), (2, 3)), real, mask) < 0.1
    sd = fine_detail(real).std()  # 0.0096: a tenth of the nuclei's mean intensity
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    # one pixel in each 4 x 4 block brighter by a fifth of the nucleus's intensity (the sixth update's: about a
    # quarter), and a faint 2-pixel checkerboard
    dots = 2 * sd * ((yy % 4 == 0) & (xx % 4 == 0)).float()
    checker = 0.3 * sd * torch.sign(torch.cos(np.pi * yy) * torch.cos(np.pi * xx))
    assert lattice_loss(real + dots * mask, real, mask) > 1.0
    assert lattice_loss(real + checker * mask, real, mask) > 1.0
    assert lattice_loss(real + checker * mask, real, mask, period=2) > 1.0
    only_outside = real + dots * (1 - mask)
    assert lattice_loss(only_outside, real, mask) < 0.2
    # the energy is per crop and channel; a crop with the dots in one channel has it there only
    e = lattice_energy(real[:1] + dots * mask[:1] * torch.tensor([1.0, 0, 0])[:, None, None], mask[:1])
    e0 = lattice_energy(real[:1], mask[:1])
    assert e.shape == (1, 3) and e[0, 0] > 5 * e0[0, 0] and torch.allclose(e[0, 1:], e0[0, 1:])
    # the training loop hands both losses the crops' fine detail computed once: the same values
    fake = real + dots * mask
    detail = fine_detail(fake), fine_detail(real)
    assert lattice_loss(fake, real, mask, detail=detail) == lattice_loss(fake, real, mask)
    assert pattern_loss(fake, real, detail=detail) == pattern_loss(fake, real) > 0


def test_lattice_share_loss_sees_dots_beside_the_object_in_a_smooth_crop(fly_export):
    """The share of the fine detail on the pixel lattice, per 16-pixel tile over the whole crop: 0 for real crops
    against themselves and cut a pixel further on; dots every 4 pixels beside the nucleus of a smooth crop (what the
    seventh update still drew in FITC and Rhodamine) raise it, though ``lattice_loss`` (inside the nucleus, absolute
    power) does not see them."""
    from cp2image_core.losses import (
        _gaussian_blur,
        fine_detail,
        lattice_loss,
        lattice_share,
        lattice_share_loss,
        lattice_share_of,
    )

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 48, val_images=[1], seed=0,
                            mask_image="NucleiLabels")
    real = torch.from_numpy(ts.crops[:64])
    mask = torch.from_numpy(ts.masks[:64]).float()[:, None]
    assert lattice_share_loss(real, real) == 0
    assert lattice_share_loss(real[..., 1:, 1:], real) < 0.1  # the same cells a pixel off the lattice
    energy, power = lattice_share(fine_detail(real))
    assert energy.shape == power.shape == (64, 3, 3, 3)  # 3 x 3 tiles of 16 pixels
    assert lattice_share(fine_detail(real), period=24)[0].shape == (64, 3, 2, 2)  # a period over 16: tiles of one
    share = lattice_share_of(fine_detail(real))
    assert torch.all((share > 0.01) & (share < 0.1)), share  # a camera's detail: near 1 / 16 pixels per phase
    smooth = _gaussian_blur(real.reshape(-1, 1, 48, 48), 3.0).reshape(real.shape)
    sd = fine_detail(real).std()
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    dots = 2 * sd * ((yy % 4 == 0) & (xx % 4 == 0)).float()  # the dots of lattice_loss's test
    beside = torch.nn.functional.max_pool2d(mask, 13, stride=1, padding=6) - mask  # 6 pixels around the nucleus
    fake = smooth + dots * beside
    assert lattice_share_loss(fake, real) > 1.0
    assert lattice_loss(fake, real, mask) == 0  # inside the nucleus, against the real crops' power: nothing
    assert lattice_share_loss(smooth, real) < 0.1  # the smooth crop alone
    assert lattice_share_loss(fake, real, detail=(fine_detail(fake), fine_detail(real))) == lattice_share_loss(fake,
                                                                                                             real)


def test_decoder_trains_with_texture_losses_and_arch_params(fly_export, tmp_path, capsys):
    out = tmp_path / "tex.safetensors"
    common = ["--export-dir", str(fly_export), *ARGS, "--crop-size", "32", "--steps", "4", "--batch-size", "8",
              "--val-every", "2", "--loss", "l1", "--texture-loss", "0.1", "--intensity-loss", "0.1"]
    assert train_main([*common, "--out", str(out)]) == 2
    assert "name the exported label image with --mask-image" in capsys.readouterr().err
    assert train_main([*common, "--mask-image", "NucleiLabels", "--arch-param", "width=32", "hidden=64",
                       "--out", str(out)]) == 0
    spec, _ = load_model(out)
    assert spec.arch_params == {"width": 32, "hidden": 64}
    history = json.loads((Path(f"{out}.run") / "history.json").read_text())
    assert {"train_tex", "train_int"} <= set(history[-1])
    with pytest.raises(SystemExit):
        train_main([*common, "--arch-param", "width", "--out", str(out)])
    # fine-tuning from a model file, with the shape loss; a model of another architecture is refused
    tuned = tmp_path / "tuned.safetensors"
    args = [*common, "--mask-image", "NucleiLabels", "--shape-loss", "0.1", "--init-from", str(out), "--steps", "2"]
    assert train_main([*args, "--arch-param", "width=32", "hidden=64", "--out", str(tuned)]) == 0
    shape_all = json.loads((Path(f"{tuned}.run") / "history.json").read_text())[-1]["train_shape"]
    ring = tmp_path / "ring.safetensors"  # the same run with the ring only where the real crops are background
    assert train_main([*args, "--arch-param", "width=32", "hidden=64", "--outline-ring", "background",
                       "--out", str(ring)]) == 0
    assert json.loads((Path(f"{ring}.run") / "history.json").read_text())[-1]["train_shape"] != shape_all
    capsys.readouterr()
    assert train_main([*args, "--out", str(tmp_path / "other.safetensors")]) == 2
    assert "differ from this training run's" in capsys.readouterr().err
    # intensity anchoring and calibration (gradients through both), the edge and pattern losses; the module's
    # loader binds the anchors and the calibration's features from the file's spec
    anchored = tmp_path / "anchored.safetensors"
    assert train_main([*common, "--mask-image", "NucleiLabels", "--edge-loss", "0.1", "--pattern-loss", "0.5",
                       "--level-loss", "0.2", "--fine-scale-loss", "0.05", "--lattice-loss", "0.1",
                       "--lattice-share-loss", "0.1",
                       "--arch-param", "width=32", "hidden=64", "anchor=1", "calibrate=1",
                       "--steps", "2",
                       "--out", str(anchored)]) == 0
    last = json.loads((Path(f"{anchored}.run") / "history.json").read_text())[-1]
    assert {"train_edge", "train_pattern", "train_level", "train_fine", "train_lattice", "train_share"} <= set(last)
    capsys.readouterr()  # the lattice loss: a period from 2 pixels to the crop, and the object's mask
    assert train_main([*common, "--mask-image", "NucleiLabels", "--lattice-loss", "0.1", "--lattice-period", "1",
                       "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "--lattice-period 1: a lattice of 2 to --crop-size (32) pixels" in capsys.readouterr().err
    assert train_main([*common, "--lattice-share-loss", "0.1", "--lattice-period", "40",
                       "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "--lattice-period 40: a lattice of 2 to --crop-size (32) pixels" in capsys.readouterr().err
    assert train_main([*common[:-4], "--lattice-loss", "0.1", "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "--lattice-loss need the object's mask" in capsys.readouterr().err
    capsys.readouterr()  # per-channel texture weights: one per channel, or a clear error before any work
    assert train_main([*common, "--mask-image", "NucleiLabels", "--texture-channel-weights", "1", "2",
                       "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "one weight >= 0 per channel of --channels" in capsys.readouterr().err
    assert train_main([*common, "--mask-image", "NucleiLabels", "--texture-channel-weights", "1", "2", "4",
                       "--steps", "2", "--out", str(tmp_path / "w.safetensors")]) == 0
    synth = load_synthesizer_uncached(anchored, "cpu")
    spec = synth.spec
    z = np.zeros((3, spec.n_features), np.float32)
    images = synth.generate(z)
    assert images.shape == (3, len(CHANNELS), 32, 32) and images.min() >= 0 and images.max() <= 1


def test_texture_loss_at_small_offsets_and_surroundings_only_gradient(fly_export):
    """At offset 1 the texture loss penalizes the 2-pixel dot pattern more than at MeasureTexture's scale 3;
    the critic's gradient can be kept to the surroundings (outside the object's mask, grown)."""
    from cp2image_core.losses import gradient_outside, surroundings, texture_loss

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 48, val_images=[1], seed=0,
                            mask_image="NucleiLabels")
    real = torch.from_numpy(ts.crops[:32])
    dots = torch.zeros(48, 48)
    dots[::2, ::2] = 1
    mask = torch.from_numpy(ts.masks[:32]).float()[:, None]
    dotted = real + 0.05 * (dots - dots.mean())
    at = {scale: texture_loss(dotted, real, mask, scale) for scale in (1, 2, 3)}
    assert at[1] > 1.1 * at[3] > 0.5 and texture_loss(real, real, mask, 1) == 0
    outside = surroundings(mask, 3)
    grown = torch.nn.functional.max_pool2d(mask, 7, stride=1, padding=3)
    assert torch.equal(outside, 1 - grown) and outside.sum() > 0 and (outside * mask).sum() == 0
    fake = real.clone().requires_grad_()
    (gradient_outside(fake, outside) ** 2).sum().backward()
    assert torch.equal(fake.grad == 0, (outside == 0).expand_as(fake) | (real == 0))


def test_adversarial_surroundings_and_small_texture_offsets_train(fly_export, tmp_path, capsys):
    out = tmp_path / "surround.safetensors"
    common = ["--export-dir", str(fly_export), *ARGS, "--crop-size", "32", "--steps", "3", "--batch-size", "8",
              "--val-every", "3", "--loss", "adversarial", "--adv-start", "0", "--adv-surround", "3",
              "--arch-param", "width=32", "hidden=64", "replicate=1", "--out", str(out)]
    assert train_main(common) == 2
    assert "--adv-surround needs the object's mask" in capsys.readouterr().err
    assert train_main([*common, "--mask-image", "NucleiLabels", "--surround-weight", "0.2", "--texture-loss", "0.1",
                       "--texture-scale", "1", "2", "3"]) == 0
    last = json.loads((Path(f"{out}.run") / "history.json").read_text())[-1]
    assert {"train_adv", "train_tex", "train_d"} <= set(last) and np.isfinite(last["train_tex"])


def test_cell_losses_read_the_cells_label_image(fly_export, tmp_path, capsys):
    """--cell-mask-image CellsLabels (the features pipeline saves it): each crop's own cell (the label with its
    nucleus's number) holds its nucleus and has the area CellProfiler measured; the cell's outline loss at the
    threshold IdentifySecondaryObjects used is low on the real crops and high on a cell drawn elsewhere, and without
    its dark ring (--cell-outline-ring none) a crop bright all over passes; training with --cell-loss and
    --cell-shape-loss logs both, and a missing label image or channel is named."""
    from cp2image_core.losses import outline_loss
    from cp2image_core.train import field_thresholds

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei", "Cells"], CHANNELS, 64, val_images=[1],
                            mask_image="NucleiLabels", cell_mask_image="CellsLabels")
    own = ts.cell_masks == 1
    assert ts.cell_masks.dtype == np.uint8 and set(np.unique(ts.cell_masks)) == {0, 1, 2}
    assert not (ts.masks & ~own).any()  # every nucleus pixel lies in its own cell
    area = ts.features[:, ts.feature_names.index(("Cells", "AreaShape_Area"))]
    inside = ~(own[:, [0, -1], :].any((1, 2)) | own[:, :, [0, -1]].any((1, 2)))  # cells not cut by the crop's edge
    assert inside.mean() > 0.7 and np.array_equal(own.sum((1, 2))[inside], area[inside])
    rows = np.flatnonzero(inside)[:64]
    crops = torch.from_numpy(ts.crops[rows])
    cell = torch.from_numpy(own[rows]).float()[:, None]
    background = torch.from_numpy(ts.cell_masks[rows] == 0).float()[:, None]
    t = field_thresholds(fly_export, "Cells", ts.image_number[rows])
    real = outline_loss(crops, cell, channel=1, sigma=0.0, threshold=t, outside=background)
    elsewhere = outline_loss(crops, cell.roll(20, -1), channel=1, sigma=0.0, threshold=t,
                             outside=background.roll(20, -1))
    assert real < 0.5 * elsewhere, (real, elsewhere)
    # --cell-outline-ring none: no dark ring, so a crop bright all over passes, but a cell drawn elsewhere does not
    bright, no_ring = crops.clone(), torch.zeros_like(cell)
    bright[:, 1] += 1.0

    def inside_only(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return outline_loss(x, mask, channel=1, sigma=0.0, threshold=t, outside=no_ring)

    lit = inside_only(bright, cell)
    assert lit < 0.1 * outline_loss(bright, cell, channel=1, sigma=0.0, threshold=t), lit
    assert inside_only(crops, cell.roll(20, -1)) > 2 * inside_only(crops, cell), inside_only(crops, cell)
    out = tmp_path / "cells.safetensors"
    common = ["--export-dir", str(fly_export), *ARGS, "--crop-size", "32", "--steps", "2", "--batch-size", "8",
              "--val-every", "2", "--loss", "l1", "--mask-image", "NucleiLabels", "--cell-loss", "0.1",
              "--out", str(out)]
    assert train_main(common) == 2
    assert "--cell-mask-image" in capsys.readouterr().err
    assert train_main([*common, "--cell-mask-image", "CellsLabels", "--cell-shape-loss", "0.1"]) == 2
    assert "--cell-outline-channel" in capsys.readouterr().err
    assert train_main([*common, "--cell-mask-image", "CellsLabels", "--cell-shape-loss", "0.1",
                       "--cell-outline-channel", "FITC"]) == 0
    last = json.loads((Path(f"{out}.run") / "history.json").read_text())[-1]
    assert np.isfinite(last["train_cell"]) and np.isfinite(last["train_cell_shape"])
    assert train_main([*common, "--cell-mask-image", "CellsLabels", "--cell-shape-loss", "0.1",
                       "--cell-outline-channel", "FITC", "--cell-outline-ring", "none",
                       "--out", str(tmp_path / "no_ring.safetensors")]) == 0
    last = json.loads((tmp_path / "no_ring.safetensors.run" / "history.json").read_text())[-1]
    assert np.isfinite(last["train_cell_shape"])
