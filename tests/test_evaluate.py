"""Evaluation metrics on inputs with known answers, and the evaluate command on real ExampleFly cells."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import ROOT

from cp2image_core.errors import CP2ImageError
from cp2image_core.evaluate.__main__ import main as evaluate_main
from cp2image_core.evaluate.__main__ import real_vs_real
from cp2image_core.evaluate.metrics import (
    bootstrap_medians,
    c2st,
    c2st_fine,
    family_medians,
    pearson,
    pixel_metrics,
    r2,
    spearman_medians,
    summarize_r,
)


def test_metrics_known_answers():
    rng = np.random.default_rng(0)
    x = rng.random(50)
    assert abs(pearson(x, x) - 1) < 1e-12 and abs(r2(x, x) - 1) < 1e-12
    assert abs(pearson(x, -x) + 1) < 1e-12
    assert np.isnan(pearson(x, np.ones(50)))
    imgs = rng.random((6, 3, 32, 32)).astype(np.float32)
    p = pixel_metrics(imgs, imgs)
    assert p["mse"] == 0 and abs(p["ssim"] - 1) < 1e-6
    assert pixel_metrics(imgs, imgs[::-1].copy())["ssim"] < 0.5
    s = summarize_r({"AreaShape_Area": 0.9, "Intensity_MeanIntensity_DNA": 0.6, "Texture_X": 0.1})
    assert s["all"]["median_r"] == 0.6 and s["AreaShape"]["frac_ge_0.8"] == 1.0
    assert s["worst"][0] == ("Texture_X", 0.1)


def test_family_medians_bootstrap_and_spearman_known_answers():
    rng = np.random.default_rng(3)
    names = ["AreaShape_Area", "AreaShape_Perimeter", "Intensity_MeanIntensity_DNA", "Texture_Contrast_DNA_3_00_256"]
    x = rng.standard_normal((200, 4))
    y = x + rng.standard_normal((200, 4)) * np.array([0.1, 0.5, 1.0, 2.0])
    x[:7, 1] = np.nan  # pairs missing on either side are left out, as pearson() does
    y[3:9, 2] = np.inf
    one = family_medians(x, y, names, np.ones((1, 200)))[0]
    r = [pearson(x[:, j], y[:, j]) for j in range(4)]
    assert np.allclose(one, [np.median(r[:2]), r[2], r[3], np.median(r)])
    ci = bootstrap_medians(x, y, names)
    assert all(lo <= m <= hi for (lo, hi), m in zip(ci.values(), one))
    assert ci["Texture"][1] - ci["Texture"][0] > 0.05  # r ≈ 0.45 from 200 cells is not known to ±0.02
    big = np.repeat(x, 4, 0), np.repeat(y, 4, 0)
    assert (np.diff(bootstrap_medians(*big, names)["Texture"]) < np.diff(ci["Texture"]))[0]  # more cells: narrower
    same = bootstrap_medians(x[:, :1], 3 * x[:, :1] + 1, names[:1])["AreaShape"]
    assert np.allclose(same, [1.0, 1.0])
    # one segmentation that ran into the surroundings: Pearson falls apart, the rank correlation does not
    area = rng.uniform(200, 500, 100)
    remeasured = area * 0.8 + rng.normal(0, 5, 100)
    remeasured[0] = 4000
    assert pearson(area, remeasured) < 0.5 < 0.95 < spearman_medians(area[:, None], remeasured[:, None],
                                                                     names[:1])["AreaShape"]


def test_c2st_identical_sets_near_chance_and_different_sets_separated():
    rng = np.random.default_rng(1)
    a = rng.random((200, 1, 16, 16)).astype(np.float32) * 0.2
    b = rng.random((200, 1, 16, 16)).astype(np.float32) * 0.2
    assert 0.35 <= c2st(a, b) <= 0.65
    assert c2st(a, b + 0.3) > 0.9



def test_real_vs_real_splits_at_random_and_measures_each_classifier():
    """The real-crop row's C2ST: random halves (a split in order would separate these two groups), each measured."""
    rng = np.random.default_rng(2)
    crops = np.concatenate([np.zeros((100, 1, 16, 16)), np.full((100, 1, 16, 16), 0.5)]).astype(np.float32)
    crops += rng.random(crops.shape).astype(np.float32) * 0.2
    accs = real_vs_real(crops, range(5))
    assert len(accs) == 5 and all(0.3 <= a <= 0.7 for a in accs)
    assert len(set(accs)) > 1  # five classifiers on five splits, not one figure repeated


