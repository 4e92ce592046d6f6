"""Does a synthesized cell keep the biology? ``python -m cp2image_core.evaluate --help``.

For the held-out images of a training set: synthesize every cell with each model, re-measure the
synthesized crops with CellProfiler's own modules (intensity and texture inside the real object's
mask, shape on a segmentation of the synthesized image), correlate with the input features, and
compare with the real crops (the ceiling), the nearest training neighbour, the mean training crop and a random
training crop (chance).
Writes report.md, report.json and PNG figures, and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ..crops import compose_field, crop_objects
from ..dataset import TrainingSet, build_training_set, load_image
from ..errors import CP2ImageError
from ..features import standardize
from ..modelfile import read_spec
from ..synthesize import load_synthesizer_uncached
from .metrics import (
    FAMILIES,
    bootstrap_medians,
    c2st,
    c2st_fine,
    family,
    ks_median,
    pearson,
    pixel_metrics,
    r2,
    spearman_medians,
    summarize_r,
)
from .remeasure import INTENSITY, SHAPE, TEXTURE, Remeasurer, segment

ROOT = Path(__file__).resolve().parents[2]
C2ST_KEYS = ("c2st", "c2st_cell", "c2st_context", "c2st_fine")  # the report's two-sample tests, in its columns' order


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cp2image_core.evaluate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="model files to compare (the first sets the split)")
    p.add_argument("--export-dir", required=True, help="the ExportToSpreadsheet folder the models were trained on")
    p.add_argument("--features-pipeline", default=str(ROOT / "pipelines" / "ExampleFly_features.cppipe"),
                   help="pipeline whose measurement modules re-measure the crops")
    p.add_argument("--mask-image", default="NucleiLabels",
                   help="exported label image of the objects (Image.csv FileName_<name>); '' = segment real crops")
    p.add_argument("--val-images", type=int, nargs="+", default=None,
                   help="held-out ImageNumbers (default: the first model's validation images)")
    p.add_argument("--image-root", default=None, help="read images from this folder instead of Image.csv's PathName_")
    p.add_argument("--max-cells", type=int, default=0, help="evaluate at most this many held-out cells (0: all)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--traverse", default=None, help="also write a traversal strip for this feature, e.g. "
                   "Nuclei.AreaShape_Area (values at -2..+2 standard deviations)")
    p.add_argument("--cell", type=int, default=0, help="held-out cell index for --traverse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape-segmentation", choices=["auto", "pipeline", "otsu"], default="auto",
                   help="how each crop's object is found for MeasureObjectSizeShape: 'pipeline' (the features "
                        "pipeline's own IdentifyPrimaryObjects for these objects, on all crops of a method at once), "
                        "'otsu' (Otsu threshold of the first channel, per crop), or 'auto' (default): 'pipeline' "
                        "where that module exists and reads one of the model's channels, else 'otsu'; the report "
                        "says which")
    p.add_argument("--around", choices=["auto", "off"], default="auto",
                   help="also re-measure the objects the features pipeline builds around each object (its "
                        "IdentifySecondaryObjects seeded by them and IdentifyTertiaryObjects, e.g. Cells and "
                        "Cytoplasm around Nuclei), found in each method's crops as that pipeline finds them and "
                        "correlated with the model's input features of those objects: 'auto' (default) where the "
                        "pipeline has such modules, the model reads those objects' features and shape is "
                        "re-segmented by the pipeline")
    p.add_argument("--around-mask-image", default="auto",
                   help="exported label image of the cells around each object, numbered as the objects (Image.csv "
                        "FileName_<name>; the features pipeline saves CellsLabels): the objects --around finds are "
                        "also measured inside their real masks (Intensity and Texture inside the real cell and its "
                        "cytoplasm, as the objects' own are inside --mask-image), which tells what is drawn from "
                        "where the pipeline finds it; 'auto' (default): '<first object around>Labels' where "
                        "Image.csv has it; '' = off")
    p.add_argument("--match-shape", action="store_true",
                   help="also evaluate each cp2image-decoder model with the module's 'Match each object's stated "
                        "shape' on (a row '<model> + shape match' next to its own)")
    p.add_argument("--field-crops", action="store_true",
                   help="also evaluate each model's crops cut from a whole synthetic field of the held-out images "
                        "(every object drawn from its own features at its own centre, the module's 'Fill the field "
                        "between objects?'): a row '<model> in its field' next to its own")
    p.add_argument("--c2st-repeats", type=int, default=5,
                   help="C2ST classifiers trained per method (different splits and starts); the table gives their "
                        "mean, as one run on a few hundred cells varies by ±0.1")
    p.add_argument("--c2st-steps", type=int, default=300,
                   help="training steps (batches of 64) of each C2ST classifier (300 in every table "
                        "before 2026-12-06); more steps make a stronger test: on ExampleFly 1,000 steps tell the "
                        "shipped default's crops from real ones at 0.93-0.95 instead of 0.89")
    args = p.parse_args(argv)
    if args.c2st_steps < 1:
        p.error(f"--c2st-steps {args.c2st_steps}: each C2ST classifier needs at least 1 training step")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        report = evaluate(args)
    except CP2ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if report.get("around"):
        print(around_table(report))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def evaluate(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [read_spec(m) for m in args.models]
    ref = specs[0]
    for m, s in zip(args.models[1:], specs[1:]):
        if (s.channels, s.crop_size, s.object_name) != (ref.channels, ref.crop_size, ref.object_name):
            raise CP2ImageError(f"{m}: channels/crop size/objects differ from {args.models[0]}; "
                                "models compared side by side must share them")
    val_images = args.val_images or ref.training.get("val_images")
    feature_objects = ref.training.get("feature_objects") or ref.object_names()
    remeasurer = Remeasurer(args.features_pipeline, ref.object_name, ref.channels)
    shape_segmentation = args.shape_segmentation
    if shape_segmentation == "auto":
        shape_segmentation = "pipeline" if remeasurer.can_segment_like_pipeline else "otsu"
        if shape_segmentation == "otsu":
            print(f"note: {args.features_pipeline} has no IdentifyPrimaryObjects that makes {ref.object_name} from "
                  f"one of {ref.channels}; shape re-measured on a per-crop Otsu segmentation", file=sys.stderr)
    around = objects_around(remeasurer, feature_objects, args.around, shape_segmentation)
    cells_image = around_mask_image(args.around_mask_image, around, Path(args.export_dir))
    ts = build_training_set(args.export_dir, ref.object_name, feature_objects, ref.channels, ref.crop_size,
                            val_images=val_images, seed=args.seed, image_root=args.image_root,
                            mask_image=args.mask_image or None, cache=out / "evalset.npz",
                            cell_mask_image=cells_image)
    val = ts.val_idx[: args.max_cells] if args.max_cells else ts.val_idx
    train = ts.train_idx
    real = ts.crops[val]
    masks = ts.masks[val] if ts.masks is not None else segment(real)
    in_real_masks = ({} if ts.cell_masks is None else
                     {o: m for o, m in remeasurer.real_masks_around(masks, ts.cell_masks[val] == 1).items()
                      if o in around})
    index = {f: j for j, f in enumerate(ts.feature_names)}

    def raw_for(spec) -> np.ndarray:
        missing = [f"{o}.{f}" for o, f in spec.features if (o, f) not in index]
        if missing:
            raise CP2ImageError(f"{args.export_dir} lacks features the model needs: {', '.join(missing[:5])}")
        return ts.features[:, [index[f] for f in spec.features]]

    # the methods: real crops (ceiling), each model, nearest neighbour, mean training crop
    z_ref, _ = standardize(raw_for(ref), ref)
    d = ((z_ref[val, None, :] - z_ref[None, train, :]) ** 2).sum(-1)
    methods: dict[str, np.ndarray] = {"real crops (ceiling)": real}
    timings = {}
    runs = []  # (model file, spec, with shape matching)
    for path, spec in zip(args.models, specs):
        runs.append((path, spec, False))
        if args.match_shape and spec.arch == "cp2image-decoder":
            runs.append((path, spec, True))
    for path, spec, match in runs:
        synth = load_synthesizer_uncached(path, "auto", "fp32", match_shape=match)
        z, _ = standardize(raw_for(spec), spec, clip=False)
        name = Path(path).stem + (" + shape match" if match else "")
        t0 = time.time()
        methods[name + f" [{spec.arch}]"] = synth.generate(z[val], batch_size=64)
        timings[name] = time.time() - t0
        if args.field_crops and not match:
            methods[name + f" in its field [{spec.arch}]"] = field_crops(ts, val, methods[name + f" [{spec.arch}]"],
                                                                        figure=out / f"field_{name}.png")
    methods["nearest neighbour"] = ts.crops[train[d.argmin(1)]]
    methods["mean training crop"] = np.repeat(ts.crops[train].mean(0, keepdims=True), len(val), 0)
    rng = np.random.default_rng(args.seed)  # chance-level features; its C2ST is what the field shift alone gives
    methods["random training crop"] = ts.crops[rng.choice(train, len(val), replace=len(train) < len(val))]

    inputs = {f: ts.features[val, j] for (o, f), j in index.items() if o == ref.object_name}
    results, remeasured = {}, {}

    def correlate(crops: np.ndarray, obj: str, obj_masks: np.ndarray, modules: tuple[str, ...]) -> dict[str, float]:
        """Each feature's r between the model's input features of ``obj`` and those re-measured inside the masks."""
        values = remeasurer.measure(crops, obj_masks, modules, object_name=obj)
        return {f: pearson(ts.features[val, index[(obj, f)]], v) for f, v in values.items() if (obj, f) in index}

    for name, crops in methods.items():
        if shape_segmentation == "pipeline":  # the crop's object, and with `around` the objects built on it
            objects = remeasurer.segment_around_like_pipeline(crops, around=bool(around))
            found = objects[ref.object_name]
        else:
            found = segment(crops)
        shape = remeasurer.measure(crops, found, (SHAPE,))
        inside = remeasurer.measure(crops, masks, (INTENSITY, TEXTURE))
        feats = {**{f: v for f, v in shape.items() if f.startswith("AreaShape_")},
                 **{f: v for f, v in inside.items() if f.startswith(("Intensity_", "Texture_"))}}
        remeasured[name] = feats
        rs = {f: pearson(inputs[f], v) for f, v in feats.items() if f in inputs}
        r2s = {f: r2(inputs[f], v) for f, v in feats.items() if f in inputs}
        results[name] = {"features": summarize_r(rs), "r": rs, "r2_median": float(np.nanmedian(list(r2s.values()))),
                         "pixels": pixel_metrics(real, crops), "no_object_found": int((~found.any((1, 2))).sum())}
        common = [f for f in feats if f in inputs]
        x, y = (np.stack([src[f] for f in common], 1).astype(np.float64) for src in (inputs, feats))
        results[name]["features"]["ci95"] = bootstrap_medians(x, y, common, seed=args.seed)
        results[name]["features"]["spearman"] = spearman_medians(x, y, common)
        for obj in around:  # e.g. the Cells and Cytoplasm found around each crop's nucleus, as the pipeline finds them
            rs_obj = correlate(crops, obj, objects[obj], (SHAPE, INTENSITY, TEXTURE))
            results[name].setdefault("around", {})[obj] = summarize_r(rs_obj)
            results[name].setdefault("r_around", {}).update({f"{obj}.{f}": r for f, r in rs_obj.items()})
        for obj, obj_masks in in_real_masks.items():  # what is drawn inside the real cell, wherever it is found
            results[name].setdefault("around_real_masks", {})[obj] = summarize_r(
                correlate(crops, obj, obj_masks, (INTENSITY, TEXTURE)))
    cell = cell_window(masks)
    seeds = range(args.seed, args.seed + max(1, args.c2st_repeats))
    cnn = functools.partial(c2st, steps=args.c2st_steps)
    real_cell, real_around = real * cell, real * (1 - cell)
    for name, crops in methods.items():
        if name == "real crops (ceiling)":  # real vs real: the measured chance level (in context = whole crop)
            accs = {"c2st": real_vs_real(real, seeds, test=cnn), "c2st_cell": real_vs_real(real_cell, seeds, test=cnn),
                    "c2st_fine": real_vs_real(real, seeds, test=c2st_fine)}
            accs["c2st_context"] = accs["c2st"]
        else:
            pairs = {"c2st": (real, crops), "c2st_cell": (real_cell, crops * cell),
                     "c2st_context": (real, crops * cell + real_around)}
            accs = {key: [cnn(a, b, seed=k) for k in seeds] for key, (a, b) in pairs.items()}
            accs["c2st_fine"] = [c2st_fine(real, crops, seed=k) for k in seeds]
        for key, acc in accs.items():
            results[name][key], results[name][key + "_sd"] = float(np.mean(acc)), float(np.std(acc))
        results[name]["ks_median"] = ks_median(remeasured["real crops (ceiling)"], remeasured[name])
    report = {"n_val_cells": len(val), "val_images": sorted(set(ts.image_number[val].tolist())),
              "n_train_cells": len(train), "models": args.models, "mask": args.mask_image or "segmented",
              "shape_segmentation": shape_segmentation,
              "results": {k: {kk: vv for kk, vv in v.items() if kk not in ("r", "r_around")}
                          for k, v in results.items()},
              "generate_seconds": timings, "c2st_repeats": len(seeds), "c2st_steps": args.c2st_steps,
              "around": around, "around_real_masks": list(in_real_masks), "around_mask_image": cells_image}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    write_feature_r(out / "feature_r.csv", {name: {**res["r"], **res.get("r_around", {})}
                                            for name, res in results.items()})
    figures(out, methods, inputs, remeasured, results)
    if args.traverse:
        traverse(out, args.models[0], ts, val[args.cell], args.traverse)
    (out / "report.md").write_text(markdown(report))
    return report


def objects_around(remeasurer: Remeasurer, feature_objects: list[str], choice: str, shape_segmentation: str) -> list:
    """The object sets --around re-measures: those the features pipeline builds on the model's objects whose
    features the model reads; none with 'off' or when the objects themselves are not segmented as the pipeline does."""
    if choice != "auto" or shape_segmentation != "pipeline":
        return []
    return [o for o in remeasurer.around if o in feature_objects]


def around_mask_image(choice: str, around: list[str], export_dir: Path) -> str | None:
    """The label image of the cells around each object that --around-mask-image names: None when off, when nothing
    is measured around the objects, or ('auto') when Image.csv has no '<first object around>Labels' image."""
    if not choice or not around:
        return None
    if choice != "auto":
        return choice
    with open(export_dir / "Image.csv", newline="") as fh:
        columns = next(csv.reader(fh), [])
    name = f"{around[0]}Labels"
    return name if f"FileName_{name}" in columns else None


def field_crops(ts: TrainingSet, val: np.ndarray, crops: np.ndarray, figure: Path | None = None) -> np.ndarray:
    """The crops cut again from each held-out image's synthetic field composed of ``crops`` (their objects only);
    ``figure``: a PNG of the first held-out image, real beside synthetic."""
    if ts.centers is None or "image_shapes" not in ts.source:
        raise CP2ImageError("this training set cache has no object centres; delete it so that it is rebuilt")
    key = (ts.object_name, "AreaShape_Area")
    areas = (ts.features[val, ts.feature_names.index(key)] if key in ts.feature_names
             else ts.masks[val].sum((1, 2)) if ts.masks is not None else np.zeros(len(val)))
    radii, centers = np.sqrt(np.nan_to_num(areas) / np.pi), ts.centers[val]
    out = np.empty_like(crops)
    for num in np.unique(ts.image_number[val]):
        rows = np.flatnonzero(ts.image_number[val] == num)
        field = compose_field(crops[rows], tuple(ts.source["image_shapes"][str(num)]), centers[rows], radii[rows])
        out[rows] = crop_objects(field, centers[rows], crops.shape[-1])
        if figure is not None:
            import skimage.io

            from ..viz import to_rgb

            real = np.stack([load_image(Path(f)) for f in ts.source["images"][str(num)][:crops.shape[1]]])
            pair = np.concatenate([to_rgb(real), to_rgb(field.transpose(2, 0, 1), ref=real)], axis=1)
            skimage.io.imsave(str(figure), (pair * 255).astype(np.uint8), check_contrast=False)
            figure = None
    return out


def write_feature_r(path: Path, rs: dict[str, dict[str, float]]) -> None:
    """One row per re-measured feature: its family and each method's Pearson r with the input (blank: undefined)."""
    names = sorted(set().union(*rs.values()), key=lambda f: (family(f), f))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["feature", "family", *rs])
        for f in names:
            w.writerow([f, family(f), *("" if not np.isfinite(r.get(f, np.nan)) else f"{r[f]:.4f}"
                                        for r in rs.values())])


