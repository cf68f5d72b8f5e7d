"""False positives and recall of the suspect-section detector (core.sections.suspect_sections) on real stacks.

    OMP_NUM_THREADS=1 flock /tmp/cpu-heavy.lock nice -n 5 python benchmarks/section_detector.py ../shared/data/em

The clean stacks are the ssTEM stack and the two isotropic FIB-SEM volumes decimated to every 5th slice (50 nm
sections, as a serial-section acquisition sees them): every proposal on them is a false positive. Each kind of damage
is then made, at several sizes, on a copy of ``--window`` consecutive sections of a clean stack (random place) at a
random interior section (fixed seed, ``--trials`` per kind, size and stack); it is found when the detector proposes that section (a replaced run of two: both), and
for local damage the proposed region must cover most of the damaged area. Proposals elsewhere on damaged copies are
counted too. Writes benchmarks/results/section_detector.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_emdiffuse.core.sections import suspect_sections

STACKS = {"sstem": ("sstem_aniso_50x4x4nm_30x512x512.tif", 1),
          "fibsem_a": ("fibsem_iso10nm_a_250.tif", 5), "fibsem_b": ("fibsem_iso10nm_b_250.tif", 5)}


def _half_plane(shape, fraction, rng) -> np.ndarray:
    """A part of the section cut off by a straight line at a random angle, of about ``fraction`` of its area."""
    if fraction >= 1:
        return np.ones(shape, bool)
    y, x = np.mgrid[: shape[0], : shape[1]]
    angle = rng.uniform(0, 2 * np.pi)
    along = (x - shape[1] / 2) * np.cos(angle) + (y - shape[0] / 2) * np.sin(angle)
    return along >= np.quantile(along, 1 - fraction)


def _blob(shape, fraction, rng) -> np.ndarray:
    """An ellipse of about ``fraction`` of the section at a random place inside it."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    ratio = rng.uniform(0.6, 1.6)
    ry = np.sqrt(fraction * shape[0] * shape[1] / np.pi * ratio)
    rx = fraction * shape[0] * shape[1] / np.pi / ry
    cy = rng.uniform(min(ry, shape[0] / 2), max(shape[0] - ry, shape[0] / 2))
    cx = rng.uniform(min(rx, shape[1] / 2), max(shape[1] - rx, shape[1] / 2))
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _lines(shape, width, rng, count=1, spacing=(40, 90)) -> np.ndarray:
    """``count`` parallel straight bands ``width`` pixels wide across the whole section at a random angle."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    angle = rng.uniform(0, np.pi)
    across = (x - shape[1] / 2) * np.cos(angle) + (y - shape[0] / 2) * np.sin(angle)
    start = rng.uniform(-0.3, 0.3) * min(shape)
    offsets = start + np.concatenate([[0], np.cumsum(rng.uniform(*spacing, count - 1))])
    offsets -= (offsets.mean() - start)
    return np.any([np.abs(across - o) < width / 2 for o in offsets], axis=0)


def damage(volume: np.ndarray, kind: str, size, index: int, rng, elsewhere: np.ndarray
           ) -> tuple[np.ndarray, list[int], np.ndarray | None]:
    """A damaged copy of the stack, the damaged sections and (for local damage) the damaged area; ``elsewhere``
    gives sections from far away (a misordered section)."""
    out = volume.copy()
    section = out[index].astype(np.float32)
    top = np.iinfo(volume.dtype).max
    if kind == "noise":  # lost sections, replaced by noise of the same grey levels
        for i in range(index, index + size):
            out[i] = np.clip(rng.normal(section.mean(), section.std(), section.shape), 0, top)
        return out, list(range(index, index + size)), None
    if kind == "foreign":  # sections from elsewhere in the stack (misordered)
        for i in range(index, index + size):
            out[i] = elsewhere[i - index]
        return out, list(range(index, index + size)), None
    if kind == "blank":  # a part of the section lost, filled with one grey value
        area = _half_plane(section.shape, size, rng)
        section[area] = rng.choice([0.0, float(np.median(section))])
    elif kind == "saturated":
        area = _blob(section.shape, size, rng)
        section[area] = top
    elif kind == "fold":  # a dark band: the section folded over itself
        area = _lines(section.shape, size, rng)
        section[area] *= 0.5
    elif kind == "crack":  # a bright band: the section torn, the support film shows
        area = _lines(section.shape, size, rng)
        section[area] = 0.85 * top + 0.15 * section[area]
    elif kind == "knife":  # knife marks: several thin parallel stripes, darker by ``size``
        area = _lines(section.shape, 2, rng, count=5)
        section[area] *= 1 - size
    else:
        raise ValueError(kind)
    out[index] = np.clip(np.rint(section), 0, top).astype(volume.dtype)
    return out, [index], area


KINDS = {"noise": [1, 2], "foreign": [1, 2], "blank": [0.02, 0.05, 0.15, 0.4, 1.0],
         "saturated": [0.02, 0.05, 0.15, 0.4], "fold": [2, 4, 8, 16], "crack": [2, 4, 8], "knife": [0.3, 0.5, 0.7]}


def load(folder: Path) -> dict[str, np.ndarray]:
    return {name: tifffile.imread(folder / file)[::step] for name, (file, step) in STACKS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path("../shared/data/em"))
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--window", type=int, default=15, help="sections of the stack around each damage looked at")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "section_detector.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    stacks = load(args.folder)
    clean, seconds = {}, {}
    for name, volume in stacks.items():
        start = time.perf_counter()
        found = suspect_sections(volume)
        seconds[name] = round(time.perf_counter() - start, 2)
        clean[name] = [{"index": s.index, "reason": s.reason, "score": round(s.score, 2)} for s in found]
        print(name, volume.shape, f"{seconds[name]} s", clean[name], flush=True)
    recall, misses, extra = {}, [], 0
    for kind in args.kinds:
        recall[kind] = {}
        for size in KINDS[kind]:
            hits = trials = 0
            for name, stack in stacks.items():
                for _ in range(args.trials):
                    start = int(rng.integers(0, len(stack) - args.window + 1))
                    volume = stack[start:start + args.window]
                    index = int(rng.integers(2, len(volume) - 4))
                    far = (start + index + len(stack) // 2) % (len(stack) - 2)
                    damaged, truth, area = damage(volume, kind, size, index, rng, stack[far:far + 2])
                    found = {s.index: s for s in suspect_sections(damaged)}
                    ok = all(i in found for i in truth)
                    if ok and area is not None:
                        region = found[index].region
                        ok = region is None or region[area].mean() >= 0.8
                    hits, trials = hits + ok, trials + 1
                    extra += len(set(found) - set(truth))
                    if not ok:
                        misses.append({"stack": name, "kind": kind, "size": size, "index": start + index,
                                       "found": {i: s.reason for i, s in found.items()}})
            recall[kind][str(size)] = round(hits / trials, 3)
            print(kind, size, recall[kind][str(size)], flush=True)
            write(args, stacks, clean, seconds, recall, extra, misses)


def write(args, stacks, clean, seconds, recall, extra, misses) -> None:
    """The results so far (written after every size: a long run interrupted still leaves its figures)."""
    result = {
        "clean_stacks": {name: {"shape": list(v.shape), "false_positives": len(clean[name]), "proposed": clean[name],
                                "seconds": seconds[name]} for name, v in stacks.items()},
        "recall": recall,
        "trials_per_kind_size": args.trials * len(stacks),
        "window": f"each damaged copy is {args.window} consecutive sections of a stack around the damage",
        "proposals_elsewhere_on_damaged_copies": extra,
        "misses": misses,
        "sizes": "noise, foreign: consecutive sections replaced; blank, saturated: fraction of the section; fold, "
                 "crack: band width in pixels; knife: 5 stripes 2 px wide, darker by this fraction",
        "machine": f"{platform.machine()}, 2 cores shared with other jobs, OMP_NUM_THREADS=1",
        "date": time.strftime("%Y-%m-%d"),
        "command": "OMP_NUM_THREADS=1 flock /tmp/cpu-heavy.lock nice -n 5 python benchmarks/section_detector.py "
                   f"../shared/data/em --trials {args.trials} --window {args.window} --kinds {' '.join(args.kinds)}",
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