def test_fine_scale_c2st_tells_real_crops_from_smooth_ones_but_not_from_each_other():
    """C2ST fine on real ExampleFly pixels (three channels of field 01_POS076 cut in 64-pixel tiles): two random
    halves of the tiles are at chance; the same tiles blurred by a 1-pixel Gaussian — what a generator trained on
    pixel losses draws — are told apart, and so are tiles with a 2-pixel checkerboard added (a sub-pixel
    layer's pattern), at 2% of the range."""
    from conftest import examplefly_dir
    from scipy.ndimage import gaussian_filter

    from cp2image_core.dataset import load_image

    field = np.stack([load_image(examplefly_dir() / f"01_POS076_{ch}.TIF") for ch in "DFR"]).astype(np.float32)
    tiles = np.stack([field[:, y:y + 64, x:x + 64] for y in range(0, 960, 64) for x in range(0, 960, 64)])
    assert tiles.shape == (225, 3, 64, 64) and 0 < tiles.max() <= 1
    chance = real_vs_real(tiles, range(5), test=c2st_fine)
    assert 0.35 <= np.mean(chance) <= 0.65 and len(set(chance)) > 1, chance
    smooth = gaussian_filter(tiles, (0, 0, 1, 1))
    checker = tiles + 0.02 * ((np.indices((64, 64)).sum(0) % 2) - 0.5).astype(np.float32)
    for fake in (smooth, checker):
        assert np.mean([c2st_fine(tiles, fake, seed=k) for k in range(3)]) >= 0.9
    assert np.isnan(c2st_fine(tiles[:3], smooth[:3]))  # too few to split: no figure, rather than a made-up one


def test_cell_window_covers_the_object_and_fades_out():
    from cp2image_core.evaluate.__main__ import cell_window

    masks = np.zeros((2, 32, 32), bool)
    masks[0, 10:20, 10:20] = True
    masks[1, 0:5, 0:5] = True
    w = cell_window(masks)
    assert w.shape == (2, 1, 32, 32)
    assert w[0, 0, 10:20, 10:20].min() > 0.99 and w[0, 0, 28:, :].max() < 1e-3 and w[0, 0, 0, 0] < 1e-3
    assert 0 < w[0, 0, 21, 15] < 1  # grown by 3 pixels, then blurred
    assert w[1, 0, 0, 0] > 0.99 and w[1, 0, 20:, 20:].max() < 1e-3


def test_c2st_steps_must_train_the_classifier(capsys):
    from cp2image_core.evaluate.__main__ import get_args

    assert get_args(["--models", "m.safetensors", "--export-dir", "x", "--out", "o"]).c2st_steps == 300
    with pytest.raises(SystemExit):  # an untrained classifier's accuracy is no test: refused, with the option named
        get_args(["--models", "m.safetensors", "--export-dir", "x", "--out", "o", "--c2st-steps", "0"])
    assert "--c2st-steps 0" in capsys.readouterr().err