def cell_window(masks: np.ndarray, grow: int = 3, blur: float = 1.5) -> np.ndarray:
    """(N, 1, S, S) weights: 1 on each real object and ``grow`` pixels around it, fading to 0 beyond.

    Real and synthesized crops times this window differ only in the cell itself: the C2ST on them says how much of
    the crop-level C2ST comes from the surroundings (neighbouring cells, field edges), which a cell's own features
    do not determine.
    """
    from scipy import ndimage as ndi

    w = [np.maximum(ndi.gaussian_filter(ndi.binary_dilation(m, iterations=grow).astype(np.float32), blur), m)
         for m in masks]
    return np.stack(w)[:, None].astype(np.float32)


def table(report: dict) -> str:
    head = ("| method | AreaShape r | Intensity r | Texture r | all r | r≥0.5 | r≥0.8 | R² | MSE | PSNR | SSIM "
            "| C2ST acc | C2ST cell | C2ST in context | C2ST fine | KS |")
    lines = [head, "|" + "---|" * 16]
    for name, r in report["results"].items():
        f, p = r["features"], r["pixels"]
        lines.append(f"| {name} | " + " | ".join(f"{f[fam]['median_r']:.2f}" for fam in FAMILIES)
                     + f" | {f['all']['median_r']:.2f} | {f['all']['frac_ge_0.5']:.2f} | {f['all']['frac_ge_0.8']:.2f}"
                     + f" | {r['r2_median']:.2f} | {p['mse']:.5f} | {p['psnr']:.1f} | {p['ssim']:.3f}"
                     + "".join(f" | {r.get(k, float('nan')):.2f}" for k in C2ST_KEYS)
                     + f" | {r['ks_median']:.2f} |")
    return "\n".join(lines)


