"""Train the bundled denoising model (EMDiffuse-n) on the real EM data.

    python training/train_denoise.py ../shared/data/em -o src/napari_emdiffuse/models/denoise-sem.npz --minutes 70

Training pairs come from two sources:
- the real short-dwell/long-dwell SEM pair (top half only; the bottom half is held out for benchmarks), which carries
  the real noise and the real intensity relation between the two acquisitions;
- clean FIB-SEM and ssTEM images with simulated short-dwell SEM noise over a wide range of levels and scan
  correlations (see ``core.simulate.SEMNoise.random``), so that the model generalises beyond one noise level.
Held out everywhere: the bottom half of the real pair, FIB-SEM 5 nm slices 22-26, the whole FIB-SEM volume ``b``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_emdiffuse.core.models import save_model
from napari_emdiffuse.core.network import UNet, UNetConfig, count_parameters
from napari_emdiffuse.core.normalize import Normalizer
from napari_emdiffuse.core.simulate import SEMNoise, scale01
from napari_emdiffuse.core.train import train

PATCH, CROP = 128, 192


def load_clean_images(data: Path) -> list[np.ndarray]:
    """Clean training images scaled to [0, 1] (the held-out images are left out here)."""
    images = [scale01(s) for s in tifffile.imread(data / "fibsem_5nm_slices_27x768x1024.tif")[:22]]
    volume = tifffile.imread(data / "fibsem_iso10nm_a_250.tif")
    for axis in range(3):  # isotropic: every orientation is a valid clean image
        images += [scale01(s) for s in np.moveaxis(volume, axis, 0)[::10]]
    images += [scale01(s) for s in tifffile.imread(data / "sstem_aniso_50x4x4nm_30x512x512.tif")[::3]]
    return images


def augment(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    k, flip = rng.integers(4), rng.random() < 0.5
    out = [np.rot90(a, k) for a in arrays]
    return [np.ascontiguousarray(a[:, ::-1] if flip else a) for a in out]


def jittered(norm: Normalizer, rng: np.random.Generator) -> Normalizer:
    """Small random changes of the normalisation range: robustness to percentiles of other images."""
    span = norm.high - norm.low
    return Normalizer(norm.low + rng.normal(0, 0.03) * span, norm.high + rng.normal(0, 0.03) * span, norm.dtype)


def batches(data: Path, batch: int, seed: int, real_fraction: float):
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
        xs, cs = [], []
        for _ in range(batch):
            if rng.random() < real_fraction:
                y, x = rng.integers(0, half - PATCH), rng.integers(0, real_in.shape[1] - PATCH)
                n = jittered(Normalizer(0.0, 1.0, np.dtype(np.float32)), rng)
                cond, target = n(real_in[y:y + PATCH, x:x + PATCH]), n(real_out[y:y + PATCH, x:x + PATCH])
            else:
                image = clean_images[rng.choice(len(clean_images), p=weights)]
                y, x = rng.integers(0, image.shape[0] - CROP + 1), rng.integers(0, image.shape[1] - CROP + 1)
                crop = image[y:y + CROP, x:x + CROP]
                degraded = SEMNoise.random(rng)(crop, rng)
                n = jittered(Normalizer.fit(degraded), rng)
                oy, ox = rng.integers(0, CROP - PATCH + 1, size=2)
                cond = n(degraded[oy:oy + PATCH, ox:ox + PATCH])
                target = n(crop[oy:oy + PATCH, ox:ox + PATCH])
            cond, target = augment(rng, cond, target)
            xs.append(target)
            cs.append(cond)
        to_model = lambda a: torch.from_numpy(np.stack(a)[:, None] * 2 - 1).float()  # noqa: E731
        yield to_model(xs), to_model(cs), None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/em"))
    parser.add_argument("-o", "--output", type=Path, default=Path("src/napari_emdiffuse/models/denoise-sem.npz"))
    parser.add_argument("--minutes", type=float, default=70.0)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--real-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    net = UNet(UNetConfig(base=args.base, mults=(1, 2, 2, 4), blocks=1, attention=True, patch=2))
    print(f"parameters: {count_parameters(net):,}", flush=True)
    meta = {
        "task": "denoise",
        "name": args.output.stem,
        "description": "Short-dwell SEM denoising (EMDiffuse-n); trained on a real SEM pair and FIB-SEM/ssTEM "
                       "images with simulated SEM noise.",
        "training": {"script": "training/train_denoise.py", "args": {k: str(v) for k, v in vars(args).items()},
                     "date": time.strftime("%Y-%m-%d")},
    }
    checkpoint = lambda ema, step: save_model(ema, {**meta, "training": {**meta["training"], "step": step}},  # noqa: E731
                                              args.output)
    job = train(net, batches(args.data, args.batch, args.seed, args.real_fraction), iterations=args.iterations,
                minutes=args.minutes, lr=args.lr, seed=args.seed, report_every=50, on_checkpoint=checkpoint,
                checkpoint_minutes=5)
    while True:
        try:
            p = next(job)
        except StopIteration as stop:
            ema = stop.value
            break
        print(f"step {p.step} loss {p.loss:.4f} {p.seconds / 60:.1f} min", flush=True)
    checkpoint(ema, p.step)
    print(f"saved {args.output}", flush=True)


if __name__ == "__main__":
    main()
