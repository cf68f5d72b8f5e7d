"""Transfer by fine-tuning: a degradation the bundled denoiser never saw, one image pair, at most 10 minutes.

    python benchmarks/finetune_transfer.py ../shared/data/em [--minutes 10] [--precision float32]

The unseen degradation: very low dose (8 electrons per pixel), a wider beam (blur sigma 1.2 px) and scan-line
offsets (every line shifted by its own random amount, a common artefact of fast scanning that the bundled
model's training noise does not contain). The fine-tuning pair is FIB-SEM 5 nm slice 21 (768 x 1024) with this
degradation, its clean version misaligned as a real second acquisition is: shifted by (2.6, -1.8) px, rotated by
0.5° and elastically distorted by up to 2 px (a smooth random field); the test images are slices 22-26 (held out
of all training) with the same degradation. Reports PSNR/SSIM/FSIM of the bundled model applied directly and of
the model fine-tuning returns (the bundled one when it kept it), the validation PSNR before/after with its
seed-to-seed spread, and the registration (rotation, scale, residual misalignment).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).parent))
from _common import metrics, to_uint8  # noqa: E402

from napari_emdiffuse.core.finetune import finetune  # noqa: E402
from napari_emdiffuse.core.simulate import SEMNoise  # noqa: E402
from napari_emdiffuse.core.tasks import PRECISIONS, Settings, denoise, drive  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def unseen_degradation(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = SEMNoise(electrons=8, read=0.02, correlation_x=0.0, correlation_y=0.0, blur=1.2)(clean, rng)
    noisy += rng.normal(0, 0.06, size=(clean.shape[0], 1))  # scan-line offsets
    return noisy


def misaligned(image: np.ndarray, rng: np.random.Generator, shift=(2.6, -1.8), angle=0.5, elastic=2.0):
    """``image`` as a second acquisition of the field shows it: shifted, rotated about the centre, distorted."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx, t = (h - 1) / 2, (w - 1) / 2, np.radians(angle)
    field = np.stack([gaussian_filter(rng.normal(size=(h, w)), 100, mode="wrap") for _ in range(2)])
    field *= elastic / np.hypot(*field).max()
    y = cy + np.cos(t) * (yy - cy) - np.sin(t) * (xx - cx) + shift[0] + field[0]
    x = cx + np.sin(t) * (yy - cy) + np.cos(t) * (xx - cx) + shift[1] + field[1]
    return map_coordinates(image.astype(np.float64), [y, x], order=3, mode="reflect")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/em"))
    parser.add_argument("--minutes", type=float, default=9.5, help="training budget; validation adds seconds")
    parser.add_argument("--base", default=None, help="model to fine-tune (default: the bundled denoiser)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = parser.parse_args()

    slices = tifffile.imread(args.data / "fibsem_5nm_slices_27x768x1024.tif")
    rng = np.random.default_rng(3)
    to01 = lambda a: a.astype(np.float32) / 255  # noqa: E731
    pair_in = to_uint8(unseen_degradation(to01(slices[21]), rng) * 255)
    pair_target = to_uint8(misaligned(slices[21], rng))
    tests = [(to_uint8(unseen_degradation(to01(s), rng) * 255), s) for s in slices[22:27]]

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = drive(finetune("denoise", pair_in, pair_target, base=args.base, minutes=args.minutes,
                                output=Path(tmp) / "tuned.npz", seed=0, precision=args.precision), lambda p: None)
        seconds = time.perf_counter() - started
        print(result.message)
        tuned = str(result.path) if result.improved else args.base
        outputs, settings = {"noisy": lambda noisy: noisy}, Settings(precision=args.precision)
        for label, model in (("bundled", args.base), ("fine-tuned", tuned)):
            outputs[label] = lambda noisy, model=model: drive(denoise(noisy, model, settings)).image
        rows = {}
        for label, restore in outputs.items():
            scores = [metrics(restore(noisy), clean) for noisy, clean in tests]
            rows[label] = {m: float(np.mean([s[m] for s in scores])) for m in scores[0]}
    for label, r in rows.items():
        print(f"{label:<11} PSNR {r['psnr']:6.2f}  SSIM {r['ssim']:.4f}  FSIM {r['fsim']:.4f}  "
              f"sharp {r['sharpness']:.2f}")
    gain = rows["fine-tuned"]["psnr"] - rows["bundled"]["psnr"]
    print(f"fine-tuning: {seconds / 60:.1f} min, {result.steps} steps; test PSNR gain {gain:+.2f} dB, FSIM "
          f"{rows['bundled']['fsim']:.4f} -> {rows['fine-tuned']['fsim']:.4f}; saved: {result.improved}; "
          f"registration {result.registration.summary()}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune_transfer.json").write_text(json.dumps({
        "rows": rows, "precision": args.precision, "minutes": seconds / 60, "steps": result.steps,
        "val_psnr_before": result.val_psnr_before, "val_psnr_after": result.val_psnr_after,
        "val_psnr_spread": result.val_psnr_spread, "saved": result.improved, "validation": result.validation,
        "misalignment": {"shift": [2.6, -1.8], "rotation_deg": 0.5, "elastic_px": 2.0},
        "registration": result.registration.summary(), "message": result.message}, indent=1))


if __name__ == "__main__":
    main()