@pytest.mark.timeout(1200)  # 218-332 s here (2026-12-07), plus the shared export's setup
def test_evaluate_on_real_cells(fly_export, tiny_model, tmp_path):
    out = tmp_path / "report"
    rc = evaluate_main(["--models", str(tiny_model), "--export-dir", str(fly_export), "--max-cells", "80",
                        "--c2st-repeats", "2", "--c2st-steps", "200", "--out", str(out),
                        "--traverse", "Nuclei.AreaShape_Area",
                        "--field-crops", "--features-pipeline", str(ROOT / "pipelines" / "ExampleFly_features.cppipe")])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    res = report["results"]
    real = res["real crops (ceiling)"]
    # real crops re-measured inside the real objects' masks give back CellProfiler's own intensities
    assert real["features"]["Intensity"]["median_r"] > 0.95
    assert real["pixels"]["mse"] == 0
    # shape re-segmented by the pipeline's own IdentifyPrimaryObjects (the default, auto, where the pipeline has
    # it) gives back the real crops' shape too (0.90 on all 283 held-out cells; the per-crop Otsu threshold: 0.62)
    assert report["shape_segmentation"] == "pipeline" and real["features"]["AreaShape"]["median_r"] > 0.75
    assert real["no_object_found"] < 8 and all(0 <= r["no_object_found"] <= 80 for r in res.values())
    # the mean image (a broken generator) keeps less than the nearest neighbour does
    def median_r(name):
        return res[name]["features"]["all"]["median_r"]

    assert median_r("mean training crop") < median_r("nearest neighbour")
    # crops cut from the composed field: the cell inside its mask is still mostly its own crop's
    (own,) = [k for k in res if k.startswith(tiny_model.stem) and " in its field " not in k]
    (cut,) = [k for k in res if k.startswith(tiny_model.stem + " in its field ")]
    assert abs(res[cut]["features"]["Intensity"]["median_r"] - res[own]["features"]["Intensity"]["median_r"]) < 0.1
    assert res[cut]["pixels"]["mse"] != res[own]["pixels"]["mse"]
    # another cell's real crop keeps nothing of this cell's features: chance level
    assert abs(median_r("random training crop")) < 0.3 < median_r("nearest neighbour")
    assert all(0 <= r["c2st_cell"] <= 1 and 0 <= r["c2st_context"] <= 1 for r in res.values())
    assert 0.3 <= real["c2st"] <= 0.7 and real["c2st_sd"] >= 0  # measured (two halves of the real cells), not set
    assert report["c2st_repeats"] == 2 and res["nearest neighbour"]["c2st_sd"] >= 0
    assert report["c2st_steps"] == 200 and "each trained\n200 steps" in (out / "report.md").read_text()
    # the finest-scale test: real halves near chance, the mean crop (smooth, the same for every cell) told apart
    assert 0.25 <= real["c2st_fine"] <= 0.75 and res["mean training crop"]["c2st_fine"] >= 0.9
    assert "C2ST fine" in (out / "report.md").read_text()
    for r in res.values():  # every median has its bootstrap interval (cells resampled) and a rank-correlation twin
        f = r["features"]
        assert all(lo <= f[k]["median_r"] <= hi for k, (lo, hi) in f["ci95"].items() if np.isfinite(lo))
        assert set(f["spearman"]) == {"AreaShape", "Intensity", "Texture", "all"}
    assert "Spearman" in (out / "report.md").read_text()
    with open(out / "feature_r.csv", newline="") as fh:  # every feature's r: the medians above are made of them
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) == {"feature", "family", *res}
    for name, r in res.items():
        for fam in ("AreaShape", "Intensity", "Texture"):
            vals = [float(row[name]) for row in rows if row["family"] == fam and row[name]]
            assert len(vals) == r["features"][fam]["n"]
            if vals:
                assert np.median(vals) == pytest.approx(r["features"][fam]["median_r"], abs=1e-4)
    # the Cells and Cytoplasm around each nucleus (--around auto), found as the features pipeline finds them: the
    # real crops give their features back, another cell's crop keeps none of them, the tiny model some
    assert report["around"] == ["Cells", "Cytoplasm"]
    for obj in report["around"]:
        assert real["around"][obj]["Intensity"]["median_r"] > 0.85, obj
        assert abs(res["random training crop"]["around"][obj]["all"]["median_r"]) < 0.3, obj
        for name, r in res.items():  # r is undefined where no cell is found (the tiny model) or all are alike
            vals = [float(row[name]) for row in rows if row["family"] == f"{obj}.Texture" and row[name]]
            assert len(vals) == r["around"][obj]["Texture"]["n"]
            assert len(vals) > 100 or name not in ("real crops (ceiling)", "nearest neighbour"), name
    assert "The objects around each cell: Cells and Cytoplasm" in (out / "report.md").read_text()
    # and measured inside their real masks (--around-mask-image auto: the exported CellsLabels): the real crops give
    # CellProfiler's own figures back (r 1.00), another cell's crop little more than the mask's size carries
    assert report["around_real_masks"] == ["Cells", "Cytoplasm"] and report["around_mask_image"] == "CellsLabels"
    for obj in report["around_real_masks"]:
        inside = {name: r["around_real_masks"][obj] for name, r in res.items()}
        assert inside["real crops (ceiling)"]["Intensity"]["median_r"] > 0.99, obj
        assert abs(inside["random training crop"]["all"]["median_r"]) < 0.3, obj
    assert "measured inside their real masks" in (out / "report.md").read_text()
    # the real crops' radii follow the exported ones crop by crop, although a crop here holds no object (0.89-0.91
    # on these 80 cells; 0.09 when the values after an empty crop were shifted onto other crops, before the fix)
    radii = [float(row["real crops (ceiling)"]) for row in rows
             if row["family"] == "AreaShape" and "Radius" in row["feature"]]
    assert len(radii) == 3 and min(radii) > 0.8, radii
    for f in ("report.md", "grid.png", "scatter.png", "r_hist.png", "traverse_Nuclei.AreaShape_Area.png",
              f"field_{tiny_model.stem}.png"):
        assert (out / f).exists(), f


