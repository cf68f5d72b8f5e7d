"""Serial-section volumes as they are acquired (issue 35): any z factor, and regenerated sections.

    python benchmarks/serial_sections.py ../shared/data/em                        # R = 4, 6, 5.5, 12.5 and repair
    python benchmarks/serial_sections.py ../shared/data/em --factors 5.5 --repair "" --out serial_quick.json

**Any factor.** The held-out isotropic FIB-SEM volume (10 nm voxels, not used in training) is made into a serial-
section acquisition with sections R output planes apart. A factor p / q that is not whole (5.5 = 11 / 2, 12.5 =
25 / 2) is made exactly, without resampling along z: the sections are every p-th plane of the volume binned q x q
in y and x only (10 nm planes of 20 nm pixels: sections 110 or 250 nm apart are 5.5 or 12.5 pixels apart), and the
output planes, every q-th plane, are the truth at the output's z spacing (the pixel size: an isotropic output).
Whole factors are the issue-4 benchmark's (every R-th plane of the volume as recorded). The generated planes (those
not on a section) are compared with the truth (PSNR, SSIM, FSIM, averaged over planes) against linear and cubic
interpolation along z and the motion-compensated interpolation the model starts from, at the same positions.
``--axes`` also uses the volume's y and x axes as z (an isotropic volume looks alike along each).

**Section repair.** The same volume decimated at each ``--repair`` R (1: the volume as recorded): one section, or
two in a row, at several places (every ``--every``-th section) are marked bad and regenerated from their good
neighbours (``factor 1``, the sections R pixels apart); scored on the regenerated sections against linear
interpolation from the same neighbours.
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import tifffile
from _common import fsim, psnr, ssim, to_uint8

from napari_emdiffuse.core.isotropic import interpolate, isotropic, plan_planes
from napari_emdiffuse.core.models import load_model
from napari_emdiffuse.core.tasks import Settings, drive

RESULTS = Path(__file__).parent / "results"


def binned(volume: np.ndarray, q: int) -> np.ndarray:
    """The volume binned q x q in y and x (its planes' spacing kept), as 8-bit."""
    if q == 1:
        return volume
    z, h, w = volume.shape
    v = volume[:, : h // q * q, : w // q * q].astype(np.float32)
    return to_uint8(np.round(v.reshape(z, h // q, q, w // q, q).mean(axis=(2, 4))))


def acquisition(volume: np.ndarray, factor: float):
    """Sections, the truth on the output grid and the output planes' positions (in sections) for factor p / q."""
    ratio = Fraction(factor).limit_denominator(16)
    p, q = ratio.numerator, ratio.denominator
    fine = binned(volume, q)
    sections = fine[::p]
    planes = plan_planes(len(sections), factor)
    truth = fine[[round(pl.index * q) for pl in planes]]  # output plane k is the volume's plane k q
    return sections, truth, planes


def cubic(sections: np.ndarray, planes) -> np.ndarray:
    from scipy.interpolate import CubicSpline

    positions = [pl.below + pl.fraction * (pl.above - pl.below) for pl in planes]
    spline = CubicSpline(np.arange(len(sections)), sections.astype(np.float64), axis=0)
    return spline(positions).astype(np.float32)


def scores(volume: np.ndarray, truth: np.ndarray, indices) -> dict:
    v = to_uint8(volume)
    per = [(psnr(v[i], truth[i]), ssim(v[i], truth[i]), fsim(v[i], truth[i])) for i in indices]
    p, s, f = np.mean(per, axis=0)
    return {"psnr": float(p), "ssim": float(s), "fsim": float(f), "planes": len(per)}


def margins(entry: dict, model: str) -> dict:
    return {f"over {b}": {k: round(entry[model][k] - entry[b][k], 4) for k in ("psnr", "ssim", "fsim")}
            for b in ("linear", "cubic", "motion") if b in entry}


def any_factor(volumes, factor: float, model, settings: Settings) -> dict:
    results: dict = {}
    for volume in volumes:
        sections, truth, planes = acquisition(volume, factor)
        made = [pl.index for pl in planes if not pl.acquired]
        started = time.perf_counter()
        restored = drive(isotropic(sections, model, settings, factor=factor))
        candidates = {"linear": interpolate(sections, factor), "cubic": cubic(sections, planes),
                      "motion": interpolate(sections, factor, "motion"), "vEMDiffuse-i": restored.image}
        for name, out in candidates.items():
            results.setdefault(name, []).append(scores(out, truth, made))
        results.setdefault("seconds", []).append(time.perf_counter() - started)
        results.setdefault("uncertainty_score", []).append(restored.info["uncertainty_score"])
    entry = {name: ({k: float(np.mean([r[k] for r in runs])) for k in runs[0]} if isinstance(runs[0], dict)
                    else float(np.mean(runs))) for name, runs in results.items()}
    entry["margins"] = margins(entry, "vEMDiffuse-i")
    entry["sections"], entry["output_planes"] = len(sections), len(planes)
    return entry


def repair(volumes, factor: int, runs: int, every: int, model, settings: Settings) -> dict:
    entry: dict = {}
    for volume in volumes:
        sections = volume[::factor]
        starts = list(range(every, len(sections) - runs - 1, every))
        bad = [s + i for s in starts for i in range(runs)]
        restored = drive(isotropic(sections, model, settings, factor=1, gap=factor, bad=bad))
        linear = interpolate(sections, 1, bad=bad)
        for name, out in (("linear", linear), ("vEMDiffuse-i", restored.image)):
            entry.setdefault(name, []).append(scores(out, sections, bad))
    entry = {name: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for name, rs in entry.items()}
    entry["margins"] = margins(entry, "vEMDiffuse-i")
    entry["bad_sections_per_volume"] = len(bad)
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/em"))
    parser.add_argument("--volume", default="fibsem_iso10nm_b_250.tif")
    parser.add_argument("--model", default="isotropic-fibsem")
    parser.add_argument("--factors", default="4,6,5.5,12.5")
    parser.add_argument("--repair", default="1,4", help="the z factors R of the stacks to repair sections in")
    parser.add_argument("--every", type=int, default=8, help="a bad run starts at every n-th section")
    parser.add_argument("--axes", type=int, default=1, help="use the first 1, 2 or 3 axes of the volume as z")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--out", default="serial_sections.json")
    args = parser.parse_args()
    volume = tifffile.imread(args.data / args.volume)
    volumes = [np.ascontiguousarray(np.moveaxis(volume, axis, 0)) for axis in range(args.axes)]
    model = load_model(args.model)
    settings = Settings(samples=args.samples)
    report = {"volume": args.volume, "model": args.model, "samples": args.samples, "axes": args.axes,
              "factors": {}, "repair": {}}
    for factor in [float(f) for f in args.factors.split(",") if f]:
        factor = int(factor) if factor == int(factor) else factor
        report["factors"][str(factor)] = entry = any_factor(volumes, factor, model, settings)
        print(factor, json.dumps(entry["margins"]), round(entry["vEMDiffuse-i"]["psnr"], 3), flush=True)
    for factor in [int(f) for f in args.repair.split(",") if f]:
        for runs in (1, 2):
            key = f"R={factor}, {runs} in a row"
            report["repair"][key] = entry = repair(volumes, factor, runs, args.every, model, settings)
            print(key, json.dumps(entry["margins"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
