"""Train a generator on CellProfiler exports: ``python -m cp2image_core.train --help``.

A readable loop (after nanoGPT): build or load the cached training set, standardize features,
then for each step draw a batch, compute the losses, step the optimizers. Every ``--val-every``
steps: validation loss, a PNG grid of real vs synthesized validation cells, a loss-curve PNG and
an atomic checkpoint. Each step's batch is drawn from a generator seeded by (seed, step, rank),
so ``--resume`` continues exactly where a killed run stopped. Runs under ``torchrun`` with DDP.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from . import __version__, archs
from .archs.critic import build_critic
from .dataset import build_training_set
from .errors import CP2ImageError
from .features import fit_standardizer, standardize
from .losses import (
    edge_intensity_loss,
    fine_detail,
    fine_scale_loss,
    gradient_outside,
    intensity_distribution_loss,
    lattice_loss,
    lattice_share_loss,
    level_loss,
    outline_loss,
    pattern_loss,
    surroundings,
    texture_loss,
)
from .modelfile import load_model, save_model
from .spec import ModelSpec
from .synthesize import build_generator, resolve_device

log = logging.getLogger("cp2image.train")


def _key_int(item: str) -> tuple[str, int]:
    key, _, value = item.partition("=")
    if not key or not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=INTEGER, e.g. width=64")
    return key, int(value)


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cp2image_core.train",
        description="Train a CP2Image generator on CellProfiler outputs (ExportToSpreadsheet CSVs + images).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data (what your CellProfiler pipeline exported)")
    d.add_argument("--export-dir", required=True, help="folder with Image.csv and one <Objects>.csv per object set")
    d.add_argument("--objects", default="Nuclei", help="objects to centre crops on (one image per object)")
    d.add_argument("--feature-objects", nargs="+", default=None,
                   help="object sets whose features are inputs, joined on ImageNumber+ObjectNumber "
                        "(default: --objects only), e.g. Nuclei Cells Cytoplasm")
    d.add_argument("--channels", nargs="+", required=True,
                   help="image names, in order (the <name> of Image.csv's FileName_<name> columns)")
    d.add_argument("--crop-size", type=int, default=64, help="crop side, pixels")
    d.add_argument("--mask-image", default=None,
                   help="exported label image of --objects (Image.csv FileName_<name>); weights the pixel loss "
                        "inside each cell's own object by --mask-weight")
    d.add_argument("--cell-mask-image", default=None,
                   help="exported label image of the objects built on --objects with the same numbers, e.g. "
                        "CellsLabels (IdentifySecondaryObjects seeded by Nuclei): for --cell-loss and "
                        "--cell-shape-loss")
    d.add_argument("--cell-objects", default="Cells",
                   help="name of the objects in --cell-mask-image (for their threshold in Image.csv)")
    d.add_argument("--zero-outside-mask", action="store_true",
                   help="set pixels outside each object's own mask (from --mask-image) to 0 in its crop")
    d.add_argument("--image-root", default=None, help="read images from this folder instead of Image.csv's PathName_")
    d.add_argument("--val-images", type=int, nargs="+", default=None,
                   help="ImageNumbers held out for validation (default: a seeded --val-fraction of images)")
    d.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images held out")
    m = p.add_argument_group("model and optimization")
    m.add_argument("--arch", default=archs.DEFAULT_ARCH, choices=archs.available(), help="generator architecture")
    m.add_argument("--arch-param", nargs="+", default=[], metavar="KEY=INT", type=_key_int,
                   help="architecture settings, e.g. width=64 hidden=512 for cp2image-decoder (default: its own)")
    m.add_argument("--loss", default=None, choices=["l1", "adversarial", "paper"],
                   help="l1: pixel loss only; adversarial: L1 + patch critic (hinge) + feature matching; "
                        "paper: the CP2Image losses and schedule (default: paper for cp2image-paper, else adversarial)")
    m.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    m.add_argument("--batch-size", type=int, default=32, help="cells per step (per process under torchrun)")
    m.add_argument("--lr", type=float, default=1e-3, help="generator learning rate (Adam)")
    m.add_argument("--lr-d", type=float, default=2e-4, help="discriminator learning rate")
    m.add_argument("--weight-decay", type=float, default=1e-4, help="generator weight decay")
    m.add_argument("--adv-weight", type=float, default=0.05, help="adversarial loss weight (adversarial loss)")
    m.add_argument("--fm-weight", type=float, default=1.0, help="feature-matching loss weight")
    m.add_argument("--adv-surround", type=int, default=-1, metavar="PX",
                   help="adversarial loss: let the critic's gradient reach only the surroundings, outside the object's "
                        "mask grown by PX pixels (the cell itself stays with the pixel and feature losses; needs "
                        "--mask-image; -1: the whole crop)")
    m.add_argument("--surround-weight", type=float, default=1.0,
                   help="pixel-loss weight outside the object's mask grown by --adv-surround pixels (default 1, as "
                        "everywhere outside the mask)")
    m.add_argument("--mask-weight", type=float, default=4.0, help="extra pixel-loss weight inside the object mask")
    m.add_argument("--feature-loss", type=float, default=0.0,
                   help="weight of the feature-encoder loss: a CNN pre-trained to read the features from real "
                        "crops must read the same from the synthesized crop (0: off)")
    m.add_argument("--texture-loss", type=float, default=0.0,
                   help="weight of the co-occurrence moment loss at --texture-scale inside the object mask (what "
                        "MeasureTexture's Haralick features are made of; needs --mask-image; 0: off)")
    m.add_argument("--texture-scale", type=int, nargs="+", default=[3],
                   help="MeasureTexture's scale, pixels; several (e.g. 1 2 3) also match the co-occurrence moments "
                        "at the smaller offsets, where a regular 2-pixel pattern differs from real texture")
    m.add_argument("--texture-channel-weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per --channels entry, multiplying that channel's share of the texture loss "
                        "(e.g. 1 2 4 to push the channels whose texture re-measures worst; default: all 1)")
    m.add_argument("--intensity-loss", type=float, default=0.0,
                   help="weight of the loss on intensity quantiles (min, quartiles, max) inside the object mask "
                        "(what MeasureObjectIntensity reports; needs --mask-image; 0: off)")
    m.add_argument("--level-loss", type=float, default=0.0,
                   help="weight of the relative error of the mean intensity inside the object mask, per channel "
                        "(MeanIntensity; needs --mask-image; 0: off)")
    m.add_argument("--edge-loss", type=float, default=0.0,
                   help="weight of the same quantile loss on the object's edge pixels (MeasureObjectIntensity's "
                        "*Edge features; needs --mask-image; 0: off)")
    m.add_argument("--pattern-loss", type=float, default=0.0,
                   help="weight of the loss on the batch mean of the crops' fine detail (finer than ~2 pixels): a "
                        "pattern drawn at the same place in every cell (a pixel-lattice grid, a spot on the same side "
                        "of every nucleus) survives that mean, real cells' detail averages out (0: off)")
    m.add_argument("--lattice-loss", type=float, default=0.0,
                   help="weight of the loss on a pattern locked to the pixel lattice inside the object: the energy of "
                        "its fine detail averaged per phase of a --lattice-period grid, above the real crops' (the "
                        "dots a sub-pixel decoder draws every 2 or 4 pixels of a bright nucleus; needs --mask-image; "
                        "0: off)")
    m.add_argument("--lattice-share-loss", type=float, default=0.0,
                   help="weight of the loss on the share of the crops' fine detail locked to the pixel lattice, in "
                        "16-pixel tiles over the whole crop, above the real crops' share: dots anywhere in the crop, "
                        "also beside the object and where the decoder draws little other detail (0: off)")
    m.add_argument("--lattice-period", type=int, default=4,
                   help="pixels: the lattice --lattice-loss and --lattice-share-loss look at (default 4: a x4 "
                        "sub-pixel step's, and the 2-pixel one with it)")
    m.add_argument("--fine-scale-loss", type=float, default=0.0,
                   help="weight of the loss on each crop's finest scale (mean |difference| of pixels 1 and 2 apart, "
                        "per channel, against the real crop's: noise and blur as the camera made them; 0: off)")
    m.add_argument("--shape-loss", type=float, default=0.0,
                   help="weight of the outline loss: the synthesized first channel's soft foreground at its own Otsu "
                        "threshold must be the object's mask, with a dark ring around it (MeasureObjectSizeShape "
                        "then measures the object's outline on the synthesized cell; needs --mask-image; 0: off)")
    m.add_argument("--outline-ring", choices=["all", "background"], default="all",
                   help="pixels of the outline loss's dark ring (3 pixels around the object): 'all', or "
                        "'background': only those the real crop shows below the threshold, so that a neighbour "
                        "touching the object is not drawn as a dark band")
    m.add_argument("--outline-threshold", choices=["otsu", "field"], default="otsu",
                   help="threshold of the outline loss: each synthesized crop's own Otsu threshold, or 'field': "
                        "the threshold IdentifyPrimaryObjects used on the cell's own field (Image.csv "
                        "Threshold_FinalThreshold_<objects>), so edges fall where the pipeline's segmentation puts "
                        "them; list the image the objects were identified from first in --channels")
    m.add_argument("--cell-loss", type=float, default=0.0,
                   help="weight of the texture (at --texture-scale), intensity-quantile and mean-intensity losses "
                        "inside each object's cell and inside its cytoplasm (the cell less the object), from "
                        "--cell-mask-image: what CellProfiler measures of Cells and Cytoplasm (0: off)")
    m.add_argument("--cell-shape-loss", type=float, default=0.0,
                   help="weight of the outline loss for the cell: on --cell-outline-channel at the threshold the "
                        "pipeline's IdentifySecondaryObjects applied to the cell's field (Image.csv "
                        "Threshold_FinalThreshold_<--cell-objects>), the cell above it and a ring around it below "
                        "(--cell-outline-ring; needs --cell-mask-image and --mask-image; 0: off)")
    m.add_argument("--cell-outline-ring", choices=["all", "background", "none"], default="all",
                   help="pixels of the cell outline loss's dark ring (3 pixels around the cell): 'all', so that the "
                        "pipeline's propagation stops at the cell's own outline even where a neighbour touches it, "
                        "'background' (not other cells' pixels), or 'none' (no ring: only the cell's own pixels are "
                        "drawn above the threshold, its extent and orientation, and nothing is pushed dark)")
    m.add_argument("--cell-outline-channel", default=None,
                   help="the --channels entry the cells were identified on (ExampleFly: FITC)")
    m.add_argument("--init-from", default=None,
                   help="start from this model file's generator weights (fine-tuning; same architecture and features)")
    m.add_argument("--encoder-steps", type=int, default=600, help="pre-training steps of the feature encoder")
    m.add_argument("--adv-start", type=int, default=500, help="step at which adversarial terms switch on")
    m.add_argument("--fm-ramp", type=int, default=2500,
                   help="paper loss: steps over which each discriminator layer's feature matching switches on")
    m.add_argument("--ema", type=float, default=0.995, help="EMA decay of generator weights (0: off)")
    m.add_argument("--seed", type=int, default=0, help="seed for the split, initialization and batches")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="model file to write (.safetensors)")
    r.add_argument("--run-dir", default=None, help="checkpoints, figures, cache (default: <out>.run/)")
    r.add_argument("--val-every", type=int, default=250, help="steps between validation/figures/checkpoints")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    r.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out model file (without it, training refuses to start)")
    r.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch default)")
    return p.parse_args(argv)


def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initializes torch.distributed when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_choice)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def batch_indices(pool: np.ndarray, batch: int, seed: int, step: int, rank: int) -> np.ndarray:
    """This rank's batch for ``step``: a function of its arguments only, so resumed runs repeat it."""
    g = np.random.default_rng([seed, step, rank])
    return pool[g.choice(len(pool), size=batch, replace=len(pool) < batch)]


