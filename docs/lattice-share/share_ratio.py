"""The share of the fine detail on the 4-pixel lattice, in 16-pixel tiles over the whole crop, of models' crops
against the real ones (held-out ExampleFly field 1), and a picture of the crops' centres.

    .venv/bin/python docs/lattice-share/share_ratio.py OUT.png weights/cp2image-default.safetensors [more models]

Prints, per model, the share per channel (DNA, FITC, Rhodamine) over the real crops' and ``lattice_share_loss``;
OUT.png: the centre 32 x 32 pixels of six held-out cells (R: Rhodamine, G: FITC, B: DNA, each row scaled alike),
the real crops on top and one row per model, 5x enlarged. Needs the export `make train-default` makes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cp2image_core.dataset import build_training_set
from cp2image_core.features import standardize
from cp2image_core.losses import fine_detail, lattice_share_loss, lattice_share_of
from cp2image_core.synthesize import load_synthesizer_uncached


def share(x: torch.Tensor) -> torch.Tensor:
    return lattice_share_of(fine_detail(x))


def centres(crops: np.ndarray) -> np.ndarray:
    c = crops[:6, :, 16:48, 16:48]
    rgb = np.stack([c[:, 2], c[:, 1], c[:, 0]], -1)
    return np.concatenate(list(np.clip(rgb / np.percentile(rgb, 99.5), 0, 1)), 1)


def main() -> None:
    out, models = Path(sys.argv[1]), sys.argv[2:]
    ts = build_training_set(Path("build/examplefly/features"), "Nuclei", ["Nuclei", "Cells", "Cytoplasm"],
                            ["DNA", "FITC", "Rhodamine"], 64, val_images=[1], mask_image="NucleiLabels")
    held = ts.val_idx
    real = torch.from_numpy(ts.crops[held])
    print("real crops' share (DNA / FITC / Rhodamine):", " / ".join(f"{v:.4f}" for v in share(real).tolist()))
    rows = [centres(ts.crops[held])]
    for path in models:
        synth = load_synthesizer_uncached(path, "cpu")
        z, _ = standardize(ts.features[held], synth.spec, clip=False)
        fake = torch.from_numpy(synth.generate(z))
        ratio = " / ".join(f"{v:.2f}" for v in (share(fake) / share(real)).tolist())
        print(f"{Path(path).stem}: share over the real crops' {ratio}; loss {lattice_share_loss(fake, real):.3f}")
        rows.append(centres(fake.numpy()))
    img = (np.concatenate(rows, 0) * 255).astype(np.uint8)
    Image.fromarray(img).resize((img.shape[1] * 5, img.shape[0] * 5), Image.NEAREST).save(out)


if __name__ == "__main__":
    main()