# 584-720 s on this 2-core machine (2026-12-07, its speed drifting), over 900 s on one CI machine: 2.5x headroom
@pytest.mark.timeout(1800)
def test_shipped_models_keep_their_feature_preservation_and_realism(fly_export, tmp_path):
    """Regression guard: both shipped models on the held-out field 01_POS002 (image set 1), re-measured by
    CellProfiler, shape on the objects the features pipeline's own IdentifyPrimaryObjects finds (the evaluate
    command's default); here nearest neighbour draws from one training field, not two. Floors sit a little under
    the figures of the full report (default, 2026-12-07, eighth update — the sixth's x4 last step with few of its dots,
    the cell kept above the pipeline's threshold: AreaShape 0.96, Intensity 0.95, Texture 0.95, all 0.95, SSIM 0.652
    vs nearest neighbour's 0.553, C2ST on the whole crop 0.90, on the cell window 0.53, 2 crops without an object;
    the seventh update: SSIM 0.645, C2ST 0.89 / 0.50, 5 crops; the sixth update: Texture 0.96, all
    0.96, SSIM 0.639, 4 crops; the fifth update: the sixth's medians, SSIM 0.656; the fourth:
    Texture 0.91, all 0.92; the one before that: AreaShape 0.92, 29 crops without an object;
    realistic: AreaShape 0.95, Intensity 0.93, Texture 0.90, all 0.91, C2ST on the whole crop 0.82 vs the
    default's 0.90 (2026-12-07), on the cell window 0.48)."""
    from conftest import SHIPPED

    realistic = SHIPPED.with_name("cp2image-realistic.safetensors")
    out = tmp_path / "shipped"
    assert evaluate_main(["--models", str(SHIPPED), str(realistic), "--export-dir", str(fly_export),
                          "--val-images", "1", "--c2st-repeats", "3", "--match-shape", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    res = report["results"]
    assert report["shape_segmentation"] == "pipeline"
    model = res["cp2image-default [cp2image-decoder]"]
    real = res["cp2image-realistic [cp2image-decoder]"]
    # 'Match each object's stated shape' (2026-12-07, eighth update, the full report: Eccentricity r 0.52 -> 0.94,
    # Orientation 0.60 -> 0.73, AreaShape median 0.96 -> 0.97, Texture 0.95 -> 0.95; the seventh 0.55 -> 0.96 and
    # 0.61 -> 0.77)
    matched = res["cp2image-default + shape match [cp2image-decoder]"]
    with open(out / "feature_r.csv", newline="") as fh:
        r = {row["feature"]: row for row in csv.DictReader(fh)}
    for feature, before, floor in (("Eccentricity", 0.7, 0.9), ("Orientation", 0.7, 0.70)):
        row = r[f"AreaShape_{feature}"]
        assert float(row["cp2image-default [cp2image-decoder]"]) < before
        assert float(row["cp2image-default + shape match [cp2image-decoder]"]) >= floor, feature
    assert matched["features"]["AreaShape"]["median_r"] >= 0.95 and matched["features"]["Texture"]["median_r"] >= 0.94
    assert model["features"]["AreaShape"]["median_r"] >= 0.92
    assert model["features"]["Intensity"]["median_r"] >= 0.93
    assert model["features"]["Texture"]["median_r"] >= 0.94
    assert model["features"]["all"]["median_r"] >= 0.94
    assert model["no_object_found"] <= 8 and real["no_object_found"] <= 10  # real crops: 9
    assert model["pixels"]["ssim"] > res["nearest neighbour"]["pixels"]["ssim"]
    for family in ("AreaShape", "Intensity", "Texture"):
        assert model["features"][family]["median_r"] > res["nearest neighbour"]["features"][family]["median_r"]
        assert real["features"][family]["median_r"] > res["nearest neighbour"]["features"][family]["median_r"]
    assert real["features"]["AreaShape"]["median_r"] >= 0.92
    assert real["features"]["all"]["median_r"] >= 0.89
    assert real["features"]["Intensity"]["median_r"] >= 0.91
    assert real["c2st"] < model["c2st"] - 0.05  # the point of the realistic model
    # the Cells and Cytoplasm around each nucleus, found as the features pipeline finds them (--around, on by
    # default; the full report, 2026-12-07, eighth update: Cells AreaShape / Intensity / Texture 0.61 / 0.82 / 0.82,
    # Cytoplasm 0.59 / 0.72 / 0.55; the seventh 0.54 / 0.80 / 0.83 and 0.55 / 0.73 / 0.56; the sixth 0.58 / 0.83 /
    # 0.84 and 0.58 / 0.76 / 0.60; the fifth 0.48 / 0.78 / 0.84 and 0.40 / 0.79 / 0.54): the cell's intensity and
    # texture kept, its shape less so (nearest neighbour 0.74)
    assert report["around"] == ["Cells", "Cytoplasm"]
    cells, cytoplasm = model["around"]["Cells"], model["around"]["Cytoplasm"]
    assert cells["Intensity"]["median_r"] >= 0.77 and cells["Texture"]["median_r"] >= 0.80
    assert cells["AreaShape"]["median_r"] >= 0.50 and cytoplasm["AreaShape"]["median_r"] >= 0.50
    assert cytoplasm["Intensity"]["median_r"] >= 0.70 and cytoplasm["Texture"]["median_r"] >= 0.53
    # inside the real cell and cytoplasm (the exported CellsLabels; the full report, 2026-12-07, eighth update:
    # Cells Intensity / Texture 0.90 / 0.89, Cytoplasm 0.82 / 0.65; nearest neighbour 0.80 / 0.77 and 0.74 / 0.66)
    assert report["around_real_masks"] == ["Cells", "Cytoplasm"]
    cells, cytoplasm = model["around_real_masks"]["Cells"], model["around_real_masks"]["Cytoplasm"]
    assert cells["Intensity"]["median_r"] >= 0.87 and cells["Texture"]["median_r"] >= 0.85
    assert cytoplasm["Intensity"]["median_r"] >= 0.80 and cytoplasm["Texture"]["median_r"] >= 0.64
    # neither model's cells carry a pattern at the same place in every cell any more (--pattern-loss): default
    # 0.49, realistic 0.48 (before the pattern loss 0.94 and 0.78)
    assert model["c2st_cell"] < 0.65
    assert real["c2st_cell"] < 0.65
    # in its real surroundings the synthesized cell is far harder to spot than the whole synthesized crop
    # (2026-11-29 on this field: 0.47 vs 0.81): what gives a crop away is the surroundings
    assert real["c2st_context"] < real["c2st"] - 0.15


def test_shipped_models_draw_the_held_out_field_at_its_own_intensity(fly_export):
    """The held-out field 01_POS002 is imaged dimmer than the training fields (its nuclei's mean DNA intensity
    0.133 vs 0.180). Anchored to the intensities each cell's features state (``anchor=1``), the shipped models
    draw its nuclei at that level: mean DNA inside the real masks within 10% of the real crops' (the models
    before anchoring: +27% and +29%), and the other channels within 5%."""
    from conftest import CHANNELS, SHIPPED

    from cp2image_core.dataset import build_training_set
    from cp2image_core.features import standardize
    from cp2image_core.synthesize import load_synthesizer_uncached

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei", "Cells", "Cytoplasm"], CHANNELS, 64,
                            val_images=[1], mask_image="NucleiLabels")
    held = ts.val_idx
    mask = ts.masks[held][:, None]
    real = (ts.crops[held] * mask).sum((2, 3)).sum(0)
    for path in (SHIPPED, SHIPPED.with_name("cp2image-realistic.safetensors")):
        synth = load_synthesizer_uncached(path, "cpu")
        z, _ = standardize(ts.features[held], synth.spec)
        ratio = (synth.generate(z) * mask).sum((2, 3)).sum(0) / real
        assert abs(ratio[0] - 1) < 0.10 and np.all(np.abs(ratio[1:] - 1) < 0.05), (path.name, ratio)


def test_shipped_default_draws_no_dots_locked_to_the_pixel_lattice(fly_export):
    """The default's x4 sub-pixel step drew a dot every 4 pixels of a bright nucleus (the sixth update: lattice
    energy inside the held-out nuclei 8x, 11x and 9x the real crops' in DNA, FITC and Rhodamine; on field 3 a CNN
    told the cell window from real ones at 0.82 by it). Trained with the lattice loss, each channel's energy inside
    the real nuclei stays at the real crops' level (2026-12-07, the seventh update: 0.4x, 0.6x, 0.3x; the eighth
    0.5x, 0.6x, 0.4x); with the lattice-share loss, the share of the detail on the lattice beside the nucleus too."""
    import torch
    from conftest import CHANNELS, SHIPPED

    from cp2image_core.dataset import build_training_set
    from cp2image_core.features import standardize
    from cp2image_core.losses import fine_detail, lattice_energy, lattice_share_of
    from cp2image_core.synthesize import load_synthesizer_uncached

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei", "Cells", "Cytoplasm"], CHANNELS, 64,
                            val_images=[1], mask_image="NucleiLabels")
    held = ts.val_idx
    mask = torch.from_numpy(ts.masks[held]).float()[:, None]
    real = torch.from_numpy(ts.crops[held])
    synth = load_synthesizer_uncached(SHIPPED, "cpu")
    z, _ = standardize(ts.features[held], synth.spec, clip=False)
    fake = torch.from_numpy(synth.generate(z))
    ratio = lattice_energy(fake, mask).mean(0) / lattice_energy(real, mask).mean(0)
    assert torch.all(ratio < 1.5), ratio
    # nor beside the nucleus: the share of the fine detail on the lattice, in 16-pixel tiles over the whole crop
    # (the seventh update: 1.1x, 2.7x and 3.2x the real crops' in DNA, FITC and Rhodamine — red and green dots above
    # the nucleus; the eighth, trained with the lattice-share loss, 0.65x, 0.79x and 0.64x)
    ratio = lattice_share_of(fine_detail(fake)) / lattice_share_of(fine_detail(real))
    assert torch.all(ratio < 1.5), ratio


