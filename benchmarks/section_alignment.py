"""Section alignment of serial-section volumes (issue 35): shifted and rotated sections re-aligned.

    python benchmarks/section_alignment.py ../shared/data/em                 # alignment + misalignment measure
    python benchmarks/section_alignment.py ../shared/data/em --reconstruct   # + isotropic reconstruction (FIB-SEM b)

Each stack (the aligned ssTEM stack, 50 nm sections at 4 nm; FIB-SEM volume b, 10 nm isotropic and held out from
training, kept every 5th slice: sections 50 nm apart) has each section moved by a random rigid transform (up to
10 px and 1 degree, fixed seed), then the middle cropped (16 px margin: the moved sections' repeated edges are not
part of the truth). Residual per section: the RMS distance over the section's pixels between the found and the true
transform, after the one global rigid transform that best maps the aligned stack onto the truth's frame; also after
removing a steady drift along z (a shear), which no measurement on the stack can tell from oblique structures.
``--reconstruct``: isotropic reconstruction (bundled model, R = 5, one sample) of a 160 x 160 crop of the first
12 sections of FIB-SEM b, after alignment vs of the unshifted stack, PSNR of the generated slices against the truth.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_emdiffuse.core.align import _distance, _matrix, _params, align_sections, misalignment
from napari_emdiffuse.core.register import _affine_field, warp_image
from napari_emdiffuse.core.tasks import drive

RESULTS = Path(__file__).parent / "results"
MARGIN = 16


def shake(volume, seed=0, shift=10.0, rotation=1.0):
    rng = np.random.default_rng(seed)
    truth = np.array([_matrix((math.radians(rng.uniform(-rotation, rotation)), *rng.uniform(-shift, shift, 2)))
                      for _ in volume])
    moved = np.stack([np.clip(np.rint(warp_image(s, _affine_field(t[:2] - np.eye(3)[:2], s.shape))), 0, 255)
                      for s, t in zip(volume, truth)]).astype(volume.dtype)
    return moved[:, MARGIN:-MARGIN, MARGIN:-MARGIN], truth


def residuals(truth, found, shape, shear=False):
    composed = np.array([t @ m for t, m in zip(truth, found)])
    common = _matrix(np.mean([_params(c) for c in composed], axis=0))
    left = np.array([_params(np.linalg.inv(common) @ c) for c in composed])
    if shear:
        z = np.arange(len(left)) - (len(left) - 1) / 2
        left -= np.outer(z, z @ left / (z @ z))
    return _distance(left, shape)


def align_case(name, volume) -> dict:
    moved, truth = shake(volume)
    started = time.perf_counter()
    result = drive(align_sections(moved))
    seconds = time.perf_counter() - started
    r, rs = residuals(truth, result.transforms, moved.shape[1:]), residuals(truth, result.transforms,
                                                                           moved.shape[1:], shear=True)
    started = time.perf_counter()
    before = misalignment(moved)
    mis_seconds = time.perf_counter() - started
    out = {"stack": name, "shape": list(moved.shape), "seconds": round(seconds, 1),
           "residual_median_px": round(float(np.median(r)), 3), "residual_p95_px": round(float(np.percentile(r, 95)), 3),
           "residual_without_shear_median_px": round(float(np.median(rs)), 3),
           "residual_without_shear_p95_px": round(float(np.percentile(rs, 95)), 3),
           "report": result.report(),
           "misalignment_aligned_truth": misalignment(volume[:, MARGIN:-MARGIN, MARGIN:-MARGIN]).summary(),
           "misalignment_shifted": before.summary(), "misalignment_seconds": round(mis_seconds, 2),
           "misalignment_after_alignment": misalignment(result.volume).summary()}
    print(json.dumps(out), flush=True)
    return out


def reconstruct_case(volume) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import psnr

    from napari_emdiffuse.core.isotropic import isotropic
    from napari_emdiffuse.core.tasks import Settings

    truth = volume[:56, 45:45 + 160 + 2 * MARGIN, 45:45 + 160 + 2 * MARGIN]
    kept = truth[::5]
    moved, _ = shake(kept, seed=1)
    aligned = drive(align_sections(moved)).volume
    truth = truth[:, MARGIN:-MARGIN, MARGIN:-MARGIN]
    out = {}
    for label, stack in (("unshifted", kept[:, MARGIN:-MARGIN, MARGIN:-MARGIN]), ("aligned", aligned),
                         ("shifted", moved)):
        image = drive(isotropic(stack, None, Settings(samples=1), factor=5)).image
        out[label] = round(float(np.mean([psnr(image[z], truth[z]) for z in range(len(image)) if z % 5])), 3)
    print(json.dumps(out), flush=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--reconstruct", action="store_true")
    parser.add_argument("--stacks", default="fibsem_b,sstem")
    parser.add_argument("--out", default="section_alignment.json")
    args = parser.parse_args()
    loaders = {"fibsem_b": lambda: tifffile.imread(args.data / "fibsem_iso10nm_b_250.tif")[::5],
               "sstem": lambda: tifffile.imread(args.data / "sstem_aniso_50x4x4nm_30x512x512.tif")}
    results = {"alignment": [align_case(n, loaders[n]()) for n in args.stacks.split(",")]}
    if args.reconstruct:
        results["reconstruction_psnr_db"] = reconstruct_case(tifffile.imread(args.data / "fibsem_iso10nm_b_250.tif"))
    (RESULTS / args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
