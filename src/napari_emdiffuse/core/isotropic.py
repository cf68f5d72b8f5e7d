"""Isotropic reconstruction of anisotropic volumes: vEMDiffuse-i and vEMDiffuse-a.

A volume acquired every R-th slice (z spacing R times the lateral pixel) becomes a volume of ``(Z - 1) * R + 1``
slices: the acquired slices stay at every R-th position and each of the R - 1 slices between two acquired ones is
sampled, conditioned on its two neighbours (two channels). The model's label says which slice of which gap, as
``"R:j"`` (see :func:`label_of`), so one model serves every factor and position it was trained for. Sampling starts
from an interpolation of the two neighbours plus noise, as denoising starts from the noisy image: the model's
``"start"`` says which, ``"linear"`` or ``"motion"`` (along the structures' motion, see :mod:`.flow`); a network
with three condition channels (:func:`sees_start`) is given that start too.

- **vEMDiffuse-i**: the model was trained on an isotropic volume (every orientation of it: an isotropic volume
  looks the same along z, y and x), decimated along the axis of interpolation.
- **vEMDiffuse-a**: no isotropic data. :func:`self_supervised` trains on the volume itself: along y (and x) the
  planes are finely sampled, so planes R pixels apart in y are conditions and the planes between are targets;
  the learnt interpolation is then applied across z.

Consistency along z: every gap and every slice in it is sampled with the same noise field (one seed), so
neighbouring generated slices share their stochastic detail instead of flickering, and each gap is independent
of the others (a volume can be processed in chunks along z with one acquired slice of overlap).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .normalize import InputError, Normalizer
from .tasks import (
    PlaneJob,
    Progress,
    Restoration,
    Settings,
    new_results,
    prepare,
    sample_planes,
    summarise,
)

FACTORS = tuple(range(2, 11))  # the whole factors of models with labels "R:j" (the earlier bundled ones, the authors')
LABELS = {f"{r}:{j}": i for i, (r, j) in enumerate((r, j) for r in FACTORS for j in range(1, r))}
GAPS = (2.0, 16.0)  # lateral pixels between sections the bundled model was trained for (see condition_of)
NOTHING_TO_GENERATE = "There is nothing to generate: give a z factor above 1 or mark sections to regenerate."
ON_SECTION = 1e-6  # an output plane this close to a section (in sections) is that section


def label_of(factor: int, j: int) -> str:
    """The model variant that generates slice ``j`` (1 .. factor-1) of a gap of ``factor`` slices."""
    return f"{factor}:{j}"


def check_factor(factor: float) -> float:
    """A z factor R (section spacing over output spacing): a number above 1 (whole or not), up to 32. Whether a model
    serves it is :func:`condition_of`'s to say."""
    from .limits import check_number

    factor = check_number("factor", factor)
    return int(factor) if factor == int(factor) else factor


def factor_from_voxel(voxel: Sequence[float]) -> float | None:
    """The R that makes a volume of voxel size ``(z, y, x)`` isotropic: its z spacing over its pixel size, to 1/100
    (50 nm sections of 4 nm pixels: 12.5). Not clamped: a ratio no model serves is refused later with a sentence.
    None when the voxel size does not tell (unknown sizes read as ones, unusable sizes, or a volume already about
    isotropic).
    """
    ratio = _ratio(voxel)
    if not 1.05 <= ratio < 1e6:
        return None
    return int(round(ratio)) if abs(ratio - round(ratio)) < 0.005 else round(ratio, 2)


def _ratio(voxel: Sequence[float]) -> float:
    z, y, x = (float(v) for v in voxel[-3:])
    return z / ((y + x) / 2) if all(math.isfinite(v) and v > 0 for v in (z, y, x)) else math.nan


def check_voxel_factor(voxel: Sequence[float]) -> float:
    """The R of :func:`factor_from_voxel`, refused with a sentence when the voxel size gives none we make."""
    factor = factor_from_voxel(voxel)
    size = " x ".join(f"{v:g}" for v in voxel[-3:])
    if factor is None:
        raise InputError(f"The voxel size {size} does not give a z spacing larger than the pixel size; give the z "
                         "factor R.")
    try:
        return check_factor(factor)
    except InputError as err:
        raise InputError(f"The voxel size {size} gives a z factor of {factor:g}, outside the 1 to 32 made; give the "
                         "z factor R.") from err


def positions_text(model) -> str:
    """What positions ``model`` can generate, for refusals: "sections 2 to 16 pixels apart" or whole factors."""
    if uses_positions(model):
        low, high = model.meta.get("gaps", GAPS)
        return f"slices between sections {low:g}{'' if low == high else f' to {high:g}'} pixels apart"
    factors = sorted({int(name.split(":")[0]) for name in model.meta.get("labels") or {}})
    consecutive = len(factors) > 2 and factors == list(range(factors[0], factors[-1] + 1))
    listed = f"{factors[0]} to {factors[-1]}" if consecutive else ", ".join(map(str, factors))
    return f"slices at whole z factors only ({listed})"


def uses_positions(model) -> bool:
    return getattr(model.net.config, "positions", 0) > 0