def test_remeasured_values_stay_with_their_crop_when_a_mask_is_empty():
    """CellProfiler returns one value per object present: a crop where no object was found must not shift the
    values of the crops after it."""
    from conftest import CHANNELS

    from cp2image_core.evaluate.remeasure import INTENSITY, SHAPE, Remeasurer

    crops = np.random.default_rng(0).random((4, 3, 32, 32)).astype(np.float32)
    masks = np.zeros((4, 32, 32), bool)
    masks[0, 5:10, 5:10] = masks[2, 5:20, 5:20] = masks[3, 5:25, 5:25] = True
    out = Remeasurer(ROOT / "pipelines" / "ExampleFly_features.cppipe", "Nuclei", CHANNELS).measure(
        crops, masks, (SHAPE, INTENSITY))
    assert np.array_equal(out["AreaShape_Area"], [25, np.nan, 225, 400], equal_nan=True)
    # squares of side 5, 15, 20: the largest distance to the background, as MeasureObjectSizeShape counts it
    assert np.array_equal(out["AreaShape_MaximumRadius"], [3, np.nan, 8, 10], equal_nan=True)
    mean = [crops[i, 0][masks[i]].mean() for i in (0, 2, 3)]
    assert np.allclose(out["Intensity_MeanIntensity_DNA"][[0, 2, 3]], mean) and np.isnan(
        out["Intensity_MeanIntensity_DNA"][1])