def around_table(report: dict, key: str = "around", families: tuple[str, ...] = (*FAMILIES, "all")) -> str:
    """Per object set around the input objects (e.g. Cells, Cytoplasm), each family's median r; '' if none.
    ``key`` "around_real_masks": measured inside their real masks (Intensity and Texture)."""
    objs = report.get(key) or []
    if not objs:
        return ""
    lines = ["| method | " + " | ".join(f"{o} {k} r" for o in objs for k in families) + " |",
             "|" + "---|" * (1 + len(objs) * len(families))]
    for name, r in report["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[key][o][k]['median_r']:.2f}" for o in objs for k in families)
                     + " |")
    return "\n".join(lines)


def spread_table(report: dict) -> str:
    """Each family's median r with its 95% bootstrap interval over held-out cells, and the median Spearman r."""
    keys = (*FAMILIES, "all")
    lines = ["| method | " + " | ".join(f"{k} r [95%]" for k in keys) + " | " + " | ".join(
        f"{k} Spearman" for k in keys) + " |", "|" + "---|" * (1 + 2 * len(keys))]
    for name, r in report["results"].items():
        f = r["features"]
        if "ci95" not in f:
            continue
        lines.append(f"| {name} | " + " | ".join(
            f"{f[k]['median_r']:.2f} [{f['ci95'][k][0]:.2f}, {f['ci95'][k][1]:.2f}]" for k in keys)
            + " | " + " | ".join(f"{f['spearman'][k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


def around_section(report: dict) -> str:
    """The report's paragraph and table on the objects around the input objects ('' when not measured)."""
    if not report.get("around"):
        return ""
    objs = " and ".join(report["around"])
    return f"""The objects around each cell: {objs}, found in each method's crops as the features pipeline finds them
(its IdentifyPrimaryObjects, IdentifySecondaryObjects and IdentifyTertiaryObjects on all crops of a method at
once; the objects that share the number of the object at each crop's centre), re-measured by the same modules
(shape, and intensity and texture inside these found objects, as re-running the pipeline on the images gives them) and
correlated with the model's input features of those objects (`feature_r.csv`: rows `<object>.<feature>`). The
real crops' row is the ceiling here too: a cell cut by the crop's edge, or a neighbour's outline found
differently than in the whole field, lowers it.

{around_table(report)}

{around_real_paragraph(report)}"""


def around_real_paragraph(report: dict) -> str:
    """The report's table of the objects around, measured inside their real masks ('' when not measured)."""
    if not report.get("around_real_masks"):
        return ""
    return f"""The same objects' Intensity and Texture measured inside their real masks instead (the cell of
`{report['around_mask_image']}` and, for {" and ".join(report["around_real_masks"][1:]) or "none"}, that cell less the
object, as IdentifyTertiaryObjects makes it), as the objects' own are measured inside theirs: what each method draws in
the cell, wherever the pipeline finds the cell in its crops.

{around_table(report, "around_real_masks", FAMILIES[1:])}

"""


def real_vs_real(crops: np.ndarray, seeds, test=c2st) -> list[float]:
    """``test`` (a C2ST) between two random halves of the same real crops: the classifier's measured chance level."""
    accs = []
    for k in seeds:
        order = np.random.default_rng(k).permutation(len(crops))
        half = len(crops) // 2
        accs.append(test(crops[order[:half]], crops[order[half:2 * half]], seed=k))
    return accs


def markdown(report: dict) -> str:
    worst = "\n".join(f"- **{name}**: " + ", ".join(f"{f} ({r})" for f, r in res["features"]["worst"])
                      for name, res in report["results"].items())
    if report.get("shape_segmentation") == "pipeline":
        found = ", ".join(f"{name} {res['no_object_found']}" for name, res in report["results"].items())
        how = ("on the object the features pipeline's own IdentifyPrimaryObjects finds at each crop's centre, all "
               f"crops of a method segmented together; crops without one, left out of the shape r: {found}")
    else:
        how = "on an Otsu segmentation of each crop's first channel"
    return f"""# cp2image evaluation

Held-out images {report['val_images']}: {report['n_val_cells']} cells ({report['n_train_cells']} training cells).
Features of the input objects, re-measured by CellProfiler's MeasureObjectSizeShape ({how}),
MeasureObjectIntensity and MeasureTexture (inside the real object's mask: {report['mask']}); median Pearson r
with the input features per family, fraction of features with r ≥ 0.5 / 0.8, median R². Pixel metrics against
the real crop (data range 1). C2ST: held-out accuracy of a small CNN telling real from synthesized crops
(0.5 = indistinguishable; the mean of {report.get('c2st_repeats', 1)} classifiers, each trained
{report.get('c2st_steps', 300)} steps of 64 crops: more steps, a stronger test); C2ST cell: the same with
both crops multiplied by a window on the real object (its mask grown by 3 pixels, blurred), so the surroundings
cannot give a crop away. C2ST in context: the synthesized cell (inside that window) pasted into its real crop's
surroundings — how far the cell alone gives itself away where it really lies; the gap to C2ST acc is what the
surroundings, which a cell's features do not determine, add. C2ST fine: a logistic regression on each crop's
finest-scale statistics (per channel, the mean |difference| of pixels 1 and 2 apart, and their ratio: the camera's
noise, blur and 8-bit levels, or a generator's smoothness and checkerboard), trained and tested the same way. On
the real crops row, C2ST is measured between
two random halves of the held-out cells (half as many per classifier): the test's own chance level. The random
training crop row is a floor for all four: real cells of the training fields, told from the held-out field's.
KS: median Kolmogorov–Smirnov statistic between the re-measured features of real and synthesized crops.
Every feature's r for every method: `feature_r.csv`.

{table(report)}

How sure the medians are: each family's median Pearson r with a 95% interval from 1,000 bootstrap resamples of the
held-out cells (another draw of cells from the same field; not another field), and the median Spearman (rank) r,
which a few cells with outlying re-measurements — a segmentation that runs into the surroundings — sway less.

{spread_table(report)}

{around_section(report)}Worst features (r):
{worst}

Figures: `grid.png` (held-out cells, one row per method), `scatter.png` (input vs re-measured),
`r_hist.png` (per-feature r).
"""


def figures(out: Path, methods, inputs, remeasured, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import to_rgb

    names = list(methods)
    real = methods[names[0]]
    n = min(8, len(real))
    fig, ax = plt.subplots(len(names), n, figsize=(1.5 * n, 1.6 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for i in range(n):
            ax[r, i].imshow(to_rgb(methods[name][i], ref=real[i]))
            ax[r, i].set_axis_off()
        ax[r, 0].set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=100)
    plt.close(fig)

    keys = [k for k in ("AreaShape_Area", "Intensity_MeanIntensity_DNA") if k in inputs]
    keys += [k for k in inputs if k.startswith("Texture_Contrast_DNA")][:1]
    fig, ax = plt.subplots(len(keys), len(names), figsize=(2.2 * len(names), 2.2 * len(keys)), squeeze=False)
    for r, k in enumerate(keys):
        for c, name in enumerate(names):
            y = remeasured[name].get(k)
            if y is not None:
                ax[r, c].scatter(inputs[k], y, s=3)
                ax[r, c].set_title(f"{name[:18]}\nr={pearson(inputs[k], y):.2f}", fontsize=6)
            ax[r, c].set_xlabel(f"input {k}", fontsize=5)
            ax[r, c].tick_params(labelsize=5)
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    for name in names:
        v = [x for x in results[name]["r"].values() if np.isfinite(x)]
        ax.hist(v, bins=30, range=(-0.5, 1), histtype="step", label=name)
    ax.set_xlabel("Pearson r, input vs re-measured feature")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "r_hist.png", dpi=100)
    plt.close(fig)


def traverse(out: Path, model: str, ts, cell: int, feature: str, steps=(-2, -1, 0, 1, 2)) -> Path:
    """PNG strip: the cell's image with one standardized feature set to each of ``steps``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import to_rgb

    synth = load_synthesizer_uncached(model, "auto", "fp32")
    spec = synth.spec
    obj, _, feat = feature.rpartition(".")
    key = (obj or spec.object_name, feat)
    if key not in spec.features:
        raise CP2ImageError(f"--traverse {feature}: not a feature of {model} (e.g. {spec.features[0][0]}."
                            f"{spec.features[0][1]})")
    j = spec.features.index(key)
    index = {f: i for i, f in enumerate(ts.feature_names)}
    z, _ = standardize(ts.features[cell:cell + 1, [index[f] for f in spec.features]], spec, clip=False)
    zs = np.repeat(z, len(steps), 0)
    zs[:, j] = steps
    imgs = synth.generate(zs)
    fig, ax = plt.subplots(1, len(steps), figsize=(1.8 * len(steps), 2.1))
    for i, s in enumerate(steps):
        ax[i].imshow(to_rgb(imgs[i], ref=imgs[len(steps) // 2]))
        ax[i].set_title(f"{s:+d} SD", fontsize=8)
        ax[i].set_axis_off()
    fig.suptitle(f"{key[0]}.{key[1]}", fontsize=8)
    fig.tight_layout()
    path = out / f"traverse_{key[0]}.{key[1]}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