def save_checkpoint(path: Path, state: dict) -> None:
    """Write then rename, so a killed run never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_figures(run_dir: Path, real: np.ndarray, fake: np.ndarray, history: list[dict], step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz import to_rgb

    n = min(8, len(real))
    fig, ax = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        for row, imgs, label in ((0, real, "real"), (1, fake, "synthetic")):
            ax[row, i].imshow(to_rgb(imgs[i], ref=real[i]))
            ax[row, i].set_axis_off()
            ax[row, i].set_title(f"{label} {i + 1}", fontsize=7)
    fig.suptitle(f"validation cells, step {step}", fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "val_grid.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    keys = sorted({k for h in history for k in h if k != "step"})
    for k in keys:
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax.plot(*zip(*pts), label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "losses.png", dpi=110)
    plt.close(fig)


def field_thresholds(export_dir: str | Path, objects: str, image_numbers: np.ndarray) -> torch.Tensor:
    """(N,) the threshold the pipeline's Identify module for ``objects`` applied to each cell's field (Image.csv
    Threshold_FinalThreshold_<objects>)."""
    from .dataset import _numeric, _read_csv

    path = Path(export_dir) / "Image.csv"
    header, rows = _read_csv(path)
    column = f"Threshold_FinalThreshold_{objects}"
    if column not in header:
        raise CP2ImageError(f"{path} has no {column}: --outline-threshold field and --cell-shape-loss need the "
                            f"threshold the pipeline's Identify module recorded for {objects} (export its Image "
                            "measurements)")
    by_image = dict(zip(_numeric(path, header, rows, "ImageNumber").astype(int),
                        _numeric(path, header, rows, column)))
    bad = sorted({int(i) for i in image_numbers if not np.isfinite(by_image.get(int(i), np.nan))})
    if bad:
        raise CP2ImageError(f"{path}: {column} is missing or not a number for image set(s) {bad[:10]}; "
                            f"--outline-threshold field needs it for every image set that has {objects} "
                            f"(or use --outline-threshold otsu)")
    return torch.tensor([by_image[int(i)] for i in image_numbers], dtype=torch.float32)


def cell_targets(args: argparse.Namespace, ts) -> tuple | None:
    """What --cell-loss and --cell-shape-loss need: each crop's cell codes (1 its cell, 2 other cells; (N, 1, S, S)),
    the cells' field thresholds and the outline channel's index; None when both are off."""
    if not (args.cell_loss or args.cell_shape_loss):
        return None
    if ts.cell_masks is None or ts.masks is None:
        raise CP2ImageError("--cell-loss and --cell-shape-loss need the objects' and their cells' label images: name "
                            "them with --mask-image and --cell-mask-image (e.g. NucleiLabels and CellsLabels)")
    codes = torch.from_numpy(ts.cell_masks)[:, None]
    if not args.cell_shape_loss:
        return codes, None, None
    if args.cell_outline_channel not in ts.channels:
        raise CP2ImageError(f"--cell-shape-loss needs --cell-outline-channel, one of --channels {ts.channels}: the "
                            f"image the cells were identified on (got {args.cell_outline_channel!r})")
    return (codes, field_thresholds(args.export_dir, args.cell_objects, ts.image_number),
            ts.channels.index(args.cell_outline_channel))


def cell_terms(terms: dict, args, fake, x, mask, cells: tuple, idx, device, tex_weights) -> None:
    """Add the cell's and cytoplasm's losses to ``terms`` (name -> (weight, value))."""
    codes, thresholds, channel = cells
    code = codes[idx].to(device)
    cell = (code == 1).float()
    if args.cell_loss:
        value = 0.0
        for region in (cell, cell * (1 - mask)):  # the cell, its cytoplasm
            value = value + sum(texture_loss(fake, x, region, s, tex_weights) for s in args.texture_scale) / len(
                args.texture_scale) + intensity_distribution_loss(fake, x, region) + level_loss(fake, x, region)
        terms["cell"] = args.cell_loss, value / 2
    if args.cell_shape_loss:
        terms["cell_shape"] = args.cell_shape_loss, outline_loss(
            fake, cell, channel=channel, sigma=0.0, threshold=thresholds[idx].to(device),
            outside={"all": None, "background": (code == 0).float(), "none": torch.zeros_like(cell)}[
                args.cell_outline_ring])


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return train(args)
    except CP2ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    tex_weights = None
    if args.texture_channel_weights is not None:
        if len(args.texture_channel_weights) != len(args.channels) or min(args.texture_channel_weights) < 0:
            raise CP2ImageError(f"--texture-channel-weights {' '.join(map(str, args.texture_channel_weights))}: "
                                f"give one weight >= 0 per channel of --channels ({' '.join(args.channels)})")
        tex_weights = torch.tensor(args.texture_channel_weights)
    if (args.lattice_loss or args.lattice_share_loss) and not 2 <= args.lattice_period <= args.crop_size:
        raise CP2ImageError(f"--lattice-period {args.lattice_period}: a lattice of 2 to --crop-size "
                            f"({args.crop_size}) pixels")
    rank, world, device = setup_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not (args.overwrite or args.resume):
        raise CP2ImageError(f"{out} exists and training would replace it: choose another --out, or pass --overwrite "
                            "to replace it (--resume continues the run that writes it)")
    run_dir = Path(args.run_dir or f"{out}.run")
    run_dir.mkdir(parents=True, exist_ok=True)
    loss_kind = args.loss or ("paper" if args.arch == "cp2image-paper" else "adversarial")

    # ---- data: cached training set, standardized with training-split statistics
    ts = build_training_set(args.export_dir, args.objects, args.feature_objects or [args.objects], args.channels,
                            args.crop_size, args.val_images, args.val_fraction, args.seed,
                            args.image_root, cache=run_dir / "trainset.npz", mask_image=args.mask_image,
                            zero_outside_mask=args.zero_outside_mask, cell_mask_image=args.cell_mask_image)
    train_idx, val_idx = ts.train_idx, ts.val_idx
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise CP2ImageError(f"The split left {len(train_idx)} training and {len(val_idx)} validation cells; "
                            "both must be > 0 (check --val-images / --val-fraction)")
    mean, std = fit_standardizer(ts.features[train_idx])
    torch.manual_seed(args.seed)
    arch_params = dict(args.arch_param)
    spec = ModelSpec(
        arch=args.arch, arch_params=arch_params, object_name=ts.object_name,
        features=ts.feature_names, feature_mean=mean.tolist(), feature_std=std.tolist(),
        channels=ts.channels, crop_size=args.crop_size,
        training={"data": ts.source.get("export_dir"), "feature_objects": ts.source.get("feature_objects"),
                  "n_train": len(train_idx), "n_val": len(val_idx),
                  "val_images": sorted(set(ts.image_number[val_idx].tolist())),
                  "loss": loss_kind, "steps": args.steps, "batch_size": args.batch_size * world,
                  "seed": args.seed, "command": "python -m cp2image_core.train " + " ".join(sys.argv[1:])},
    )
    z_all, _ = standardize(ts.features, spec, clip=False)  # the generator clips its own input
    z_all = torch.from_numpy(z_all)
    x_all = torch.from_numpy(ts.crops)
    if (args.texture_loss or args.intensity_loss or args.level_loss or args.edge_loss or args.shape_loss
            or args.lattice_loss) and ts.masks is None:
        raise CP2ImageError("--texture-loss, --intensity-loss, --level-loss, --edge-loss, --shape-loss and "
                            "--lattice-loss need the object's mask: name the exported label image with --mask-image "
                            "(e.g. NucleiLabels)")
    m_all = torch.from_numpy(ts.masks).float()[:, None] if ts.masks is not None else None
    w_all = 1.0 + args.mask_weight * m_all if m_all is not None else torch.ones(len(ts.crops), 1, 1, 1)
    t_all = field_thresholds(args.export_dir, args.objects, ts.image_number) \
        if args.shape_loss and args.outline_threshold == "field" else None
    cells = cell_targets(args, ts)  # (codes, thresholds, channel) for --cell-loss / --cell-shape-loss, or None
    surround_all = None  # 1 outside the object's mask grown by --adv-surround pixels
    if args.adv_surround >= 0:
        if m_all is None:
            raise CP2ImageError("--adv-surround needs the object's mask: name the exported label image with "
                                "--mask-image (e.g. NucleiLabels)")
        surround_all = surroundings(m_all, args.adv_surround)
        w_all = w_all + (args.surround_weight - 1.0) * surround_all
    if rank == 0:
        dropped = {k: len(v) for k, v in ts.dropped.items() if v}
        print(f"training set: {len(train_idx)} train / {len(val_idx)} val cells, {spec.n_features} features "
              f"(dropped: {dropped}), {spec.n_channels} channels, {args.crop_size}px crops; "
              f"{args.arch} with {loss_kind} loss on {device} x{world}")

    # ---- models and optimizers
    gen = build_generator(spec).to(device)
    if args.init_from:
        init_spec, tensors = load_model(args.init_from)
        same = (init_spec.arch, init_spec.features, init_spec.channels, init_spec.crop_size) == (
            spec.arch, spec.features, spec.channels, spec.crop_size)
        try:  # arch params may differ where the weights do not (e.g. replicate=1 pads the same convs differently)
            if same:
                gen.load_state_dict(tensors)
        except RuntimeError:
            same = False
        if not same:
            raise CP2ImageError(f"--init-from {args.init_from}: its architecture, features, channels or crop size "
                                "differ from this training run's")
    critic = build_critic(args.arch, spec.n_channels).to(device) if loss_kind != "l1" else None
    ema = AveragedModel(gen, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    if world > 1:
        gen = torch.nn.parallel.DistributedDataParallel(gen)
        if critic is not None:
            critic = torch.nn.parallel.DistributedDataParallel(critic)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    opt_d = None
    if critic is not None:
        opt_d = (torch.optim.SGD(critic.parameters(), lr=args.lr_d, momentum=0.9) if loss_kind == "paper"
                 else torch.optim.Adam(critic.parameters(), lr=args.lr_d, betas=(0.5, 0.999)))
    encoder = None
    if args.feature_loss > 0:
        encoder = pretrain_encoder(x_all, z_all, train_idx, spec, args, device, rank)
    start, history = 0, []
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        _unwrap(gen).load_state_dict(ck["gen"])
        opt_g.load_state_dict(ck["opt_g"])
        if critic is not None:
            _unwrap(critic).load_state_dict(ck["critic"])
            opt_d.load_state_dict(ck["opt_d"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        start, history = ck["step"], ck["history"]
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {start}")

    # ---- the loop
    pool = train_idx[rank::world]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    t0, seen = time.time(), 0
    for step in bar:
        gen.train()
        idx = torch.from_numpy(batch_indices(pool, args.batch_size, args.seed, step, rank))
        x, z, w = x_all[idx].to(device), z_all[idx].to(device), w_all[idx].to(device)
        logs = {}
        with amp:
            fake = gen(z)
        if critic is not None and step >= args.adv_start:  # critic step
            with amp:
                d_real, _ = critic(x)
                d_fake, _ = critic(fake.detach())
            if loss_kind == "paper":
                loss_d = F.binary_cross_entropy_with_logits(d_real.float(), torch.ones_like(d_real.float())) + \
                    F.binary_cross_entropy_with_logits(d_fake.float(), torch.zeros_like(d_fake.float()))
            else:
                loss_d = F.relu(1 - d_real.float()).mean() + F.relu(1 + d_fake.float()).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            logs["d"] = loss_d.item()
        with amp:  # generator step
            if loss_kind == "paper":
                loss_g = 0.5 * (fake.float() - x).pow(2).flatten(1).sum(1).mean()
            else:
                loss_g = (w * (fake.float() - x).abs()).mean() / w.mean()
            logs["pixel"] = loss_g.item()
            mask = m_all[idx].to(device) if m_all is not None else None
            terms = {}  # name -> (weight, value): the losses aimed at what CellProfiler re-measures
            if args.texture_loss:
                tex = sum(texture_loss(fake, x, mask, scale, tex_weights) for scale in args.texture_scale)
                terms["tex"] = args.texture_loss, tex / len(args.texture_scale)
            if args.intensity_loss:
                terms["int"] = args.intensity_loss, intensity_distribution_loss(fake, x, mask)
            if args.level_loss:
                terms["level"] = args.level_loss, level_loss(fake, x, mask)
            if args.edge_loss:
                terms["edge"] = args.edge_loss, edge_intensity_loss(fake, x, mask)
            if args.shape_loss:
                terms["shape"] = args.shape_loss, outline_loss(
                    fake, mask, threshold=t_all[idx].to(device) if t_all is not None else None,
                    real=x if args.outline_ring == "background" else None)
            if cells is not None:
                cell_terms(terms, args, fake, x, mask, cells, idx, device, tex_weights)
            # the losses on the crops' fine detail share it (a Gaussian blur of every crop, and its gradient)
            shared = sum(w > 0 for w in (args.pattern_loss, args.lattice_loss, args.lattice_share_loss)) > 1
            detail = (fine_detail(fake), fine_detail(x)) if shared else None
            if args.pattern_loss:
                terms["pattern"] = args.pattern_loss, pattern_loss(fake, x, detail=detail)
            if args.lattice_loss:
                terms["lattice"] = args.lattice_loss, lattice_loss(fake, x, mask, args.lattice_period, detail=detail)
            if args.lattice_share_loss:
                terms["share"] = args.lattice_share_loss, lattice_share_loss(fake, x, args.lattice_period,
                                                                             detail=detail)
            if args.fine_scale_loss:
                terms["fine"] = args.fine_scale_loss, fine_scale_loss(fake, x)
            for name, (weight, value) in terms.items():
                loss_g = loss_g + weight * value
                logs[name] = value.item()
            if encoder is not None:
                with torch.no_grad():
                    target = encoder(x)
                feat = (encoder(fake).float() - target.float()).pow(2).mean()
                loss_g = loss_g + args.feature_loss * feat
                logs["feat"] = feat.item()
            if critic is not None and step >= args.adv_start:
                if surround_all is not None:  # the critic's gradient reaches the surroundings only
                    fake = gradient_outside(fake, surround_all[idx].to(device))
                d_fake, f_fake = critic(fake)
                with torch.no_grad():
                    _, f_real = critic(x)
                # feature matching; for the paper, layer k switches on linearly over fm_ramp steps after k*fm_ramp
                fm = 0.0
                for k, (a, b) in enumerate(zip(f_fake, f_real)):
                    w = (min(1.0, max(0.0, (step - args.adv_start - args.fm_ramp * k) / args.fm_ramp))
                         if loss_kind == "paper" else 1.0)
                    fm = fm + w * (a.float().mean(0) - b.float().mean(0)).abs().mean()
                loss_g = loss_g + args.fm_weight * fm
                logs["fm"] = float(fm.detach()) if torch.is_tensor(fm) else fm
                if loss_kind == "adversarial":
                    adv = -d_fake.float().mean()
                    loss_g = loss_g + args.adv_weight * adv
                    logs["adv"] = adv.item()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if ema is not None:
            ema.update_parameters(_unwrap(gen))
        seen += len(idx) * world
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)

        last = step + 1 == args.steps
        if (step + 1) % args.val_every == 0 or last:
            val_gen = ema.module if ema is not None else _unwrap(gen)
            val = validate(val_gen, x_all[val_idx], z_all[val_idx], device)
            history.append({"step": step + 1, "val_l1": val["l1"], **{f"train_{k}": v for k, v in logs.items()}})
            if rank == 0:
                rate = seen / max(1e-9, time.time() - t0)
                tqdm.write(f"step {step + 1}: val L1 {val['l1']:.5f}, val MSE {val['mse']:.6f}, {rate:.0f} cells/s")
                save_figures(run_dir, ts.crops[val_idx[:8]], val["images"][:8], history, step + 1)
                save_checkpoint(ckpt_path, {
                    "step": step + 1, "history": history, "gen": _unwrap(gen).state_dict(),
                    "opt_g": opt_g.state_dict(), "ema": ema.state_dict() if ema is not None else {},
                    "critic": _unwrap(critic).state_dict() if critic is not None else {},
                    "opt_d": opt_d.state_dict() if opt_d is not None else {},
                })
            if world > 1:
                dist.barrier()

    if rank == 0:
        final = ema.module if ema is not None else _unwrap(gen)
        val = validate(final, x_all[val_idx], z_all[val_idx], device)
        spec.training.update({"final_val_l1": val["l1"], "final_val_mse": val["mse"],
                              "cells_per_s": round(seen / max(1e-9, time.time() - t0), 1),
                              "code_version": __version__})
        save_model(out, final.state_dict(), spec)
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
        print(f"wrote {out} (val L1 {val['l1']:.5f}, MSE {val['mse']:.6f}); figures in {run_dir}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def pretrain_encoder(x_all, z_all, train_idx, spec, args, device, rank) -> torch.nn.Module:
    """Fit the feature encoder on real training crops (image -> standardized features), then freeze it.

    Deterministic for a seed, so a resumed run rebuilds the same encoder.
    """
    from .archs.encoder import FeatureEncoder

    torch.manual_seed(args.seed + 1)
    enc = FeatureEncoder(spec.n_channels, spec.n_features).to(device)
    opt = torch.optim.AdamW(enc.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in tqdm(range(args.encoder_steps), desc="feature encoder", disable=rank != 0,
                     mininterval=0.5 if sys.stderr.isatty() else 30):
        idx = torch.from_numpy(batch_indices(train_idx, 64, args.seed + 7, step, 0))
        loss = (enc(x_all[idx].to(device)) - z_all[idx].to(device).clamp(-spec.clip, spec.clip)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval().requires_grad_(False)
    if rank == 0:
        print(f"feature encoder: training MSE {loss.item():.3f} (standardized features)")
    return enc


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def validate(gen: torch.nn.Module, x: torch.Tensor, z: torch.Tensor, device: torch.device, bs: int = 128) -> dict:
    gen.eval()
    outs = [gen(z[i:i + bs].to(device)).float().cpu() for i in range(0, len(z), bs)]
    fake = torch.cat(outs)
    return {"l1": (fake - x).abs().mean().item(), "mse": (fake - x).pow(2).mean().item(), "images": fake.numpy()}


if __name__ == "__main__":
    sys.exit(main())