def test_pipeline_segmentation_finds_the_exported_nuclei_in_real_crops(fly_export):
    """--shape-segmentation pipeline: the features pipeline's own IdentifyPrimaryObjects, run on the held-out
    field's real crops, finds the nucleus CellProfiler exported (median IoU 0.93 on the full field, seen
    2026-11-29) far better than the per-crop Otsu threshold (0.64); a blank crop holds no object."""
    from conftest import CHANNELS

    from cp2image_core.dataset import build_training_set
    from cp2image_core.evaluate.remeasure import Remeasurer, segment

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei"], CHANNELS, 64, val_images=[1],
                            mask_image="NucleiLabels")
    crops, real = ts.crops[ts.val_idx][:120], ts.masks[ts.val_idx][:120]
    crops = np.concatenate([crops, np.zeros_like(crops[:1])])
    found = Remeasurer(ROOT / "pipelines" / "ExampleFly_features.cppipe", "Nuclei", CHANNELS)\
        .segment_like_pipeline(crops)
    assert found.shape == (121, 64, 64) and not found[-1].any()

    def iou(masks):
        return np.median([(a & b).sum() / max((a | b).sum(), 1) for a, b in zip(masks[:120], real)])

    assert iou(found) > 0.85 and iou(found) > iou(segment(crops)) + 0.15
    assert found[:120].any((1, 2)).mean() > 0.9
    # Cells come from IdentifySecondaryObjects: the error says so, and what to use instead
    # (so the evaluate command's default, auto, measures Cells' shape on per-crop Otsu); likewise Nuclei from a
    # channel the model does not draw
    cells = Remeasurer(ROOT / "pipelines" / "ExampleFly_features.cppipe", "Cells", CHANNELS)
    with pytest.raises(CP2ImageError, match=r"no IdentifyPrimaryObjects module that makes Cells.*otsu"):
        cells.segment_like_pipeline(crops[:2])
    no_dna = Remeasurer(ROOT / "pipelines" / "ExampleFly_features.cppipe", "Nuclei", ["FITC", "Rhodamine"])
    assert not cells.can_segment_like_pipeline and not no_dna.can_segment_like_pipeline
    with pytest.raises(CP2ImageError, match=r"makes Nuclei from one of the channels \['FITC', 'Rhodamine'\]"):
        no_dna.segment_like_pipeline(crops[:2, 1:])


