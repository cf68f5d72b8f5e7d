"""Damaged and missing sections of a serial-section stack: the user's list of bad sections (``12,40-41``, counted
from 0 as napari's slider counts the input's sections) and a detector that proposes suspect sections to confirm.

A bad section is regenerated from its good neighbours, so every accepted list leaves a good section on both sides of
each run of bad ones, and no run longer than the model can bridge. The detector proposes only sections that can be
regenerated (never the first or last) and says why in a short phrase; where the damage is local it gives the
damaged region's mask so that only that region need be regenerated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .normalize import InputError, check_image

_ITEM = re.compile(r"(\d+)(?:\s*[-\u2013]\s*(\d+))?", re.ASCII)  # a hyphen or an en dash


def _runs(indices) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, last)`` of sorted unique indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def format_sections(indices) -> str:
    """The compact text of a set of sections, e.g. ``12, 40-41``: what :func:`parse_sections` reads back."""
    unique = sorted({int(i) for i in indices})
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in _runs(unique))


def parse_sections(text: str, count: int, max_run: int | None = None) -> tuple[int, ...]:
    """The bad sections a user lists (``"12,40-41"``: 0-based, ranges inclusive, spaces allowed) in a stack of
    ``count`` sections, sorted and unique; empty text gives none. Refused with one sentence (:class:`InputError`):
    anything malformed, negative or reversed, a section outside the stack, the first or last section, all sections,
    and runs of more than ``max_run`` consecutive bad sections (regenerated from their good neighbours)."""
    count = int(count)
    if not text.strip():
        return ()
    chosen: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if re.fullmatch(r"(\d+\s*)?-\s*-?\d+", item) and not _ITEM.fullmatch(item):
            raise InputError(f"Bad sections are counted from 0; {item!r} is negative.")
        match = _ITEM.fullmatch(item)
        if not match:
            shown = "an empty item" if not item else repr(item)
            raise InputError(f"Cannot read {shown} in the bad sections {text.strip()!r}; write them like 12, 40-41.")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise InputError(f"The range {item!r} of bad sections runs backwards; write it as {last}-{first}.")
        if last >= count:
            raise InputError(f"Bad section {last} is outside the stack, whose {count} sections are 0 to {count - 1}.")
        chosen.update(range(first, last + 1))
    if len(chosen) == count:
        raise InputError("Every section is marked bad; at least the first and last must be good to regenerate.")
    for end, side in ((0, "before"), (count - 1, "after")):
        if end in chosen:
            raise InputError(f"Section {end} cannot be regenerated: it has no good neighbour {side} it.")
    if max_run is not None:
        for a, b in _runs(sorted(chosen)):
            if b - a + 1 > max_run:
                raise InputError(f"The {b - a + 1} consecutive bad sections {a}-{b} are too many to regenerate; "
                                 f"at most {max_run} in a row can be.")
    return tuple(sorted(chosen))


@dataclass(frozen=True)
class Suspect:
    """A section the detector proposes as bad, for the user to confirm."""

    index: int  # 0-based, as napari's slider counts the input's sections
    reason: str  # a short phrase for users, e.g. "41% blank"
    score: float  # the evidence over the detector's threshold: 1 at the threshold, larger is surer
    region: np.ndarray | None = field(default=None, repr=False, compare=False)  # (y, x) damaged area, if local


WORK_SIZE = 256  # the long side of the downsampled sections that correlation and streaks are measured on
BLOCKS = 128  # blank and saturated areas are found in blocks, about this many along the long side
FLAT = 0.1  # a block is flat when its grey values vary less than this fraction of the stack's typical block's
SATURATED = 0.5  # a block is saturated when at least this fraction of it sits at the stack's maximum value
POOR_CORRELATION = 0.3  # a section correlates poorly when its best neighbour correlates below this fraction of typical
ROBUST_SPREADS = 1.5  # ... and that many robust standard deviations below typical (a guard for very uneven stacks)
STREAK_SPREADS = 7.0  # a streak's contrast along its length, in robust standard deviations of the stack's
STREAK_SIZE = 128  # the long side of the sections that streaks are looked for on
SEGMENTS = 4  # a streak must be darker (or brighter) along this many consecutive segments
ANGLE_STEP = 180 / 40  # degrees between the directions looked along


def _block_stats(section: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per block: the standard deviation of the grey values, the fraction at the section's maximum; and that maximum.
    Blocks at the bottom and right edges that are cut short still count (padded with their edge values)."""
    h, w = section.shape
    padded = np.pad(section, ((0, -h % block), (0, -w % block)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block).swapaxes(1, 2)
    top = section.max()
    std = blocks.std(axis=(2, 3), dtype=np.float64).astype(np.float32)
    at_top = (blocks == top).mean(axis=(2, 3), dtype=np.float32)
    return std, at_top, float(top)


def _downsample(section: np.ndarray, factor: int) -> np.ndarray:
    h, w = (s // factor * factor for s in section.shape)
    s = np.asarray(section[:h, :w], dtype=np.float32)
    return s.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)) if factor > 1 else s