def condition_of(model, gap: float, fraction: float):
    """What ``model`` is told about a slice ``fraction`` of the way (0 to 1) between two sections ``gap`` lateral
    pixels apart: that position itself for networks with a position embedding, or the label ``"R:j"`` of models
    trained on whole factors, which serve only positions of that form. Anything else: InputError."""
    if uses_positions(model):
        low, high = model.meta.get("gaps", GAPS)
        if low - ON_SECTION <= gap <= high + ON_SECTION:
            return (float(gap), float(fraction))
    else:
        factor = round(gap)
        j = round(fraction * factor)
        name = label_of(factor, j)
        if abs(gap - factor) < ON_SECTION and abs(fraction * factor - j) < 1e-4 and name in (model.meta.get("labels")
                                                                                                or {}):
            return int(model.meta["labels"][name])
    raise InputError(f"The model '{model.name}' makes {positions_text(model)}, not a slice {fraction:.2f} of the way "
                     f"between sections {gap:g} pixels apart.")


def plane_conditions(model, groups, gap: float) -> dict:
    """What ``model`` is told for each plane of :func:`pairs` ``groups``: a list per pair of sections ``gap``
    pixels apart; InputError for a position it does not serve."""
    return {(below, above): [condition_of(model, (above - below) * gap, p.fraction) for p in group]
            for (below, above), group in groups}


def check_positions(model, sections: int, factor: float, gap: float | None = None) -> None:
    """Refuse, before any work, a factor and section spacing whose planes ``model`` cannot make (a chunked run's
    chunks each check only their own). The positions repeat every few sections: a few hundred cover them all."""
    factor = check_factor(factor)
    plane_conditions(model, pairs([p for p in plan_planes(min(sections, 256), factor) if not p.acquired]),
                     factor if gap is None else gap)


@dataclass(frozen=True)
class Plane:
    """Where output plane ``index`` lies: ``fraction`` of the way from section ``below`` to section ``above`` (the
    nearest good ones); fraction 0 with ``below == above`` is the acquired section itself."""

    index: int
    below: int
    above: int
    fraction: float

    @property
    def acquired(self) -> bool:
        return self.below == self.above

    @property
    def section(self) -> int | None:
        """The section a generated plane replaces (a bad one), or None for a plane between sections."""
        position = self.below + self.fraction * (self.above - self.below)
        return None if self.acquired or abs(position - round(position)) >= ON_SECTION else round(position)


def on_section(index: int, factor: float) -> bool:
    """Whether output plane ``index`` (at ``index / factor`` sections) is a section."""
    return abs(index / factor - round(index / factor)) < ON_SECTION


def first_plane(section: int, factor: float) -> int:
    """The first output plane at or after ``section``."""
    return math.ceil(section * factor - ON_SECTION * factor)


def output_slices(sections: int, factor: float, offset: float = 0.0) -> int:
    """Output planes from ``offset`` (in sections) to the last section, R to a section."""
    return int(math.floor((sections - 1 - offset) * factor + ON_SECTION)) + 1


def plan_planes(sections: int, factor: float, bad: Sequence[int] = (), offset: float = 0.0) -> list[Plane]:
    """Every output plane of a stack of ``sections``: plane ``k`` lies at ``offset + k / factor`` sections, so the
    acquired sections stay where they were (those on the output grid are copied exactly; with a factor that is not
    whole, the others fall between output planes). Bad sections are never used: planes at or near them are
    generated from the nearest good sections on each side."""
    bad = set(bad)
    good = [s for s in range(sections) if s not in bad]
    planes = []
    for k in range(output_slices(sections, factor, offset)):
        position = offset + k / factor
        nearest = round(position)
        if abs(position - nearest) < ON_SECTION and nearest not in bad:
            planes.append(Plane(k, nearest, nearest, 0.0))
            continue
        i = bisect.bisect_right(good, position) - 1
        below, above = good[i], good[i + 1]
        planes.append(Plane(k, below, above, (position - below) / (above - below)))
    return planes


def check_isotropic(voxel: Sequence[float]) -> None:
    """Refuse a training volume whose voxel size ``(z, y, x)`` is not about the same along every axis."""
    z, y, x = (float(v) for v in voxel[-3:])
    if max(z, y, x) > 1.5 * min(z, y, x):
        raise InputError(f"Fine-tuning for isotropic reconstruction learns from an isotropic volume (e.g. FIB-SEM "
                         f"with the same spacing along z, y and x); this one's voxels are {z:g} x {y:g} x {x:g}.")


def sees_start(net) -> bool:
    """Whether a residual network is given its start (the interpolation it corrects) as a third condition channel.

    Without it the network sees only the two neighbours and must redo the flow estimation to know what the start
    got wrong; with it, it sees the start's ghosts and blur directly.
    """
    return net.config.cond_channels == 3


def decimate(volume: np.ndarray, factor: int) -> np.ndarray:
    """Keep every ``factor``-th slice (the first and then every R-th): what an anisotropic acquisition sees."""
    return volume[::factor]


STARTS = ("linear", "motion")


def between(below: np.ndarray, above: np.ndarray, fractions, start: str = "linear", device=None) -> np.ndarray:
    """Interpolated planes at ``fractions`` (0 = below, 1 = above) of the way between slices ``below`` and ``above``.

    One pair (y, x) with fractions (k,) gives (k, y, x); n pairs (n, y, x) with fractions (n, k) give
    (n, k, y, x). ``start`` is ``"linear"`` (straight across) or ``"motion"`` (along the estimated motion, computed
    on the torch ``device`` given, e.g. the model's).
    """
    if start == "motion":
        from .flow import motion_interpolation

        return motion_interpolation(below, above, fractions, device)
    if start != "linear":
        raise InputError(f"Unknown interpolation {start!r}: use one of {', '.join(STARTS)}.")
    t = np.asarray(fractions, np.float32)[..., None, None]
    below, above = (np.asarray(a, np.float32)[..., None, :, :] for a in (below, above))
    return below * (1 - t) + above * t


