"""Section alignment of serial-section volumes (issue 35): shifted and rotated sections re-aligned.

    python benchmarks/section_alignment.py ../shared/data/em                 # alignment + misalignment measure
    python benchmarks/section_alignment.py ../shared/data/em --reconstruct   # + isotropic reconstruction (FIB-SEM b)

Each stack (the aligned ssTEM stack, 50 nm sections at 4 nm; FIB-SEM volume b, 10 nm isotropic and held out from
training, kept every 5th slice: sections 50 nm apart) has each section moved by a random rigid transform (up to
10 px and 1 degree, fixed seed), then the middle cropped (16 px margin: the moved sections' repeated edges are not
part of the truth). Residual per section: the RMS distance over the section's pixels between the found and the true
transform, (a) "global": after the one global rigid transform that best maps the aligned stack onto the truth's frame;
(b) "trend": after also removing a smooth trend along z (a cubic in z, per parameter, least squares). Both are
reported because structures run obliquely through tissue, so aligned sections move between neighbours too, steadily;
the alignment keeps such a smooth course (correcting it would shear the volume along its structures), and no
measurement on the stack can tell the smooth part of the random shifts from it: (a) includes that part, (b) is what
the method could have corrected. Two truths: "given", the stack as it comes (the ssTEM stack's own sections jump by
up to ~20 px in places: from its alignment or the structures themselves, unknown), and "own", the alignment the
method gives the unshaken stack (how well a shake is undone, whatever the stack's own state).
Times: wall-clock seconds and the process's CPU seconds (one thread: OMP_NUM_THREADS=1; the CPU seconds are what
an otherwise idle core would take when the machine is shared).
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

from napari_emdiffuse._tests.test_align import sections
from napari_emdiffuse.core.align import _distance, _matrix, _params, align_sections, misalignment
from napari_emdiffuse.core.register import _affine_field, warp_image
from napari_emdiffuse.core.tasks import drive

RESULTS = Path(__file__).parent / "results"
MARGIN = 16
WARN_AMPLITUDES = (0.5, 1.0, 2.0, 3.0, 10.0)
TREND_DEGREE = 3  # the smooth trend along z that no method can tell from the structures' own course


def shake(volume, seed=0, shift=10.0, rotation=1.0):
    rng = np.random.default_rng(seed)
    truth = np.array([_matrix((math.radians(rng.uniform(-rotation, rotation)), *rng.uniform(-shift, shift, 2)))
                      for _ in volume])
    moved = np.stack([np.clip(np.rint(warp_image(s, _affine_field(t[:2] - np.eye(3)[:2], s.shape))), 0, 255)
                      for s, t in zip(volume, truth)]).astype(volume.dtype)
    return moved[:, MARGIN:-MARGIN, MARGIN:-MARGIN], truth


def residuals(truth, found, shape, trend=False):
    """Per section, the RMS distance (px) over its pixels between the found and the true transform: (a) after the
    one global rigid transform that best maps the aligned stack onto the truth's frame; (b) with ``trend``, also
    after a smooth trend along z (a cubic in z per parameter, fitted by least squares) is removed."""
    composed = np.array([t @ m for t, m in zip(truth, found)])
    common = _matrix(np.mean([_params(c) for c in composed], axis=0))
    left = np.array([_params(np.linalg.inv(common) @ c) for c in composed])
    if trend:
        z = np.vander(np.linspace(-1, 1, len(left)), TREND_DEGREE + 1)
        left -= z @ np.linalg.lstsq(z, left, rcond=None)[0]
    return _distance(left, shape)


def align_case(name, volume) -> dict:
    moved, truth = shake(volume)
    started, cpu = time.perf_counter(), time.process_time()
    result = drive(align_sections(moved))
    out = {"stack": name, "shape": list(moved.shape), "seconds": round(time.perf_counter() - started, 1),
           "cpu_seconds": round(time.process_time() - cpu, 1), "report": result.report()}
    # the stack as given is the truth; and the alignment the method gives the unshaken stack is (see the docstring)
    own = drive(align_sections(volume[:, MARGIN:-MARGIN, MARGIN:-MARGIN]))
    for label, reference in (("given", truth), ("own", np.linalg.inv(own.transforms) @ truth)):
        for trend in (False, True):
            r = residuals(reference, result.transforms, moved.shape[1:], trend)
            key = f"residual_vs_{label}_{'trend' if trend else 'global'}"
            out.update({f"{key}_median_px": round(float(np.median(r)), 3), f"{key}_p95_px": round(float(np.percentile(r, 95)), 3)})
    out["unshaken_report"] = own.report()
    out["misalignment_after_alignment"] = misalignment(result.volume).summary()
    print(json.dumps(out), flush=True)
    return out


def warning_case(name, volume) -> dict:
    """The misalignment measure on the stack as acquired and on copies shaken by up to ``a`` px and a / 10 degrees."""
    inner = volume[:, MARGIN:-MARGIN, MARGIN:-MARGIN]
    started, cpu = time.perf_counter(), time.process_time()
    out = {"stack": name, "shape": list(inner.shape), "as_acquired": misalignment(inner).summary(),
           "seconds": round(time.perf_counter() - started, 2), "cpu_seconds": round(time.process_time() - cpu, 2)}
    for amplitude in WARN_AMPLITUDES:
        out[f"shaken_{amplitude}px"] = misalignment(shake(volume, 2, amplitude, amplitude / 10)[0]).summary()
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
    parser.add_argument("--stacks", default="synthetic,fibsem_b,sstem")
    parser.add_argument("--out", default="section_alignment.json")
    args = parser.parse_args()
    loaders = {"fibsem_b": lambda: tifffile.imread(args.data / "fibsem_iso10nm_b_250.tif")[::5],
               "sstem": lambda: tifffile.imread(args.data / "sstem_aniso_50x4x4nm_30x512x512.tif"),
               "synthetic": lambda: np.rint(sections(n=50, side=250 + 2 * MARGIN) * 255).astype(np.uint8)}
    results = {"alignment": [], "warning": []}
    save = lambda: (RESULTS / args.out).write_text(json.dumps(results, indent=1) + "\n")  # noqa: E731
    if args.reconstruct:  # first: the longest, and every case is saved as soon as it is measured
        results["reconstruction_psnr_db"] = reconstruct_case(tifffile.imread(args.data / "fibsem_iso10nm_b_250.tif"))
        save()
    for name in args.stacks.split(","):
        volume = loaders[name]()
        results["alignment"].append(align_case(name, volume))
        save()
        if name != "synthetic":
            results["warning"].append(warning_case(name, volume))
            save()

if __name__ == "__main__":
    main()