def test_pipeline_segmentation_finds_the_cells_and_cytoplasm_around_each_nucleus(fly_export):
    """--around: the features pipeline's IdentifySecondaryObjects (Cells, propagated from the nuclei on FITC) and
    IdentifyTertiaryObjects (Cytoplasm), run on the mosaic of the held-out field's real crops, find each crop's cell
    around its nucleus, and re-measured they give back what CellProfiler measured on the whole field (on these 120
    cells, 2026-12-06: cell area r 0.86, Cells Intensity / Texture median r 0.93 / 0.94); a blank crop holds no
    cell."""
    from conftest import CHANNELS
    from scipy import ndimage

    from cp2image_core.dataset import build_training_set
    from cp2image_core.evaluate.metrics import pearson, summarize_r
    from cp2image_core.evaluate.remeasure import INTENSITY, SHAPE, TEXTURE, Remeasurer

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei", "Cells", "Cytoplasm"], CHANNELS, 64, val_images=[1],
                            mask_image="NucleiLabels")
    rows = ts.val_idx[:120]
    crops = np.concatenate([ts.crops[rows], np.zeros_like(ts.crops[:1])])
    remeasurer = Remeasurer(ROOT / "pipelines" / "ExampleFly_features.cppipe", "Nuclei", CHANNELS)
    assert list(remeasurer.around) == ["Cells", "Cytoplasm"]
    found = remeasurer.segment_around_like_pipeline(crops)
    nuclei, cells, cytoplasm = found["Nuclei"], found["Cells"], found["Cytoplasm"]
    assert not (nuclei[-1].any() or cells[-1].any() or cytoplasm[-1].any())
    assert np.array_equal(nuclei, remeasurer.segment_like_pipeline(crops))
    has = nuclei.any((1, 2))
    assert has[:120].mean() > 0.9 and np.array_equal(cells.any((1, 2)), has)
    assert not (nuclei & ~cells).any() and not (cytoplasm & ~cells).any()
    # the cytoplasm is the cell less its nucleus shrunk by its 8-connected outline (IdentifyTertiaryObjects)
    inner = ndimage.binary_erosion(nuclei, ndimage.generate_binary_structure(2, 2)[None])
    assert not (cytoplasm & inner).any() and (cytoplasm & nuclei).any()
    assert cells.sum() > 1.5 * nuclei.sum()  # a cell is more than its nucleus
    index = {f: j for j, f in enumerate(ts.feature_names)}
    values = remeasurer.measure(crops[:120], cells[:120], (SHAPE, INTENSITY, TEXTURE), object_name="Cells")
    assert pearson(ts.features[rows, index[("Cells", "AreaShape_Area")]], values["AreaShape_Area"]) > 0.85
    rs = {f: pearson(ts.features[rows, index[("Cells", f)]], v) for f, v in values.items() if ("Cells", f) in index}
    summary = summarize_r(rs)
    assert summary["Intensity"]["median_r"] > 0.9 and summary["Texture"]["median_r"] > 0.9, summary
    # the same objects from the real label images (--around-mask-image): the exported cell, and that cell less its
    # nucleus's inside; the pipeline's cytoplasm on the mosaic is mostly the real one, and inside the real masks the
    # real crops give CellProfiler's own Cells and Cytoplasm intensities and textures back
    ts = build_training_set(fly_export, "Nuclei", ["Nuclei", "Cells", "Cytoplasm"], CHANNELS, 64, val_images=[1],
                            mask_image="NucleiLabels", cell_mask_image="CellsLabels")
    real_masks = remeasurer.real_masks_around(ts.masks[rows], ts.cell_masks[rows] == 1)
    assert list(real_masks) == ["Cells", "Cytoplasm"] and np.array_equal(real_masks["Cells"], ts.cell_masks[rows] == 1)
    inside = ndimage.binary_erosion(ts.masks[rows], ndimage.generate_binary_structure(2, 2)[None], border_value=1)
    assert np.array_equal(real_masks["Cytoplasm"], real_masks["Cells"] & ~inside)
    found_here, real_here = cytoplasm[:120], real_masks["Cytoplasm"]
    iou = (found_here & real_here).sum((1, 2)) / np.maximum((found_here | real_here).sum((1, 2)), 1)
    assert np.median(iou) > 0.55, np.median(iou)  # 0.63 (2026-12-06): the mosaic's one threshold is not the field's
    for obj, obj_masks in real_masks.items():
        values = remeasurer.measure(crops[:120], obj_masks, (INTENSITY, TEXTURE), object_name=obj)
        summary = summarize_r({f: pearson(ts.features[rows, index[(obj, f)]], v) for f, v in values.items()
                               if (obj, f) in index})
        assert summary["Intensity"]["median_r"] > 0.99 and summary["Texture"]["median_r"] > 0.99, (obj, summary)
    # which objects --around re-measures: those the model reads features of, only with the pipeline's segmentation
    from cp2image_core.evaluate.__main__ import around_mask_image, get_args, objects_around

    assert get_args(["--models", "m", "--export-dir", "x", "--out", "o"]).around == "auto"
    assert objects_around(remeasurer, ["Nuclei", "Cells", "Cytoplasm"], "auto", "pipeline") == ["Cells", "Cytoplasm"]
    assert objects_around(remeasurer, ["Nuclei", "Cells"], "auto", "pipeline") == ["Cells"]
    assert objects_around(remeasurer, ["Nuclei", "Cells"], "off", "pipeline") == []
    assert objects_around(remeasurer, ["Nuclei", "Cells"], "auto", "otsu") == []
    # and which cells' label image measures them inside their real masks: CellsLabels where the export has it
    assert around_mask_image("auto", ["Cells", "Cytoplasm"], fly_export) == "CellsLabels"
    assert around_mask_image("auto", [], fly_export) is None and around_mask_image("", ["Cells"], fly_export) is None
    assert around_mask_image("auto", ["Cytoplasm"], fly_export) is None  # no CytoplasmLabels exported
    # the measurement modules are left measuring the model's own objects
    assert all(m.objects_list.value == ["Nuclei"] or m.objects_list.value == "Nuclei"
               for m in remeasurer.modules.values())