def interpolate(volume: np.ndarray, factor: float, start: str = "linear", bad: Sequence[int] = ()) -> np.ndarray:
    """The volume on the output z grid (:func:`plan_planes`) by plain interpolation (float32): the baselines, and
    the sampler's start."""
    v = np.asarray(volume, dtype=np.float32)
    out = np.zeros((output_slices(len(v), factor),) + v.shape[1:], np.float32)
    for (below, above), planes in pairs(plan_planes(len(v), factor, bad)):
        out[[p.index for p in planes]] = (v[below] if below == above else
                                          between(v[below], v[above], [p.fraction for p in planes], start))
    return out


def pairs(planes: Sequence[Plane]) -> list[tuple[tuple[int, int], list[Plane]]]:
    """The planes grouped by the sections they lie between (in order): each pair's start is computed once."""
    groups: dict[tuple[int, int], list[Plane]] = {}
    for p in planes:
        groups.setdefault((p.below, p.above), []).append(p)
    return list(groups.items())


def flicker(volume: np.ndarray) -> float:
    """Mean absolute difference between neighbouring slices (divide by the truth's value to compare volumes)."""
    v = np.asarray(volume, dtype=np.float32)
    return float(np.abs(np.diff(v, axis=0)).mean())


def bad_sections(bad, volume_shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.ndarray | None]:
    """The sections to regenerate and, for damage marked as regions, a mask of them (z, y, x) or None.

    ``bad`` is a sequence of section indices (whole sections) or a mask of the volume's shape (a labels layer:
    nonzero where damaged); a section with any marked pixel is regenerated and its marked regions replaced."""
    if bad is None:
        return (), None
    if isinstance(bad, np.ndarray) and bad.ndim == 3:
        if bad.shape != tuple(volume_shape):
            raise InputError(f"The damaged regions ({' x '.join(map(str, bad.shape))}) must cover the volume "
                             f"({' x '.join(map(str, volume_shape))}) exactly.")
        mask = bad != 0
        return tuple(int(z) for z in np.flatnonzero(mask.any(axis=(1, 2)))), mask
    from .sections import check_sections

    return check_sections(bad, volume_shape[0]), None


REGION_MARGIN = 4  # px: a marked region is widened by this much, then blended over as much again (no visible edge)


def region_weight(mask: np.ndarray) -> np.ndarray:
    """Where a regenerated section replaces the acquired one: 1 in the marked region and up to
    :data:`REGION_MARGIN` pixels from it, fading linearly to 0 over as many again (exactly 0 beyond)."""
    from scipy.ndimage import distance_transform_edt

    distance = distance_transform_edt(~mask)
    return np.clip(2 - distance / REGION_MARGIN, 0, 1).astype(np.float32)


ALIGNMENTS = ("rigid", "elastic")


def aligned_stack(volume: np.ndarray, align: str | None, bad=None) -> Generator[Progress, None, tuple]:
    """The stack to reconstruct and a note: with ``align`` (``"rigid"``, or ``"elastic"`` for a smooth correction
    after it) its sections aligned first and what moved; without, the stack as it is and, when it looks misaligned
    (:func:`~.align.misalignment`, for sections large enough to measure), a warning."""
    from .align import MIN_SIDE, align_sections, misalignment
    from .limits import check_choice
    from .tasks import relayed

    if align is None:
        if min(volume.shape[1:]) < MIN_SIDE or len(volume) < 3:
            return volume, None
        return volume, misalignment(volume).warning
    check_choice("alignment", align, ALIGNMENTS)
    if isinstance(bad, np.ndarray) and bad.ndim == 3:
        raise InputError("Damaged regions are marked on the sections as acquired; align the stack first (and save "
                         "it), then mark them on the aligned one.")
    alignment = yield from relayed(align_sections(volume, elastic=align == "elastic"),
                                   lambda p: Progress(p.done, p.total, f"aligning the sections: {p.message}"))
    return alignment.volume, f"sections aligned first ({align}): {alignment.report()}"


