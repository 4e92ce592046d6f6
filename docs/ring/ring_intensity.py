"""Mean intensity per channel around the held-out nuclei (ExampleFly field 1), real crops against models' crops.

    .venv/bin/python docs/ring/ring_intensity.py weights/cp2image-default.safetensors [more models]

Rings outside the real nucleus's mask: 1-3 pixels and 4-6 pixels out; and the 1-3 pixel ring split by the real crop's
DNA against its field's IdentifyPrimaryObjects threshold (at or above it: a touching neighbour; below: background).
Needs the export `make train-default` makes (build/examplefly/features).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cp2image_core.dataset import build_training_set
from cp2image_core.features import standardize
from cp2image_core.synthesize import load_synthesizer_uncached
from cp2image_core.train import field_thresholds

EXPORT = Path("build/examplefly/features")


def grow(mask: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(mask, 2 * r + 1, stride=1, padding=r)


def main() -> None:
    ts = build_training_set(EXPORT, "Nuclei", ["Nuclei", "Cells", "Cytoplasm"], ["DNA", "FITC", "Rhodamine"], 64,
                            val_images=[1], mask_image="NucleiLabels")
    held = ts.val_idx
    real = torch.from_numpy(ts.crops[held])
    mask = torch.from_numpy(ts.masks[held]).float()[:, None]
    near = (grow(mask, 3) - mask)[:, 0] > 0.5
    far = (grow(mask, 6) - grow(mask, 3))[:, 0] > 0.5
    t = field_thresholds(EXPORT, "Nuclei", ts.image_number[held]).view(-1, 1, 1)
    touching, background = near & (real[:, 0] >= t), near & (real[:, 0] < t)
    print(f"share of the 1-3 px ring where the real DNA is at or above the threshold: "
          f"{touching.float().sum() / near.float().sum():.3f}")
    print("| crops | ring 1-3 px (DNA / FITC / Rhodamine) | ring 4-6 px | 1-3 px, real DNA >= threshold "
          "| 1-3 px, below |")
    print("|---|---|---|---|---|")

    def row(x: torch.Tensor, name: str) -> None:
        cells = []
        for region in (near, far, touching, background):
            r = region[:, None].expand_as(x).float()
            means = (x * r).sum((0, 2, 3)) / r.sum((0, 2, 3))
            cells.append(" / ".join(f"{v:.4f}" for v in means.tolist()))
        print(f"| {name} | " + " | ".join(cells) + " |")

    row(real, "real")
    for path in sys.argv[1:]:
        synth = load_synthesizer_uncached(path, "cpu")
        z, _ = standardize(ts.features[held], synth.spec, clip=False)
        row(torch.from_numpy(synth.generate(z)), Path(path).stem)


if __name__ == "__main__":
    main()
