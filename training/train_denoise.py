"""Train the bundled denoising model (EMDiffuse-n) on the real EM data.

    python training/train_denoise.py ../shared/data/em -o src/napari_emdiffuse/models/denoise-sem.npz --minutes 70

Training pairs come from two sources:
- the real short-dwell/long-dwell SEM pair (top half only; the bottom half is held out for benchmarks), which carries
  the real noise and the real intensity relation between the two acquisitions;
- clean FIB-SEM and ssTEM images with simulated short-dwell SEM noise over a wide range of levels and scan
  correlations, with the detector signal shown plain or inverted (see ``core.simulate.SEMNoise.random``), placed in
  a random part of the detector's range (``core.simulate.in_detector_range``), so that the model generalises beyond
  one noise level, one contrast and one detector convention.
The real pair's long-dwell image is itself noisy: its examples train the estimate but not the difficulty head phi
(``learns_difficulty`` in ``core.diffusion.training_loss``). Fitted to that unpredictable noise, phi forgot that dark,
shot-noise-heavy pixels are harder (uncertainty Spearman on the held-out half 0.485 -> 0.32 after a GPU stage with
half its examples from the pair); with phi kept out of them, a CPU stage of that kind (85 min, about half as many
examples) was at 0.48-0.51 at its 10- to 40-minute checkpoints and ended at 0.45 (not a controlled comparison).
Held out everywhere: the bottom half of the real pair, FIB-SEM 5 nm slices 22-26, the whole FIB-SEM volume ``b``.
"""

from __future__ import annotations

import argparse

import numpy as np
import tifffile
import torch
from common import add_arguments, add_noise_arguments, fit, jittered, load_clean_images

from napari_emdiffuse.core.network import UNet, UNetConfig
from napari_emdiffuse.core.normalize import Normalizer
from napari_emdiffuse.core.simulate import SEMNoise, in_detector_range
from napari_emdiffuse.core.train import augment, to_model_space

PATCH, CROP = 128, 192


def batches(data, batch: int, seed: int, real_fraction: float, min_contrast: float):
    rng = np.random.default_rng(seed)
    clean_images = load_clean_images(data)
    weights = np.array([im.size for im in clean_images], dtype=np.float64)
    weights /= weights.sum()
    noisy = tifffile.imread(data / "sem_pair22_noisy.tif")
    clean = tifffile.imread(data / "sem_pair22_clean.tif")
    half = noisy.shape[0] // 2
    real_norm = Normalizer.fit(noisy)  # as at inference: the whole acquisition's percentiles
    real_in, real_out = real_norm(noisy[:half]), real_norm(clean[:half])
    while True:
        xs, cs, learns_difficulty = [], [], []
        for _ in range(batch):
            real = rng.random() < real_fraction
            if real:
                y, x = rng.integers(0, half - PATCH), rng.integers(0, real_in.shape[1] - PATCH)
                n = jittered(Normalizer(0.0, 1.0, np.dtype(np.float32)), rng)
                cond, target = n(real_in[y:y + PATCH, x:x + PATCH]), n(real_out[y:y + PATCH, x:x + PATCH])
            else:
                image = clean_images[rng.choice(len(clean_images), p=weights)]
                y, x = rng.integers(0, image.shape[0] - CROP + 1), rng.integers(0, image.shape[1] - CROP + 1)
                crop = in_detector_range(image[y:y + CROP, x:x + CROP], rng, (min_contrast, 1.0))
                degraded = SEMNoise.random(rng)(crop, rng)
                n = jittered(Normalizer.fit(degraded), rng)
                oy, ox = rng.integers(0, CROP - PATCH + 1, size=2)
                cond = n(degraded[oy:oy + PATCH, ox:ox + PATCH])
                target = n(crop[oy:oy + PATCH, ox:ox + PATCH])
            cond, target = augment(rng, cond, target)
            xs.append(target)
            cs.append(cond)
            learns_difficulty.append(not real)
        yield to_model_space(xs), to_model_space(cs), None, torch.tensor(learns_difficulty)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, "src/napari_emdiffuse/models/denoise-sem.npz", 70.0)
    add_noise_arguments(parser)
    parser.add_argument("--real-fraction", type=float, default=0.3)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    net = UNet(UNetConfig(base=args.base, mults=(1, 2, 2, 4), blocks=1, attention=True, patch=2))
    meta = {"task": "denoise", "script": "training/train_denoise.py",
            "description": "Short-dwell SEM denoising (EMDiffuse-n); trained on a real SEM pair and FIB-SEM/ssTEM "
                           "images with simulated SEM noise."}
    fit(net, lambda seed: batches(args.data, args.batch, seed, args.real_fraction, args.min_contrast), meta, args)


if __name__ == "__main__":
    main()