def isotropic(volume, model=None, settings: Settings | None = None, factor: float = 4,
              norm: Normalizer | None = None, *, gap: float | None = None, bad=None,
              offset: float = 0.0, align: str | None = None,
              check_alignment: bool = True) -> Generator[Progress, None, Restoration]:
    """Generate the planes of ``volume`` (z, y, x) on a z grid ``factor`` times finer than its sections.

    ``gap`` is the sections' spacing in lateral pixels (what the model is told; default ``factor``: the output is
    isotropic). ``bad`` (section indices, or a mask of damaged regions: see :func:`bad_sections`) are regenerated
    from their nearest good neighbours; with ``factor`` 1 that is all that is done. ``offset`` is where the first
    output plane lies, in sections (a chunk of a larger volume). The uncertainty (``tasks.predictive_spread``) is
    zero where the acquisition is kept; the score and verdict are computed on the generated planes (regions) only.
    ``align`` (see :func:`aligned_stack`) aligns the sections first; without it, a stack that looks misaligned is
    reconstructed as it is, with a note saying so (unless ``check_alignment`` is off: a chunk of a larger volume).
    """
    settings = settings or Settings()
    factor = check_factor(factor)
    started = time.perf_counter()
    volume, device, model, norm = prepare(volume, model, settings, "isotropic", norm)
    if volume.ndim != 3 or len(volume) < 2:
        raise InputError("Isotropic reconstruction needs a volume (z, y, x) with at least 2 slices.")
    from .limits import check_number

    gap = factor if gap is None else check_number("gap", gap)
    marked = bad
    bad, regions = bad_sections(bad, volume.shape)
    planes = plan_planes(len(volume), factor, bad, offset)
    made = [p for p in planes if not p.acquired]
    if not made:
        raise InputError(NOTHING_TO_GENERATE)
    groups = pairs(made)
    conditions = plane_conditions(model, groups, gap)  # every position checked before any work
    start = model.meta.get("start", "linear")
    with_start = sees_start(model.net)

    results = new_results(model, settings, (len(planes),) + volume.shape[1:], norm)
    volume, stack_note = (yield from aligned_stack(volume, align, marked)) if align or check_alignment else \
        (volume, None)
    for p in planes:
        if p.acquired:
            results.image[p.index] = volume[p.below]  # exactly the acquisition; its maps stay zero: certain

    def jobs() -> Iterator[PlaneJob]:
        for n, ((below, above), group) in enumerate(groups):
            b, a = norm(volume[below]), norm(volume[above])
            starts = between(b, a, [p.fraction for p in group], start, device)
            for p, s, label in zip(group, starts, conditions[below, above]):
                yield PlaneJob(np.stack([b, a, s] if with_start else [b, a]), s, label, p.index,
                               f" sections {below}-{above} ({n + 1}/{len(groups)}), {p.fraction:.2f} of the way")

    tile, notes = yield from sample_planes(model, jobs(), len(made), results, settings, device, "isotropic")
    notes = [stack_note, *notes] if stack_note else notes
    between_sections = [p.index for p in made if p.section is None]
    scored = [] if results.uncertainty is None else [results.uncertainty[between_sections].ravel()]
    for p in made:
        if p.section is not None:  # a regenerated section: only its marked regions replace the acquisition
            region = _blend_regenerated(results, p.index, volume[p.section],
                                        None if regions is None else regions[p.section])
            if results.uncertainty is not None:
                scored.append(results.uncertainty[p.index][region])
    scored = np.concatenate(scored) if scored else None
    extra = {"factor": factor, "section_gap": gap}
    if bad:
        from .sections import format_sections

        extra["regenerated"] = format_sections(bad)
    info = summarise("isotropic", model, settings, device, scored, tile, notes, started, **extra)
    return Restoration(results.image, results.uncertainty, results.difficulty, info)