def _bounded_runs(flags: np.ndarray, max_run: int) -> np.ndarray:
    """Flags (z, ...) kept where they form runs along z of at most ``max_run`` with unflagged places on both sides:
    damage confined to a few sections, not structure that persists (nor damage no neighbour can repair)."""
    kept = np.zeros_like(flags)
    z = len(flags)
    for start in range(1, z - 1):
        for length in range(1, min(max_run, z - 1 - start) + 1):
            run = flags[start:start + length].all(axis=0) & ~flags[start - 1] & ~flags[start + length]
            kept[start:start + length] |= run
    return kept


def _robust(values: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (scaled MAD) of the finite values."""
    values = values.reshape(-1)[:: max(1, values.size // 500_000)]  # a regular subsample: as robust, and quick
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.nan, np.nan
    median = float(np.median(values))
    return median, float(1.4826 * np.median(np.abs(values - median)))


def _percent(fraction: float) -> str:
    return f"{max(1, round(100 * fraction))}%"


def _unrotate(mask: np.ndarray, angle: float, shape: tuple[int, int]) -> np.ndarray:
    """A mask found on a grid rotated by ``angle`` degrees (reshaped), back on the section's grid of ``shape``."""
    back = ndi.rotate(mask.astype(np.float32), -angle, reshape=True, order=1)
    top, left = (back.shape[0] - shape[0]) // 2, (back.shape[1] - shape[1]) // 2
    return back[top:top + shape[0], left:left + shape[1]] > 0.25


def _to_full(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """A mask on a grid ``factor`` times coarser, at the full resolution ``shape`` (edges extended)."""
    full = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)[:shape[0], :shape[1]]
    return np.pad(full, ((0, shape[0] - full.shape[0]), (0, shape[1] - full.shape[1])), mode="edge")


def suspect_sections(volume, max_run: int = 3, min_area: float = 0.02) -> list[Suspect]:
    """Sections of a stack (z, y, x) that look damaged or lost, for the user to confirm, in the order of the stack.

    Proposed: a section that correlates poorly with both neighbours, far below the stack's typical neighbour
    correlation (measured robustly, on downsampled band-passed sections); blank areas (flat at a constant value) and
    saturated areas (at the stack's maximum) of at least ``min_area`` of a section, where the same place is intact in
    the sections around (within ``max_run``: damage, not structure that persists); folds and cracks, long straight
    streaks darker (or brighter) than both neighbours. Local damage comes with its region (a mask at the volume's
    resolution). Never the first or last section: they cannot be regenerated."""
    vol = check_image(volume, ndims=(3,))
    if not (isinstance(max_run, (int, np.integer)) and max_run >= 1):
        raise ValueError(f"max_run must be a whole number of at least 1, not {max_run!r}")
    if vol.dtype == np.bool_:
        vol = vol.view(np.uint8)
    z, h, w = vol.shape
    if z < 3:
        return []
    block = max(2, -(-max(h, w) // BLOCKS))
    factor = max(1, -(-max(h, w) // WORK_SIZE))
    stats = [_block_stats(section, block) for section in vol]
    spread = np.stack([s[0] for s in stats])
    tops = np.array([s[2] for s in stats])
    saturated = (np.stack([s[1] for s in stats]) >= SATURATED) & (tops == tops.max())[:, None, None]
    flat = (spread <= FLAT * float(np.median(spread))) & ~saturated
    blank, saturated = _bounded_runs(flat, max_run), _bounded_runs(saturated, max_run)

    found: dict[int, list[tuple[str, float, np.ndarray | None]]] = {}
    damaged = np.zeros_like(blank)  # on the grid of blocks: a full-resolution copy of the volume would not fit
    for i in range(1, z - 1):
        area = blank[i] | saturated[i]
        if area.mean() >= min_area:
            damaged[i] = ndi.binary_dilation(area)  # a block more, for the damage's ragged edge
            region = _to_full(damaged[i], block, (h, w))
            for kind, flags in (("blank", blank[i]), ("saturated", saturated[i])):
                if flags.mean() >= min_area / 2:
                    found.setdefault(i, []).append((f"{_percent(flags.mean())} {kind}", flags.mean() / min_area,
                                                    region))

    sections, valid = _band_passed(vol, damaged, block, factor)
    _poor_correlation(sections, valid, found, max_run)
    _streaks(sections, valid, found, factor, (h, w))
    suspects = []
    for i in sorted(found):
        reasons, scores, regions = zip(*found[i])
        region = None if any(r is None for r in regions) else np.logical_or.reduce(regions)
        suspects.append(Suspect(i, "; ".join(dict.fromkeys(reasons)), float(max(scores)), region))
    return suspects


def _band_passed(vol: np.ndarray, damaged: np.ndarray, block: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Downsampled sections without noise and shading, normalised to zero mean and unit variance over their intact
    pixels (damaged ones set to 0), and where they are intact; ``damaged`` is on a grid ``block`` times coarser."""
    sections, valid = [], []
    for section, region in zip(vol, damaged):
        small = _downsample(section, factor)
        rows, cols = ((np.arange(n) * factor + factor // 2) // block for n in small.shape)  # the block of each pixel
        keep = ~region[np.ix_(rows, cols)]
        if keep.any():
            small[~keep] = small[keep].mean()  # no edge at the damage's border
        sigma = max(small.shape) / 16
        small = ndi.gaussian_filter(small, 1.0) - ndi.gaussian_filter(small, sigma)
        mean, std = (small[keep].mean(), small[keep].std()) if keep.any() else (0.0, 0.0)
        sections.append(np.where(keep, (small - mean) / std if std > 0 else 0.0, 0.0).astype(np.float32))
        valid.append(keep)
    return np.stack(sections), np.stack(valid)


def _shifted_correlation(a: np.ndarray, b: np.ndarray, reach: int) -> float:
    """The best correlation of two zero-mean sections over shifts of up to ``reach`` pixels: serial sections are
    never perfectly aligned, and a few pixels' shift alone must not make good neighbours look unrelated."""
    energy = np.sqrt((a * a).sum() * (b * b).sum())
    if energy == 0:
        return np.nan
    cross = np.fft.irfft2(np.fft.rfft2(a) * np.conj(np.fft.rfft2(b)), s=a.shape)
    near = np.r_[0:reach + 1, -reach:0]
    return float(cross[np.ix_(near, near)].max() / energy)


def _poor_correlation(sections: np.ndarray, valid: np.ndarray, found: dict, max_run: int) -> None:
    """Runs of at most ``max_run`` sections (mostly single ones) cut off from the stack on both sides: each pair of
    sections across the run's ends correlates far below the stack's typical neighbours (a lost section replaced by
    noise, a section from elsewhere); within the run the sections may resemble each other."""
    intact = valid.mean(axis=(1, 2)) > 0.05
    reach = max(2, max(sections.shape[1:]) // 32)
    pairs = np.array([_shifted_correlation(a, b, reach) if ia and ib else np.nan
                      for a, b, ia, ib in zip(sections[:-1], sections[1:], intact[:-1], intact[1:])])
    typical, spread = _robust(pairs)
    if not typical > 0.05:  # sections unrelated to each other: nothing to compare with
        return
    threshold = min(POOR_CORRELATION * typical, typical - ROBUST_SPREADS * spread)
    cuts = np.flatnonzero(pairs < threshold)  # pair k joins sections k and k + 1
    for before, after in zip(cuts[:-1], cuts[1:]):
        first, last = before + 1, after
        if last - first + 1 > max_run:
            continue
        score = (typical - max(pairs[before], pairs[after])) / (typical - threshold)
        values = f"{pairs[before]:.2f} and {pairs[after]:.2f} vs typical {typical:.2f}"
        reason = (f"correlates poorly with both neighbours ({values})" if first == last else
                  f"sections {first}-{last} correlate poorly with the sections around them ({values})")
        for i in range(first, last + 1):
            found.setdefault(i, []).append((reason, score, None))


def _segment_means(images: np.ndarray, angle: float, segment: int, width: int) -> np.ndarray:
    """On ``images`` (n, y, x) rotated by ``angle`` degrees: at each place, the least dark of the means over
    SEGMENTS consecutive line segments ``segment`` long and ``width`` wide that run along x through it; NaN where a
    segment leaves the section. A streak is dark all along; natural structure seldom is, over that length."""
    rotate = dict(axes=(2, 1), reshape=True, order=1, mode="constant", cval=0.0)
    turned = ndi.rotate(images, angle, **rotate)
    inside = ndi.rotate(np.ones(images.shape[1:], np.float32), angle, **{**rotate, "axes": (1, 0)}) > 0.99
    means = ndi.uniform_filter(turned, size=(1, width, segment), mode="constant")
    means[:, ~ndi.minimum_filter(inside, size=(width, segment), mode="constant")] = np.nan
    shifts = [round((k - (SEGMENTS - 1) / 2) * segment) for k in range(SEGMENTS)]
    least = np.roll(means, shifts[0], axis=2)
    for shift in shifts[1:]:
        least = np.maximum(least, np.roll(means, shift, axis=2))  # NaN stays NaN
    return least


def _streaks(sections: np.ndarray, valid: np.ndarray, found: dict, factor: int, shape: tuple[int, int]) -> None:
    """Thin long streaks darker (folds) or brighter (cracks) than both neighbours (strong knife marks too).
    Looked for on sections downsampled again to about STREAK_SIZE: lines along many angles make it the slow part."""
    step = max(1, round(max(sections.shape[1:]) / STREAK_SIZE))
    if step > 1:
        sections = np.stack([_downsample(s, step) for s in sections])
        valid = np.stack([_downsample(v, step) > 0.99 for v in valid])
        factor *= step
    inner = valid[1:-1] & valid[:-2] & valid[2:]
    neighbours = np.stack([sections[:-2], sections[2:]])
    darker = np.where(inner, sections[1:-1] - neighbours.min(0), 0.0)  # negative where darker than both
    brighter = np.where(inner, neighbours.max(0) - sections[1:-1], 0.0)  # negative where brighter than both
    contrast = np.concatenate([darker, brighter]).astype(np.float32)
    segment = max(8, max(sections.shape[1:]) // (SEGMENTS + 1))
    n = len(inner)
    best = np.zeros(2 * n)
    hits: dict[int, list] = {}
    for angle in np.arange(0.0, 180.0, ANGLE_STEP):
        means = _segment_means(contrast, angle, segment, 3)
        score = np.empty_like(means)
        for half in (slice(0, n), slice(n, 2 * n)):
            centre, spread = _robust(means[half])
            score[half] = (centre - means[half]) / spread if spread > 0 else np.nan  # all alike: no streak
        per_image = np.nanmax(np.nan_to_num(score, nan=-np.inf), axis=(1, 2))
        for k in np.flatnonzero(per_image > STREAK_SPREADS):
            hits.setdefault(int(k), []).append((angle, score[k]))
        best = np.maximum(best, per_image)
    for k, angles in hits.items():
        j, kind = k % n, ("dark", "bright")[k // n]
        region = np.zeros(inner.shape[1:], bool)
        for angle, score in angles:
            score = np.nan_to_num(score, nan=0.0)
            labels, _ = ndi.label(score > STREAK_SPREADS / 2)  # the streaks' full extent: hysteresis thresholds
            lines = np.isin(labels, np.unique(labels[score > STREAK_SPREADS]))
            region |= _unrotate(ndi.binary_dilation(lines, np.ones((1, SEGMENTS * segment), bool)), angle,
                                inner.shape[1:])
        region = _to_full(ndi.binary_dilation(region, iterations=2), factor, shape)
        reason = f"fold or crack: {kind} streak"
        found.setdefault(j + 1, []).append((reason, best[k] / STREAK_SPREADS, region))


def check_sections(indices, count: int, max_run: int | None = None) -> tuple[int, ...]:
    """Bad sections given as numbers (a script's list, a widget's selection): refused by the rules of
    :func:`parse_sections`, which they go through as their text."""
    try:
        whole = [int(i) for i in indices if float(i) == int(i)]
    except (TypeError, ValueError, OverflowError):
        whole = None
    if whole is None or len(whole) != len(list(indices)):
        raise InputError(f"Bad sections are whole numbers counted from 0, not {list(indices)!r}.")
    return parse_sections(", ".join(str(i) for i in whole), count, max_run)
