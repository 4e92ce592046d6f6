"""What gives synthesized crops away to the C2ST classifier? Two checks on an evaluate run's held-out cells.

    .venv/bin/python scripts/realism_checks.py --evalset reports/realistic/evalset.npz \
        --models weights/cp2image-realistic.safetensors weights/cp2image-default.safetensors

1. camera-like noise: white noise at 0.5/1/1.5x the real crops' high-pass SD per channel, added everywhere or
   outside the cell window — does a smooth synthesized crop give itself away by missing noise?
2. swapped surroundings: a (synthesized or real) cell window pasted onto a random training crop — what any
   surroundings drawn from the training fields can reach against the held-out field.
3. field against field: real cells of one image (field) against real cells of another, every pair — how far apart
   the screen's own fields are to this classifier.
Same classifier, seeds and window as the evaluate command's C2ST columns (mean ± SD of --repeats classifiers).
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
from scipy.ndimage import gaussian_filter

from cp2image_core.dataset import TrainingSet
from cp2image_core.evaluate.__main__ import cell_window
from cp2image_core.evaluate.metrics import c2st
from cp2image_core.features import standardize
from cp2image_core.modelfile import read_spec
from cp2image_core.synthesize import load_synthesizer_uncached


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evalset", required=True, help="evalset.npz written by python -m cp2image_core.evaluate")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    ts = TrainingSet.load(args.evalset)
    val = ts.val_idx
    real, window, train_crops = ts.crops[val], cell_window(ts.masks[val]), ts.crops[ts.train_idx]
    rng = np.random.default_rng(0)

    def acc(fake: np.ndarray, against: np.ndarray = real) -> str:
        a = [c2st(against, fake, seed=k) for k in range(args.repeats)]
        return f"{np.mean(a):.2f} ± {np.std(a):.2f}"

    high_pass_sd = (train_crops - gaussian_filter(train_crops, (0, 0, 1, 1))).std(axis=(0, 2, 3))
    background = train_crops[rng.choice(len(train_crops), len(val))]
    print(f"{len(val)} held-out cells; real high-pass SD per channel {np.round(high_pass_sd, 4).tolist()}")
    print(f"real cell on random training surroundings: {acc(real * window + background * (1 - window))}")
    fields = {int(i): np.flatnonzero(ts.image_number == i) for i in np.unique(ts.image_number)}
    for a, b in itertools.combinations(fields, 2):
        n = min(len(fields[a]), len(fields[b]), len(val))
        pick_a, pick_b = (ts.crops[rng.choice(fields[i], n, replace=False)] for i in (a, b))
        print(f"real cells, image {a} against image {b} ({n} each): {acc(pick_b, against=pick_a)}")
    for model in args.models:
        spec = read_spec(model)
        missing = [".".join(f) for f in spec.features if f not in ts.feature_names]
        if missing:
            raise SystemExit(f"{args.evalset} lacks {len(missing)} features {model} needs "
                             f"(e.g. {', '.join(missing[:3])}): make it with the same features pipeline")
        z, _ = standardize(ts.features[:, [ts.feature_names.index(f) for f in spec.features]], spec, clip=False)
        fake = load_synthesizer_uncached(model, "cpu", "fp32").generate(z[val])
        print(f"{model}: as is {acc(fake)}; its cell on random training surroundings "
              f"{acc(fake * window + background * (1 - window))}")
        for k in (0.5, 1.0, 1.5):
            noise = rng.normal(size=fake.shape).astype(np.float32) * (k * high_pass_sd)[None, :, None, None]
            print(f"  + noise {k}x: everywhere {acc(np.clip(fake + noise, 0, 1))}, "
                  f"outside the cell {acc(np.clip(fake + noise * (1 - window), 0, 1))}")


if __name__ == "__main__":
    main()