def _blend_regenerated(results, index: int, acquired: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    """Keep the acquisition outside a section's marked ``region`` (all of it regenerated without one), blended at
    the edges; returns where the section is regenerated (a mask), to score."""
    if region is None or region.all():
        return np.ones(acquired.shape, bool)
    w = region_weight(region)
    norm = results.norm
    results.image[index] = norm.inverse(norm(results.image[index]) * w + norm(acquired) * (1 - w))
    for extra in (results.uncertainty, results.difficulty):
        if extra is not None:
            extra[index] *= w
    return region


# --- training examples, shared by the bundled model's training script and the self-supervised mode ---------------

def interpolation_batches(volumes: Sequence[np.ndarray], factors: Sequence[int], batch: int, patch: int,
                          seed: int = 0, weights: Sequence[float] | None = None, jitter: float = 0.0,
                          multiple: int = 16, residual: str | None = None, cache: bool = False,
                          start_condition: bool = False, invert: float = 0.0, device=None,
                          volume_shares: Sequence[float] | None = None, ratios: Sequence[float] | None = None,
                          gaps: tuple[float, float] | None = None):
    """Endless training batches ``(x0, cond, label)`` in model space.

    Each volume is normalised to [0, 1] and oriented with the axis to interpolate across first. An example takes
    two planes ``factor`` apart as the condition and one plane between as the target, in a random ``patch``-sized
    window (the window is shrunk to the planes when they are smaller), mirrored along the interpolation axis and
    in-plane (rotations and flips) at random; windows are padded to a ``multiple`` of the network's size step.
    ``weights`` are the probabilities of ``factors``; ``jitter`` is the spread of a random gain and offset per
    example (robustness to other volumes' contrast). With ``residual`` (``"linear"`` or ``"motion"``) the target is
    the slice minus that interpolation (for models with ``"residual": true`` and that ``"start"`` in their metadata).
    With ``cache`` that interpolation is computed once per plane pair, over the whole planes as in reconstruction,
    and kept: for many epochs over one small volume (self-supervised training), where it would otherwise take most
    of every step's time. ``start_condition`` adds that interpolation to the condition as a third channel (models
    for which :func:`sees_start` holds). ``invert`` is the probability that an example is shown in the other
    contrast convention (membranes bright instead of dark, as FIB-SEM comes from either detector set-up); the
    interpolation of the inverted planes is the inverted interpolation, so cached ones serve both.
    ``device`` is where that interpolation is computed (default: the CPU). ``volume_shares`` are the volumes'
    shares of the examples (default: by size, every voxel alike).

    With ``gaps`` (lowest, highest) the labels are positions ``(gap, fraction)`` for networks with
    ``positions`` (see :func:`condition_of`): a target ``j`` planes above the lower of two planes
    ``factor`` apart lies at fraction ``j / factor`` of a gap of ``factor * ratio`` lateral pixels, where a volume's
    ``ratio`` (``ratios``, default 1) is its plane spacing over its lateral pixel (0.5 for a volume binned 2 x in y
    and x only: gaps of half pixels). Each volume then draws the factors whose gap lies in ``gaps``, with
    probabilities ``weights`` taken as a function of the gap (a callable), or alike.
    """
    import torch

    from .train import augment, to_model_space

    rng = np.random.default_rng(seed)
    contrast = np.random.default_rng([seed, 1])  # its own stream: which examples are drawn does not depend on invert
    ratios = [1.0] * len(volumes) if ratios is None else list(ratios)
    given = [v.size for v in volumes] if volume_shares is None else volume_shares
    if gaps is None:  # labels: the factors given, for every volume
        drawable = [(list(factors), weights) for _ in volumes]
    else:  # positions: each volume's factors that give a gap in range
        drawable = []
        for ratio in ratios:
            own = [f for f in factors if gaps[0] <= f * ratio <= gaps[1]]
            drawable.append((own, None if weights is None else [weights(f * ratio) for f in own]))
    drawn = [(v, s, r, f, None if w is None else np.asarray(w, float) / np.sum(w))
             for v, s, r, (f, w) in zip(volumes, given, ratios, drawable) if f and v.shape[0] > max(f)]
    if not drawn:
        raise InputError(f"The volume needs more than {max(factors)} planes along the interpolation axis to learn "
                         "from.")
    usable = [d[0] for d in drawn]
    shares = np.array([d[1] for d in drawn], float)
    h = min(patch, *(v.shape[1] for v in usable))
    w = min(patch, *(v.shape[2] for v in usable))
    # planes smaller than the network's multiple (e.g. z-x planes of a volume of few slices) are mirrored out to it
    pad = [(0, 0), (0, -h % multiple), (0, -w % multiple)]
    kept: dict[tuple[int, int, int], np.ndarray] = {}

    def whole_plane_starts(i: int, z: int, factor: int) -> np.ndarray:
        if (i, z, factor) not in kept:
            v = usable[i]
            fractions = np.arange(1, factor) / factor
            kept[i, z, factor] = between(v[z], v[z + factor], fractions, residual, device).astype(np.float16)
        return kept[i, z, factor]

    while True:
        xs, cs, ls, fractions, starts = [], [], [], [], []
        for _ in range(batch):
            i = int(rng.choice(len(usable), p=shares / shares.sum()))
            v, _, ratio, own, p = drawn[i]
            factor = int(rng.choice(own, p=p))
            z = int(rng.integers(0, v.shape[0] - factor))
            y, x = rng.integers(0, v.shape[1] - h + 1), rng.integers(0, v.shape[2] - w + 1)
            j = int(rng.integers(1, factor))
            window = v[z:z + factor + 1, y:y + h, x:x + w]
            if residual and cache:  # carried along as one more plane, through every change below
                window = np.concatenate([window, whole_plane_starts(i, z, factor)[j - 1:j, y:y + h, x:x + w]])
            window = np.pad(window, pad, mode="symmetric")
            if jitter:
                window = window * (1 + rng.normal(0, jitter)) + rng.normal(0, jitter)
            if contrast.random() < invert:
                window = 1 - window
            planes = [window[0], window[j], window[factor]] + ([window[-1]] if residual and cache else [])
            if rng.random() < 0.5:  # the other direction along the axis: slice j becomes slice R - j
                planes[0], planes[2], j = planes[2], planes[0], factor - j
            planes = augment(rng, *planes)
            if planes[0].shape != window.shape[1:]:  # turned by 90 degrees: transpose back, one batch, one shape
                planes = [np.ascontiguousarray(a.T) for a in planes]
            below, target, above = planes[:3]
            xs.append(target)
            cs.append(np.stack([below, above]))
            starts.extend(planes[3:])
            ls.append(LABELS[label_of(factor, j)] if gaps is None else (factor * ratio, j / factor))
            fractions.append([j / factor])
        x0 = to_model_space(xs)
        if residual:
            if not cache:
                below, above = np.stack([c[0] for c in cs]), np.stack([c[1] for c in cs])
                starts = list(between(below, above, fractions, residual, device)[:, 0])
            x0 = x0 - to_model_space(starts)
            if start_condition:
                cs = [np.concatenate([c, s[None]]) for c, s in zip(cs, starts)]
        yield x0, to_model_space(cs), torch.tensor(ls, dtype=None if gaps is None else torch.float32)


def oriented(volume: np.ndarray, axes: Sequence[int] = (0, 1, 2)) -> list[np.ndarray]:
    """The volume with each of ``axes`` in turn as the axis to interpolate across (first). An isotropic volume
    looks alike along z, y and x, so all three serve; an anisotropic one offers y and x (planes z-x and z-y)."""
    return [np.ascontiguousarray(np.moveaxis(volume, axis, 0)) for axis in axes]


def caches_starts(volumes: Sequence[np.ndarray], factors: Sequence[int], limit: int | None = None) -> bool:
    """Whether every plane pair's start fits in ``limit`` pixels (default :data:`CACHE_PIXELS`), to be kept
    (``interpolation_batches(cache=True)``).

    Whole-plane starts pay off while each plane pair is met many times (volumes of a few hundred 256² planes); on
    bigger ones each example's start is computed on its own patch.
    """
    limit = CACHE_PIXELS if limit is None else limit
    return sum((len(v) - f) * (f - 1) * v[0].size for v in volumes for f in factors) <= limit


# One step from low noise: the network corrects its start (the motion-compensated interpolation) locally instead of
# re-estimating the slice. What it learns across y and x transfers only in part to z (lateral planes are R times
# coarser in z than the xy slices it is applied to): one step from sigma = 2, the regression estimate, scored 0.2 dB
# below the start on one FIB-SEM volume and 0.03 above it on another. Trained on noise levels 0.15-0.5 and sampled
# at 0.25 it beats the start on both (+0.12 and +0.11 dB, SSIM and FSIM too; first 20 gaps at R = 4,
# ``benchmarks/isotropic_quality.py --self-supervised --sweep``), with the same uncertainty score.
SELF_SUPERVISED_SAMPLING = {"steps": 1, "sampler": "euler_ancestral", "eta": 1.0, "sigma_max": 0.25,
                            "sigma_end": 0.25}
SELF_SUPERVISED_TRAINING_SIGMAS = (0.15, 0.5)
CACHE_PIXELS = 2 ** 27  # 256 MB of float16 interpolations kept for self-supervised training
SELF_SUPERVISED_NETWORK = {"base": 24, "mults": (1, 2, 2), "blocks": 1, "attention": False, "patch": 2}
SELF_SUPERVISED_POSITIONS = 32  # gaps up to 32 px


def learnt_factors(gaps: Sequence[float]) -> list[int]:
    """The whole plane distances a self-supervised model learns from so that it serves ``gaps`` (lateral pixels
    between sections): the whole numbers on each side of each gap (planes along y are one pixel apart)."""
    return sorted({f for g in gaps for f in (max(2, math.floor(g)), max(2, math.ceil(g)))})


def self_supervised(volume, gaps: float | Sequence[float], minutes: float = 10.0, *, seed: int = 0,
                    device: str = "auto", name: str | None = None, batch: int = 8, patch: int = 96) -> Generator:
    """vEMDiffuse-a: train an interpolation model on ``volume`` itself within ``minutes``; return the Model.

    The model serves slices anywhere between sections ``gaps`` lateral pixels apart (one number, or each gap a
    reconstruction needs, e.g. across regenerated sections): it learns planes between planes along y and x at the
    whole distances around each (:func:`learnt_factors`), told the position (gap, fraction) of each target.
    Yields :class:`~.train.TrainProgress`. The network is small (it must learn in minutes on a laptop CPU).
    """
    import torch

    from .diffusion import training_log_sigma
    from .models import SAMPLING_DEFAULTS, Model
    from .network import UNet, UNetConfig
    from .tasks import pick_device
    from .train import train

    factors = learnt_factors([gaps] if np.isscalar(gaps) else gaps)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError("Self-supervised reconstruction needs a volume (z, y, x).")
    norm = Normalizer.fit(volume)
    dev = pick_device(device)
    torch.manual_seed(seed)
    net = UNet(UNetConfig(cond_channels=3, positions=SELF_SUPERVISED_POSITIONS,
                          **SELF_SUPERVISED_NETWORK))
    planes = oriented(norm(volume), axes=(1, 2))
    batches = interpolation_batches(planes, factors, batch, patch, seed, multiple=net.config.multiple,
                                    residual="motion", cache=caches_starts(planes, factors),
                                    start_condition=sees_start(net), gaps=(factors[0], factors[-1]))
    log_sigma = training_log_sigma(*SELF_SUPERVISED_TRAINING_SIGMAS)
    net = yield from train(net, batches, minutes=minutes, lr=1e-3, ema_decay=0.995, seed=seed, device=dev,
                           warmup=50, checkpoint_minutes=float("inf"), log_sigma=log_sigma)
    meta = {"task": "isotropic", "gaps": [factors[0], factors[-1]], "mode": "self-supervised", "residual": True,
            "start": "motion",
            "description": "vEMDiffuse-a: interpolation learnt from this volume's lateral planes, between sections "
                           f"{factors[0]} to {factors[-1]} pixels apart.",
            "training": {"minutes": minutes, "seed": seed, "date": time.strftime("%Y-%m-%d")}}
    sampling = {**SAMPLING_DEFAULTS, **SELF_SUPERVISED_SAMPLING}
    return Model(net=net.eval(), meta={**meta, "sampling": sampling},
                 name=name or f"self-supervised-{factors[0]}-{factors[-1]}px",
                 sampling=sampling)


# --- judging a self-supervised model: on planes kept aside from its learning, against its own start ----------------

ASIDE_SHARE, ASIDE_MIN_PIXELS = 0.2, 48  # the last x columns kept aside: this share of them, at least this many
# The held-out check reconstructs at most this many pixels (planes z-x cropped to VALIDATION_PLANE): a few seconds
VALIDATION_PIXELS, VALIDATION_PLANE = 2 ** 18, (256, 128)
# Budget needed before the learnt model beats its start on held-out planes: see check_budget.
SELF_SUPERVISED_MIN_MINUTES = 2.0
# The start draws no noise, and a barely trained residual model samples close to it, so the seed-to-seed spread
# is about zero and would pass any gain: a model must beat the start by this much (dB) too. Measured with
# check_budget's benchmark: 3 steps scored +0.00002 dB with a spread of 0.00000; 35-70 steps +0.004 to +0.02 dB;
# ~200 steps and more +0.17 to +0.28 dB.
SELF_SUPERVISED_MIN_GAIN = 0.05
MOTION_INTERPOLATION = "motion-compensated interpolation"


def check_budget(minutes: float) -> float:
    """Refuse a self-supervised training budget too short to learn anything the start does not already know.

    Measured (``benchmarks/self_supervised_budget.py``, a 250 x 160 x 200 crop of a 10 nm FIB-SEM volume kept at
    R = 4, judged as :func:`isotropic_self_supervised` judges, 6 minutes on the shared 2-core CPU): the model
    scores the same as its start for its first ~20 steps, +0.00 to +0.02 dB at 35-70 steps, 0.1 dB below it at
    110-125 (still settling), and beats it for good from ~200 steps on (+0.17 dB at 222, +0.25 at 400, +0.28 at
    1036). Here the first minute gave 21 steps (the starts of all plane pairs are computed first) and 2 minutes
    70: budgets under :data:`SELF_SUPERVISED_MIN_MINUTES` learn nothing on such a CPU, and the check on the
    columns kept aside catches longer budgets that still fall short (a 2-minute run with the CPU at its busiest
    made 7 steps, and its model was not used: ``results/self_supervised_budget_2min.json``).
    """
    from .limits import check_number

    minutes = check_number("minutes", minutes)  # a number at all: the one validation of every number
    if minutes < SELF_SUPERVISED_MIN_MINUTES:
        raise InputError(f"A training time of {minutes:g} minutes is too short for the learnt model to beat "
                         f"{MOTION_INTERPOLATION} (it needs about {SELF_SUPERVISED_MIN_MINUTES:g} minutes on a "
                         "2-core CPU); give it more time or use a trained model.")
    return minutes


def split_aside(volume: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """The volume's x columns to learn from and those kept aside to judge the learnt model on (the last ones)."""
    width = volume.shape[2]
    aside = max(ASIDE_MIN_PIXELS, round(ASIDE_SHARE * width))
    if width < aside + ASIDE_MIN_PIXELS or volume.shape[1] < 2 * factor + 1:
        raise InputError(f"Self-supervised learning needs a volume of at least {2 * factor + 1} pixels along y and "
                         f"{2 * ASIDE_MIN_PIXELS} along x, to keep {ASIDE_MIN_PIXELS} columns aside and judge the "
                         f"learnt model on them (this one is {' x '.join(map(str, volume.shape))}).")
    return volume[:, :, : width - aside], volume[:, :, width - aside:]


def lateral_truth(aside: np.ndarray, factor: int) -> np.ndarray:
    """The task the model learnt, on columns it did not see: the block with y first (planes z-x, cropped to
    :data:`VALIDATION_PLANE` about their centre), ``k * factor + 1`` planes from the middle of y, at least two gaps
    and about :data:`VALIDATION_PIXELS` pixels."""
    block = np.moveaxis(aside, 1, 0)
    (z0, z1), (x0, x1) = ((max(0, (n - m) // 2), max(0, (n - m) // 2) + m)
                          for n, m in zip(block.shape[1:], VALIDATION_PLANE))
    block = block[:, z0:z1, x0:x1]
    gaps = min((len(block) - 1) // factor, max(2, VALIDATION_PIXELS // (factor * block[0].size)))
    y0 = (len(block) - gaps * factor - 1) // 2
    return np.ascontiguousarray(block[y0:y0 + gaps * factor + 1])


def judge_learnt(model, truth: np.ndarray, factor: int, norm: Normalizer, settings: Settings) -> Generator:
    """Generator returning the :class:`~.finetune.Verdict` of ``model`` against its start (motion-compensated
    interpolation) on ``truth`` decimated along its first axis (see :func:`lateral_truth`): PSNR on the generated
    planes with :data:`~.finetune.VALIDATION_SEEDS` sampling seeds and the user's settings; the start, which draws
    no noise, scores the same with every seed."""
    from dataclasses import replace

    from .finetune import VALIDATION_SEEDS, judge, psnr
    from .tasks import relayed

    generated = np.arange(len(truth)) % factor != 0
    acquired = decimate(truth, factor)

    def score(image: np.ndarray) -> float:
        return psnr(norm(image[generated]).astype(np.float64), norm(truth[generated]).astype(np.float64))

    start = norm.inverse(interpolate(norm(acquired), factor, "motion"))  # rounded to the data's type, as results
    after = []
    for i in range(VALIDATION_SEEDS):
        run = isotropic(acquired, model, replace(settings, seed=settings.seed + i), factor, norm)
        result = yield from relayed(run, lambda p, i=i: Progress(
            p.done, p.total, f"checking the learnt model on planes kept aside, seed {i + 1}/{VALIDATION_SEEDS}: "
                             f"{p.message}"))
        after.append(score(result.image))
    return judge([score(start)] * VALIDATION_SEEDS, after, margin=SELF_SUPERVISED_MIN_GAIN)


def motion_reconstruction(volume: np.ndarray, factor: float, norm: Normalizer, bad=None
                          ) -> Generator[Progress, None, np.ndarray]:
    """The volume on the output z grid by motion-compensated interpolation alone (bad sections and regions
    regenerated so too), section pair by pair, in its own type."""
    from .tasks import PlaneResults

    bad, regions = bad_sections(bad, volume.shape)
    planes = plan_planes(len(volume), factor, bad)
    results = PlaneResults((len(planes),) + volume.shape[1:], norm, False, False)
    groups = pairs(planes)
    for n, ((below, above), group) in enumerate(groups):
        if below == above:
            results.image[group[0].index] = volume[below]
        else:
            made = between(norm(volume[below]), norm(volume[above]), [p.fraction for p in group], "motion")
            for p, plane in zip(group, made):
                results.image[p.index] = norm.inverse(plane)
                if p.section is not None:
                    _blend_regenerated(results, p.index, volume[p.section],
                                       None if regions is None else regions[p.section])
        yield Progress(n + 1, len(groups), f"{MOTION_INTERPOLATION}: sections {below}-{above}")
    return results.image


def isotropic_self_supervised(volume, factor: float = 4, minutes: float = 10.0, settings: Settings | None = None,
                              norm: Normalizer | None = None, save_as: str | None = None, *,
                              gap: float | None = None, bad=None,
                              align: str | None = None) -> Generator[Progress, None, Restoration]:
    """vEMDiffuse-a end to end: learn from ``volume`` for ``minutes``, judge, then reconstruct; one progress stream.

    ``factor``, ``gap``, ``bad`` and ``align`` as for :func:`isotropic` (an aligned stack is also what is learnt
    from). The budget, the volume's size, the sections and ``save_as`` are checked when this is called, before any
    work (a budget below :data:`SELF_SUPERVISED_MIN_MINUTES` is refused). The model learns every gap the
    reconstruction needs (across regenerated sections too). The last x columns (:func:`split_aside`) are kept aside
    from learning; the learnt model is then judged on them, on the task it learnt (planes between planes along y, at
    the whole distance nearest the sections' gap), against the motion-compensated interpolation it starts from, by
    the rule fine-tuning keeps (better with every sampling seed by more than the seed-to-seed spread,
    :func:`~.finetune.judge`, and by at least :data:`SELF_SUPERVISED_MIN_GAIN`). A model that beats it reconstructs
    the volume and, with ``save_as``, goes into the user's models under that name before the reconstruction (a
    cancelled reconstruction keeps it): it then reconstructs more of the same acquisition without learning again,
    e.g. a whole volume chunk by chunk. A model that does not is neither used nor saved: the volume
    is reconstructed by motion-compensated interpolation (no uncertainty map), and a note says why. Training
    progress is reported per mille of the time budget, then the check's and the reconstruction's own.
    """
    from .limits import check_number
    from .models import free_name

    settings = settings or Settings()
    factor = check_factor(factor)
    gap = factor if gap is None else check_number("gap", gap)
    minutes = check_budget(minutes)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError("Self-supervised reconstruction needs a volume (z, y, x).")
    sections, _ = bad_sections(bad, volume.shape)
    gaps = sorted({(p.above - p.below) * gap for p in plan_planes(len(volume), factor, sections) if not p.acquired})
    if not gaps:
        raise InputError(NOTHING_TO_GENERATE)
    judged = min(max(2, round(gap)), learnt_factors(gaps)[-1])
    split_aside(volume, learnt_factors(gaps)[-1])  # large enough: checked now, split once aligned
    if save_as:
        free_name(save_as)  # before the training, not after it
    return _learn_judge_reconstruct(volume, (factor, gap, bad, gaps, judged, align), minutes, settings, norm,
                                    save_as)


def _learn_judge_reconstruct(volume, grid: tuple, minutes: float, settings: Settings,
                             norm: Normalizer | None, save_as: str | None) -> Generator[Progress, None, Restoration]:
    from .finetune import VALIDATION_SEEDS
    from .models import install_model
    from .tasks import pick_device, summarise

    factor, gap, bad, gaps, judged, align = grid
    started = time.perf_counter()
    volume, stack_note = yield from aligned_stack(volume, align, bad)
    learn, aside = split_aside(volume, learnt_factors(gaps)[-1])
    training = self_supervised(learn, gaps, minutes, seed=settings.seed, device=settings.device, name=save_as)
    steps = 0
    while True:
        try:
            p = next(training)
        except StopIteration as stop:
            model = stop.value
            break
        steps = p.step
        yield Progress(int(1000 * p.fraction), 1000, f"learning from this volume: step {p.step}, loss {p.loss:.3f}")
    norm = norm or Normalizer.fit(volume)
    verdict = yield from judge_learnt(model, lateral_truth(aside, judged), judged, norm, settings)
    validation = {"psnr_model": round(verdict.after, 3), "psnr_motion_interpolation": round(verdict.before, 3),
                  "gain": round(verdict.gain, 3), "spread": round(verdict.spread, 3), "seeds": VALIDATION_SEEDS,
                  "columns_aside": aside.shape[2], "steps": steps}
    # from the recorded figures, so that the note and the record agree to the last digit shown
    figures = (f"{validation['psnr_model']:.2f} dB against {validation['psnr_motion_interpolation']:.2f} dB on "
               f"{aside.shape[2]} x columns kept aside, seed-to-seed spread {validation['spread']:.2f} dB")
    if not verdict.improved:
        image = yield from motion_reconstruction(volume, factor, norm, bad)
        why = (f"the model learnt in {minutes:g} minutes ({steps} steps) did not beat {MOTION_INTERPOLATION} on "
               f"planes kept aside ({figures}), so it was {'neither used nor saved' if save_as else 'not used'} and "
               f"the volume is reconstructed by {MOTION_INTERPOLATION}, without uncertainty")
        info = summarise("isotropic", model, settings, pick_device(settings.device), None, 0,
                         [*filter(None, [stack_note]), why], started, factor=factor, section_gap=gap)
        info.update(model=MOTION_INTERPOLATION, samples=0, steps=0, sampler=None, eta=None,
                    mode="self-supervised", train_minutes=minutes, validation=validation)
        return Restoration(image, None, None, info)
    model.meta["validation"] = validation
    if save_as:
        install_model(model.net, model.meta, save_as)
    result = yield from isotropic(volume, model, settings, factor, norm, gap=gap, bad=bad)
    if stack_note:
        result.info["notes"] = [stack_note, *result.info["notes"]]
    result.info.update(mode="self-supervised", train_minutes=minutes, validation=validation,
                       seconds=round(time.perf_counter() - started, 3))
    result.info["notes"] = [*result.info.get("notes", []),
                            f"the learnt model beat {MOTION_INTERPOLATION} on planes kept aside ({figures})"
                            + (f"; it is saved as '{save_as}'" if save_as else "")]
    return result
