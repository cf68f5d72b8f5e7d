"""Isotropic reconstruction quality on a held-out isotropic FIB-SEM volume (issue: vEMDiffuse-i and -a).

    python benchmarks/isotropic_quality.py ../shared/data/em                    # bundled model, R = 4 and 6
    python benchmarks/isotropic_quality.py ../shared/data/em --self-supervised --factors 4  # vEMDiffuse-a, 10 min
    python benchmarks/isotropic_quality.py ../shared/data/em --sweep --gaps 8   # sampling settings
    python benchmarks/isotropic_quality.py ../shared/data/em --inverted --out isotropic_inverted.json
    python benchmarks/isotropic_quality.py ../shared/data/em --coarser 0.5 --out isotropic_20nm.json
    python benchmarks/isotropic_quality.py ../shared/data/em --factors 4 --gaps 16 --noise 8 --out iso_noisy8.json
    python benchmarks/isotropic_quality.py ../shared/data/em --factors 4 --gaps 16 --finetune 10 --out isotropic_finetuned.json

The volume (10 nm isotropic, not used in training) keeps every R-th slice; the slices between are reconstructed
and compared with the truth on the generated slices only (PSNR, SSIM, FSIM per slice, averaged), against linear
and cubic interpolation along z and motion-compensated interpolation (the models' start, without the model).
Flicker: mean |difference| of neighbouring output slices over the truth's. ``--inverted`` tests the other contrast
convention (membranes bright: 255 minus the volume), in which FIB-SEM volumes also come. ``--coarser S`` tests
the volume as recorded with 1 / S times larger voxels (0.5: 20 nm, each the mean of 2 x 2 x 2), as from a
coarser acquisition: structures fewer pixels across and more change between sections. Other acquisitions, as
the held-out test's might differ from the training volume's: ``--noise S`` adds Gaussian noise of S grey levels
(a noisier acquisition: in the kept slices and the truth alike), ``--blur S`` a Gaussian blur of S pixels in y and
x (a softer one), ``--contrast C`` squeezes the grey levels to C times their range around the middle, ``--gamma G``
bends them (v**G on [0, 1]).
``--finetune M``: a user's own small isotropic volume of the tissue: the model is fine-tuned for M minutes on the
volume's first ``--tune-slices`` slices (as the plugin's Fine-tune does, for each R) and every model is tested on
the slices after them only.
An XZ view (input, linear, reconstruction, truth) is written next to the results (not committed: real data).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from _common import fsim, psnr, ssim, to_uint8

from napari_emdiffuse.core.finetune import finetune
from napari_emdiffuse.core.isotropic import decimate, flicker, interpolate, isotropic, self_supervised
from napari_emdiffuse.core.models import load_model, save_model
from napari_emdiffuse.core.simulate import coarser_voxels
from napari_emdiffuse.core.tasks import PRECISIONS, Settings, drive

RESULTS = Path(__file__).parent / "results"
# (steps, sigma_max, sigma_end): one step from high noise is the regression estimate E[slice | neighbours]; one
# step from low noise a correction close to the start
SWEEP = [(1, 2.0, 2.0), (1, 0.5, 0.5), (1, 0.25, 0.25), (2, 1.0, 0.5), (3, 1.0, 0.3), (3, 1.0, 0.15), (4, 1.0, 0.1)]


def cubic_interpolation(kept: np.ndarray, factor: int) -> np.ndarray:
    from scipy.interpolate import CubicSpline

    z = np.arange(len(kept)) * factor
    return CubicSpline(z, kept.astype(np.float64), axis=0)(np.arange(z[-1] + 1)).astype(np.float32)


def other_acquisition(volume: np.ndarray, noise: float, blur: float, contrast: float, gamma: float) -> np.ndarray:
    """The 8-bit volume as a noisier, softer, flatter or differently bent acquisition would record it."""
    if (noise, blur, contrast, gamma) == (0, 0, 1, 1):
        return volume
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(volume.astype(np.float32), (0, blur, blur)) if blur else volume.astype(np.float32)
    v = 255 * (v / 255) ** gamma
    v = 127.5 + contrast * (v - 127.5)
    v = v + np.random.default_rng(0).normal(0, noise, v.shape).astype(np.float32) if noise else v
    return np.clip(np.round(v), 0, 255).astype(np.uint8)


def score(volume: np.ndarray, truth: np.ndarray, factor: int, every: int = 1) -> dict:
    """Metrics on the generated slices (every ``every``-th of them for FSIM/SSIM speed) and the flicker ratio."""
    generated = [z for z in range(len(truth)) if z % factor][::every]
    v = to_uint8(volume)
    per = [(psnr(v[z], truth[z]), ssim(v[z], truth[z]), fsim(v[z], truth[z])) for z in generated]
    p, s, f = np.mean(per, axis=0)
    return {"psnr": float(p), "ssim": float(s), "fsim": float(f), "flicker_ratio": flicker(v) / flicker(truth)}


def xz_figure(path: Path, panels: dict[str, np.ndarray], y: int) -> None:
    from PIL import Image, ImageDraw

    tiles = []
    for name, vol in panels.items():
        tile = Image.fromarray(to_uint8(vol[:, y, :])).convert("RGB")
        ImageDraw.Draw(tile).text((4, 4), name, fill=(255, 255, 0))
        tiles.append(tile)
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    sheet.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/em"))
    parser.add_argument("--volume", default="fibsem_iso10nm_b_250.tif")
    parser.add_argument("--factors", default="4,6")
    parser.add_argument("--model", default=None, help="model name or file (default: the bundled one)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--self-supervised", action="store_true", help="also train and test vEMDiffuse-a (R = 4)")
    parser.add_argument("--minutes", type=float, default=10.0, help="vEMDiffuse-a training budget")
    parser.add_argument("--sweep", action="store_true", help="compare sampling settings (SWEEP)")
    parser.add_argument("--gaps", type=int, default=0, help="evaluate on the first N gaps only (0: all)")
    parser.add_argument("--every", type=int, default=1, help="score every n-th generated slice (speed)")
    parser.add_argument("--inverted", action="store_true", help="the volume in the other contrast convention")
    parser.add_argument("--coarser", type=float, default=1.0, help="voxels 1 / S times larger (0.5: 20 nm)")
    parser.add_argument("--noise", type=float, default=0.0, help="add Gaussian noise of S grey levels")
    parser.add_argument("--blur", type=float, default=0.0, help="Gaussian blur of S pixels in y and x")
    parser.add_argument("--contrast", type=float, default=1.0, help="grey range times C, around the middle")
    parser.add_argument("--gamma", type=float, default=1.0, help="grey levels v**G on [0, 1]")
    parser.add_argument("--out", default="isotropic_quality.json")
    parser.add_argument("--finetune", type=float, default=0.0, metavar="M",
                        help="also fine-tune the model for M minutes on the first --tune-slices slices")
    parser.add_argument("--tune-slices", type=int, default=100)
    parser.add_argument("--save-model", type=Path, default=None,
                        help="keep the vEMDiffuse-a model (then: --model FILE --sweep compares its sampling)")
    args = parser.parse_args()
    truth_full = tifffile.imread(args.data / args.volume)
    if args.inverted:
        truth_full = 255 - truth_full
    if args.coarser != 1:
        truth_full = to_uint8(coarser_voxels(truth_full, args.coarser))
    truth_full = other_acquisition(truth_full, args.noise, args.blur, args.contrast, args.gamma)
    if args.finetune:
        tuning_volume, truth_full = truth_full[: args.tune_slices], truth_full[args.tune_slices:]
        scratch = tempfile.TemporaryDirectory()
    report = {"volume": args.volume, "inverted": args.inverted, "coarser": args.coarser, "noise": args.noise,
              "blur": args.blur, "contrast": args.contrast, "gamma": args.gamma, "samples": args.samples,
              "gaps": args.gaps or "all", "finetune_minutes": args.finetune, "factors": {}}
    trained = load_model(args.model or "isotropic-fibsem") if not args.self_supervised or args.model else None
    for factor in [int(f) for f in args.factors.split(",")]:
        acquired = decimate(truth_full, factor)
        kept = acquired[: args.gaps + 1] if args.gaps else acquired
        truth = truth_full[: (len(kept) - 1) * factor + 1]
        linear = interpolate(kept, factor)
        entry = {"linear": score(linear, truth, factor, args.every),
                 "cubic": score(cubic_interpolation(kept, factor), truth, factor, args.every),
                 "motion": score(interpolate(kept, factor, "motion"), truth, factor, args.every)}
        models = {}
        if trained is not None:
            models["vEMDiffuse-a" if trained.meta.get("mode") == "self-supervised" else "vEMDiffuse-i"] = trained
        if args.self_supervised:  # learns from the whole decimated volume, nothing else
            started = time.perf_counter()
            models["vEMDiffuse-a"] = drive(self_supervised(acquired, factor, minutes=args.minutes))
            entry["vEMDiffuse-a training seconds"] = time.perf_counter() - started
            if args.save_model:
                save_model(models["vEMDiffuse-a"].net, models["vEMDiffuse-a"].meta, args.save_model)
        if args.finetune:
            tuned = Path(scratch.name) / f"isotropic_finetuned_R{factor}.npz"  # scratch: only tested here
            tuning = drive(finetune("isotropic", tuning_volume, base=args.model, factor=factor,
                                    minutes=args.finetune, output=tuned, precision=args.precision))
            print(tuning.message, flush=True)
            entry["fine-tuning"] = {"steps": tuning.steps, "val_psnr_before": tuning.val_psnr_before,
                                    "val_psnr_after": tuning.val_psnr_after}
            if tuning.improved:
                models["vEMDiffuse-i fine-tuned"] = load_model(tuned)
        for name, model in models.items():
            for steps, sigma_max, sigma_end in SWEEP if args.sweep else [(None, None, None)]:
                key, m = name, model
                if steps is not None:
                    key = f"{name} steps {steps}, sigma {sigma_max} -> {sigma_end}"
                    m = dataclasses.replace(model, sampling={**model.sampling, "steps": steps,
                                                             "sigma_max": sigma_max, "sigma_end": sigma_end})
                started = time.perf_counter()
                res = drive(isotropic(kept, m, Settings(samples=args.samples, precision=args.precision), factor=factor))
                entry[key] = {**score(res.image, truth, factor, args.every), "seconds": time.perf_counter() - started,
                              "uncertainty_score": res.info["uncertainty_score"], "sampling": m.sampling}
                print(factor, key, {k: round(v, 4) for k, v in entry[key].items() if isinstance(v, float)},
                      flush=True)
            if not args.sweep:
                RESULTS.mkdir(exist_ok=True)
                xz_figure(RESULTS / f"isotropic_xz_{name}_R{factor}.png",
                          {"input": np.repeat(kept, factor, axis=0)[: len(truth)], "linear": linear, name: res.image,
                           "truth": truth}, truth.shape[1] // 2)
        report["factors"][str(factor)] = entry
        print(json.dumps({factor: {k: entry[k] for k in ("linear", "cubic", "motion")}}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
