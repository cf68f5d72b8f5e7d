"""Alignment of the sections of a serial-section volume (z, y, x), and a quick measure of how misaligned it looks.

Sections cut and imaged one by one are each shifted and slightly rotated; structures then jump between
neighbouring sections and an isotropic reconstruction interpolates the jumps. The sections are aligned rigidly
(translation and rotation), optionally followed by a smooth elastic correction:

1. each section is measured against its neighbours at distances 1, 2 and 3 (:mod:`.register`'s stages on lightly
   smoothed sections, since EM structures change from section to section: a translation by cross-correlation, a
   robust fit of block displacements, then a robust fit of gradient-based block shifts, unbiased near zero), and
   the rigid fit of each pair kept;
2. the per-section transforms are solved jointly from all pairs (weighted least squares with Tukey weights, so a
   pair the content change misled does not pull), the stack's mean transform fixed: measuring against several
   neighbours keeps one section's error from carrying on to all after it (drift), and the stack as a whole does
   not move;
3. the first round on sections halved in size (large motions, found quickly); then measured again at full
   resolution on the stack so aligned (gradient-based block shifts only: the motions are small now) and solved
   again, so what is left of the first round's coarseness and linearisation goes;
4. (optional) each section's smooth displacement field towards its neighbours at distances 1 and 2 (the median of
   the four fields: one badly distorted neighbour does not pull), by :mod:`.register`'s distortion field;
5. each section moved by cubic interpolation, edges repeated; :attr:`Alignment.valid` is the region every section
   covers.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np

from .normalize import InputError, check_image
from .register import (
    _affine_field,
    _blocks,
    _distortion,
    _fit_affine,
    _smooth,
    _valid_crop,
    global_affine,
    local_shifts,
    warp_image,
)
from .tasks import Progress

NEIGHBOURS = (1, 2, 3)  # each section is measured against those this many sections away
ROUNDS = 2  # measure, solve, move; then again on the moved stack
SMOOTH = 2.0  # px: sections are compared smoothed (fine detail changes from one section to the next)
MIN_SIDE = 64  # px: smaller sections have too few blocks to measure a rotation
COURSE_BEND = 0.3  # the structures' course bends per section by this fraction of the pairs' noise: stiffer keeps
# more of the sections' own misplacement out of the course (median residual on 50 synthetic sections 0.59 px at 1,
# 0.51 at 0.3, 0.49 at 0.1: the pairs' noise dominates)
UNMOVED = 0.05  # px: a section moved by less at every pixel is kept as it is (not resampled)
ELASTIC_NEIGHBOURS = (-2, -1, 1, 2)


@dataclass
class Alignment:
    volume: np.ndarray  # the aligned stack, dtype and shape of the input
    moves: np.ndarray  # (z, 3): how each section was moved, (dy, dx) of its centre in px and rotation in degrees
    valid: tuple[slice, slice]  # the (y, x) region every aligned section covers (outside it, edges are repeated)
    elastic: np.ndarray | None = None  # (z,) largest elastic displacement per section, px (None: rigid only)
    transforms: np.ndarray = field(default=None, repr=False)  # (z, 3, 3): section(p) read at M p, centred (y, x)

    def summary(self) -> dict:
        shifts = np.hypot(self.moves[:, 0], self.moves[:, 1])
        rotations = np.abs(self.moves[:, 2])
        moved = _moved(self.transforms, self.volume.shape[1:])
        if self.elastic is not None:
            moved |= self.elastic > UNMOVED
        out = {"sections": len(self.moves), "moved": int(moved.sum()),
               "shift_median_px": round(float(np.median(shifts)), 3), "shift_max_px": round(float(shifts.max()), 3),
               "shift_max_section": int(shifts.argmax()), "rotation_max_deg": round(float(rotations.max()), 4),
               "valid": [[self.valid[0].start, self.valid[0].stop], [self.valid[1].start, self.valid[1].stop]]}
        if self.elastic is not None:
            out.update(elastic_median_px=round(float(np.median(self.elastic)), 3),
                       elastic_max_px=round(float(self.elastic.max()), 3))
        return out

    def report(self) -> str:
        """One line: what the alignment moved."""
        s = self.summary()
        text = (f"moved {s['moved']} of {s['sections']} sections: median {s['shift_median_px']:.1f} px, largest "
                f"{s['shift_max_px']:.1f} px at section {s['shift_max_section']}, rotations up to "
                f"{s['rotation_max_deg']:.2f}°")
        if self.elastic is not None:
            text += f"; elastic correction median {s['elastic_median_px']:.1f} px, up to {s['elastic_max_px']:.1f} px"
        (y0, y1), (x0, x1) = s["valid"]
        h, w = self.volume.shape[1:]
        if (y1 - y0, x1 - x0) != (h, w):
            text += f"; every section covers y {y0}-{y1}, x {x0}-{x1}"
        return text


def check_stack(volume) -> np.ndarray:
    """The volume as an array, or :class:`InputError` with one sentence."""
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise InputError(f"Section alignment needs a volume (z, y, x), not an image of {arr.ndim} dimensions.")
    arr = check_image(arr, (3,))
    if len(arr) < 2:
        raise InputError("Section alignment needs at least 2 sections.")
    if min(arr.shape[1:]) < MIN_SIDE:
        raise InputError(f"The sections are too small to be aligned (at least {MIN_SIDE} pixels along each side, "
                         f"not {arr.shape[1]} x {arr.shape[2]}).")
    return arr


# --- rigid transforms: 3 x 3 matrices in centred (y, x) coordinates, or (rotation in radians, ty, tx) -------------

def _matrix(params) -> np.ndarray:
    theta, ty, tx = params
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, ty], [s, c, tx], [0.0, 0.0, 1.0]])


def _params(matrix: np.ndarray) -> np.ndarray:
    m = matrix[:2, :2]
    return np.array([math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]), matrix[0, 2], matrix[1, 2]])


def _rigid(affine: np.ndarray) -> np.ndarray:
    """The rotation and translation of an affine displacement (2, 3) (:mod:`.register`'s ``d = A (p - c, 1)``)."""
    return _params(np.vstack([affine + np.hstack([np.eye(2), np.zeros((2, 1))]), [0, 0, 1]]))


def _displacement(matrix: np.ndarray) -> np.ndarray:
    return matrix[:2] - np.hstack([np.eye(2), np.zeros((2, 1))])


def _lever(shape) -> float:
    """The RMS distance of a section's pixels from its centre: a rotation by t radians moves them t times it."""
    return math.sqrt((shape[0] ** 2 + shape[1] ** 2) / 12)


def _distance(params: np.ndarray, shape) -> np.ndarray:
    """RMS displacement over a section's pixels of (..., 3) small rigid motions (px)."""
    return np.sqrt(params[..., 1] ** 2 + params[..., 2] ** 2 + (params[..., 0] * _lever(shape)) ** 2)


def _moved(transforms: np.ndarray, shape) -> np.ndarray:
    corners = np.array([[y, x, 1.0] for y in (-shape[0] / 2, shape[0] / 2) for x in (-shape[1] / 2, shape[1] / 2)])
    return np.array([np.abs(corners @ (m - np.eye(3)).T).max() > UNMOVED for m in transforms])


def _block_size(shape) -> int:
    """Blocks for cross-correlation: 128 px, smaller on small sections (at least 3 x 3 blocks half overlapping)."""
    return int(min(128, max(32, min(shape) // 2 // 16 * 16)))


def pair_motion(a: np.ndarray, b: np.ndarray, refine: int = 2, coarse: bool = True) -> np.ndarray:
    """Rigid motion (rotation in radians, dy, dx at the centre) with ``b(M p) ~ a(p)``, of two smoothed sections.

    With ``coarse``, :func:`.register.global_affine` first (cross-correlation: large displacements; without, the
    pair is taken as nearly aligned already), then ``refine`` robust fits of gradient-based block shifts (unbiased
    near zero); the affine fits keep only their rotation and translation.
    """
    size = _block_size(a.shape)
    params = _rigid(global_affine(a, b, (size, size))) if coarse else np.zeros(3)
    block = size // 2
    corners = _blocks(a.shape, block, block // 2)
    centres = corners + (block - 1) / 2
    offsets = np.column_stack([centres - (np.array(a.shape) - 1) / 2, np.ones(len(centres))])
    for _ in range(refine):
        affine = _displacement(_matrix(params))
        r, weight = local_shifts(a, b, corners, block, _affine_field(affine, a.shape))
        if (weight > 0).sum() < 6:
            break
        params = _rigid(_fit_affine(centres, offsets @ affine.T + r, weight, a.shape))
    return params


def pair_agreement(a: np.ndarray, b: np.ndarray, params: np.ndarray) -> float:
    """Pearson correlation of two smoothed sections once ``b`` is moved by ``params`` (on the middle half)."""
    moved = warp_image(b, _affine_field(_displacement(_matrix(params)), a.shape), order=1)
    h, w = a.shape
    inner = (slice(h // 4, h - h // 4), slice(w // 4, w - w // 4))
    return float(np.corrcoef(a[inner].ravel(), moved[inner].ravel())[0, 1])


def solve_sections(n: int, pairs: list[tuple[int, int]], motions: np.ndarray, shape,
                   trust: np.ndarray | None = None) -> np.ndarray:
    """Per-section rigid corrections (n, 3) from the pairs' motions ``motions[k]`` from section ``i`` to ``j``.

    The position of section ``i`` along the stack is ``X[i] + s[i]``: ``X`` the course of the structures, which
    run obliquely through the volume and so move between aligned sections too, but steadily (a smooth function of
    z: its second differences small); ``s`` the section's own misplacement, independent from one section to the
    next. The sections are corrected by ``s`` only (else the stack would be sheared along its structures).
    Both are solved jointly by least squares (a straight course is free), with the scales of the three terms
    measured on the stack: how much the pairs disagree (Tukey weights on it, so a pair the content change misled
    does not pull), and how much more the positions jump than that.
    """
    lever = np.array([_lever(shape), 1.0, 1.0])  # rotations as the px they move the section's pixels by
    d = motions * lever
    incidence = np.zeros((len(pairs), n))
    for k, (i, j) in enumerate(pairs):
        incidence[k, i], incidence[k, j] = -1.0, 1.0
    mean = np.ones((1, n)) / n
    # first the positions the pairs alone give (robustly), and how much the pairs disagree
    trust = np.ones(len(pairs)) if trust is None else trust
    weights = trust.copy()
    design = np.vstack([incidence, mean])
    for _ in range(10):
        sw = np.sqrt(np.append(weights, 1.0))[:, None]
        positions = np.linalg.lstsq(design * sw, np.vstack([d, np.zeros((1, 3))]) * sw, rcond=None)[0]
        error = np.sqrt(((incidence @ positions - d) ** 2).sum(axis=1))
        noise = max(1.4826 * np.median(error[weights > 0]), 0.05)
        new = trust * np.clip(1 - (error / (4.685 * noise)) ** 2, 0, None) ** 2
        if _connected(n, pairs, new > 0):
            weights = new
    if n < 3:
        return positions / lever
    # the sections' own jumps: the second differences of the positions beyond what the pairs' noise explains, per
    # parameter (a section is typically shifted by many pixels but rotated by a degree: one scale for both would let
    # the rotation's course leak into its correction)
    jumps = 1.4826 * np.median(np.abs(np.diff(positions, 2, axis=0)), axis=0)
    misplaced = np.sqrt(np.clip(jumps ** 2 / 6 - noise ** 2 / 3, 0.0, None))
    curvature = np.diff(np.eye(n), 2, axis=0)
    sw = np.sqrt(weights)[:, None] / noise
    corrections = np.zeros((n, 3))
    for k in np.flatnonzero(misplaced >= 0.01):
        design = np.block([[incidence * sw, incidence * sw],
                           [curvature / (noise * COURSE_BEND), np.zeros_like(curvature)],
                           [np.zeros((n, n)), np.eye(n) / misplaced[k]],
                           [mean, np.zeros((1, n))]])
        rhs = np.concatenate([d[:, k] * sw[:, 0], np.zeros(len(curvature) + n + 1)])
        corrections[:, k] = np.linalg.lstsq(design, rhs, rcond=None)[0][n:]
    return corrections / lever


def _trust(pairs, agreement: np.ndarray) -> np.ndarray:
    """How far to trust each pair's motion: sections further apart share less structure, and a pair whose
    agreement after alignment falls below half the typical neighbours' is left out (its motion is a guess)."""
    near = np.median([c for (i, j), c in zip(pairs, agreement) if j - i == 1])
    trust = np.clip(agreement, 0, None) ** 2 * (agreement > near / 2)
    chain = np.array([j - i == 1 for i, j in pairs])
    trust[chain] = np.maximum(trust[chain], 1e-3)  # every section stays linked to the next
    return trust


def _connected(n: int, pairs, keep) -> bool:
    """Whether the pairs kept still link every section to every other (else the solution is undetermined)."""
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for (i, j), k in zip(pairs, keep):
        if k:
            parent[root(i)] = root(j)
    return len({root(i) for i in range(n)}) == 1


def _halved(section: np.ndarray, factor: int) -> np.ndarray:
    """The section's means over ``factor`` x ``factor`` pixels (an odd last row or column dropped)."""
    if factor == 1:
        return section
    h, w = (np.array(section.shape) // factor * factor)
    return section[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _move(section: np.ndarray, displacement: np.ndarray, dtype) -> np.ndarray:
    moved = warp_image(section, displacement)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(moved), info.min, info.max).astype(dtype)
    return moved.astype(dtype)


def align_sections(volume, elastic: bool = False) -> Generator[Progress, None, Alignment]:
    """Align each section of ``volume`` (z, y, x) to its neighbours; see the module's description."""
    volume = check_stack(volume)
    n, shape = len(volume), volume.shape[1:]
    pairs = [(i, i + d) for d in NEIGHBOURS for i in range(n - d)]
    total = ROUNDS * len(pairs) + (len(ELASTIC_NEIGHBOURS) * n if elastic else 0) + n
    done = 0
    smooth = np.stack([_smooth(s, SMOOTH) for s in volume])
    # the first round on sections halved in size (large motions, found quickly), the others at full resolution
    factor = 2 if min(shape) >= 2 * MIN_SIDE else 1
    transforms = np.tile(np.eye(3), (n, 1, 1))
    for round_ in range(ROUNDS):
        if round_ == 0:
            moved = np.stack([_halved(s, factor) for s in smooth])
        else:
            moved = np.stack([warp_image(s, _affine_field(_displacement(m), shape))
                              for s, m in zip(smooth, transforms)])
        scale = np.array([1.0, factor, factor]) if round_ == 0 else np.ones(3)
        motions, agreement = [], []
        for i, j in pairs:
            motions.append(pair_motion(moved[i], moved[j], coarse=round_ == 0))
            agreement.append(pair_agreement(moved[i], moved[j], motions[-1]))
            motions[-1] = motions[-1] * scale
            done += 1
            yield Progress(done, total, f"measuring sections {i} and {j}")
        corrections = solve_sections(n, pairs, np.array(motions), shape, _trust(pairs, np.array(agreement)))
        transforms = np.array([m @ _matrix(c) for m, c in zip(transforms, corrections)])
    mean = _matrix(np.mean([_params(m) for m in transforms], axis=0))  # the stack as a whole does not move
    transforms = np.array([m @ np.linalg.inv(mean) for m in transforms])
    fields = np.stack([_affine_field(_displacement(m), shape) for m in transforms])

    sizes = None
    if elastic:
        rigid = np.stack([warp_image(s, f) for s, f in zip(smooth, fields)])
        extra = np.zeros_like(fields)
        for i in range(n):
            towards = []
            for d in ELASTIC_NEIGHBOURS:
                if 0 <= i + d < n:
                    towards.append(_distortion(rigid[i + d], rigid[i], np.zeros_like(fields[i])))
                done += 1
                yield Progress(done, total, f"elastic correction of section {i}")
            extra[i] = np.median(towards, axis=0)
        extra -= extra.mean(axis=0)  # the stack as a whole is not deformed
        sizes = np.hypot(extra[:, 0], extra[:, 1]).max(axis=(1, 2))
        # section(M (p + e(p))): the rigid field plus e turned by the section's rotation
        fields = fields + np.einsum("zij,zjyx->ziyx", transforms[:, :2, :2], extra)

    out = np.empty_like(volume)
    keep = ~_moved(transforms, shape) & (sizes is None or sizes <= UNMOVED)
    valid = (slice(0, shape[0]), slice(0, shape[1]))
    for i in range(n):
        if keep[i]:
            out[i] = volume[i]
        else:
            out[i] = _move(volume[i], fields[i], volume.dtype)
            ys, xs = _valid_crop(fields[i])
            valid = (slice(max(valid[0].start, ys.start), min(valid[0].stop, ys.stop)),
                     slice(max(valid[1].start, xs.start), min(valid[1].stop, xs.stop)))
        done += 1
        yield Progress(done, total, f"moving section {i}")
    moves = np.array([_section_move(m) for m in transforms])
    return Alignment(out, moves, valid, sizes, transforms)


def _section_move(matrix: np.ndarray) -> tuple[float, float, float]:
    """How the section's content moved: (dy, dx) of its centre, px, and its rotation, degrees."""
    theta, _, _ = _params(matrix)
    centre = -matrix[:2, :2].T @ matrix[:2, 2]
    return float(centre[0]), float(centre[1]), -math.degrees(theta)


# --- how misaligned a stack looks -------------------------------------------------------------------------------

# px: median jump off the neighbours' course above which a stack looks misaligned. Measured (benchmarks/
# section_alignment.py) on FIB-SEM b, every 5th slice (50 x 218 x 218): 0.89 as acquired, 0.58 once aligned; copies
# shaken by up to 0.5 / 1 / 2 / 3 / 10 px (and a tenth as many degrees): 0.88 / 1.14 / 2.08 / 2.96 / 9.0. The ssTEM
# stack (30 x 480 x 480) measures 4.8 as given (its sections jump by up to 24 px: it warns, rightly or not) and 4.6-5.7
# shaken by up to 3 px: on it the measure cannot tell small shakes. 2.6 CPU s on 30 x 512 x 512.
WARN_JUMP = 1.5


@dataclass
class Misalignment:
    motions: np.ndarray  # (z - 1, 3): rigid motion from each section to the next, (dy, dx) px and rotation degrees
    jumps: np.ndarray  # (z,): how far each section lies off the course of its two neighbours, px (RMS over pixels)

    @property
    def typical(self) -> float:
        return float(np.median(self.jumps))

    @property
    def warning(self) -> str | None:
        """A sentence when the stack looks misaligned, else None."""
        if self.typical <= WARN_JUMP:
            return None
        worst = int(np.argmax(self.jumps))
        return (f"The stack looks misaligned: its sections jump off their neighbours' course by "
                f"{self.typical:.1f} px (median; {self.jumps[worst]:.1f} px at section {worst}); align the sections "
                "first.")

    def summary(self) -> dict:
        return {"jump_median_px": round(self.typical, 3), "jump_max_px": round(float(self.jumps.max()), 3),
                "jump_max_section": int(np.argmax(self.jumps)), "warning": self.warning}


def misalignment(volume) -> Misalignment:
    """How misaligned a stack looks, quickly: the rigid motion between neighbouring sections (on sections halved
    in size when they are large), and how far each section jumps off the course of its two neighbours.

    Structures running obliquely through the volume move between aligned sections too, but steadily: what a
    section's neighbours agree on is taken as the structures' course, the jump off it as misalignment (the second
    difference of the sections' positions; for independent shifts of standard deviation s per axis, about
    1.2 s along each axis).
    """
    volume = check_stack(volume)
    shape = volume.shape[1:]
    factor = 2 if min(shape) >= 4 * MIN_SIDE else 1

    def section(i):
        return _smooth(_halved(volume[i].astype(np.float64), factor), SMOOTH / factor)

    below = section(0)
    motions = []
    for i in range(1, len(volume)):
        above = section(i)
        motions.append(pair_motion(below, above, refine=1) * [1.0, factor, factor])
        below = above
    motions = np.array(motions)
    positions = np.vstack([np.zeros(3), np.cumsum(motions, axis=0)])
    if len(volume) < 3:
        jumps = np.full(len(volume), float(_distance(motions[0], shape)))
    else:
        off = positions[1:-1] - (positions[:-2] + positions[2:]) / 2
        inner = _distance(off, shape)
        jumps = np.concatenate([[inner[0]], inner, [inner[-1]]])  # an end section: the next one's course
    degrees = np.column_stack([motions[:, 1], motions[:, 2], np.degrees(motions[:, 0])])
    return Misalignment(degrees, jumps)
