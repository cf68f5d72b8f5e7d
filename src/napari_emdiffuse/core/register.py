"""Registration of image pairs acquired twice (fast/slow, low/high resolution) before fine-tuning.

A slow re-scan of the same field is displaced, and also slightly rotated, scaled and distorted by drift: a rotation
of 0.5° alone moves the corners of a 768 x 1024 image by about 5 px, and a model trained on such a pair learns to
blur. The alignment has three stages, all on lightly smoothed images (a matched filter: unlike phase correlation it
does not amplify the high frequencies where short-dwell noise dominates):

1. a global translation by cross-correlation of the whole images (large displacements);
2. a global affine transform (shift, rotation, scale, shear): local shifts of blocks on a grid, measured by
   cross-correlation, fitted robustly (iteratively reweighted least squares with Tukey weights, so blocks without
   structure or with local changes do not pull it); re-measured on the aligned pair and refined, three times;
3. a smooth displacement field for what is left (drift, distortion): Lucas-Kanade optical flow
   (:mod:`.flow`) over large windows on the affinely aligned pair, smoothed heavily, refined twice.

The result is one dense field ``d`` with ``target(p + d(p)) ~ input(p)``, applied to the target with cubic
interpolation (for super-resolution on the target's finer grid). The misalignment that remains is measured on
the aligned pair per 64-px block (cross-correlation again): its median and 95th percentile, and the per-block map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .normalize import InputError

RESIDUAL_BLOCK = 64  # the blocks over which the remaining misalignment is measured and reported
WARN_RESIDUAL = 1.0  # px: above this, a model learns from misaligned pixels (and learns to blur)
MIN_CORRELATION = 0.3  # of the aligned, smoothed pair: below it the two images do not show the same structure
FIELD_SIGMA = 40.0  # px: smoothing of the distortion field (drift and distortion vary over hundreds of pixels)


@dataclass
class Registration:
    shift: tuple[float, float]  # (dy, dx) that moves the target onto the input at the image's centre, input pixels
    correlation: float  # Pearson correlation of the aligned pair (smoothed), 1 = identical structure
    residual: float  # median misalignment over 64-px blocks after alignment, input pixels
    residual_p95: float  # its 95th percentile
    crop: tuple[slice, slice]  # the region of the input grid where the aligned target is valid
    affine: np.ndarray  # (2, 3): d = affine @ (y - cy, x - cx, 1), the global part of the field, input pixels
    field: np.ndarray  # (2, h, w) float32: the target is sampled at p + field(p) (input grid, input pixels)
    residual_map: np.ndarray  # (rows, columns) misalignment of each 64-px block of the crop, px

    @property
    def rotation(self) -> float:
        """Degrees, counter-clockwise in (y, x) image coordinates."""
        m = np.eye(2) + self.affine[:, :2]
        return float(np.degrees(np.arctan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1])))

    @property
    def scale(self) -> float:
        return float(np.sqrt(abs(np.linalg.det(np.eye(2) + self.affine[:, :2]))))

    @property
    def warning(self) -> str | None:
        """A sentence when the pair stays misaligned: median above 1 px, or 95th percentile above 2 (single blocks'
        measurements of noisy pairs spread by a few tenths of a pixel)."""
        if self.residual <= WARN_RESIDUAL and self.residual_p95 <= 2 * WARN_RESIDUAL:
            return None
        return (f"after registration the pair is still misaligned by {self.residual:.2f} px (median) and "
                f"{self.residual_p95:.2f} px (95th percentile) over 64-px blocks; a model learns to blur from "
                "misaligned pixels")

    def summary(self) -> dict:
        return {"shift": [round(s, 3) for s in self.shift], "rotation_deg": round(self.rotation, 4),
                "scale": round(self.scale, 5), "residual_px": round(self.residual, 3),
                "residual_p95_px": round(self.residual_p95, 3), "correlation": round(self.correlation, 4)}


def _smooth(image: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image.astype(np.float64), sigma)


def _peak_shifts(corr: np.ndarray) -> np.ndarray:
    """(n, 2) sub-pixel peak positions of (n, h, w) circular correlations, as signed shifts (parabolic fit)."""
    n, h, w = corr.shape
    flat = corr.reshape(n, -1).argmax(axis=1)
    py, px = np.unravel_index(flat, (h, w))
    idx = np.arange(n)
    out = np.empty((n, 2))
    for axis, (p, size) in enumerate(((py, h), (px, w))):
        lo, hi = (p - 1) % size, (p + 1) % size
        c0 = corr[idx, py, px]
        cm = corr[idx, lo, px] if axis == 0 else corr[idx, py, lo]
        cp = corr[idx, hi, px] if axis == 0 else corr[idx, py, hi]
        denom = cm - 2 * c0 + cp
        frac = np.where(np.abs(denom) > 1e-12, 0.5 * (cm - cp) / np.where(denom == 0, 1, denom), 0.0)
        s = p + frac
        out[:, axis] = np.where(s > size / 2, s - size, s)
    return out


def _block_correlation(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For (n, h, w) stacks: the shifts ``s`` with ``b(p - s) ~ a(p)`` and the normalised peak height (0-1)."""
    window = np.outer(np.hanning(a.shape[1]), np.hanning(a.shape[2]))
    a = (a - a.mean(axis=(1, 2), keepdims=True)) * window
    b = (b - b.mean(axis=(1, 2), keepdims=True)) * window
    corr = np.fft.irfft2(np.fft.rfft2(a) * np.conj(np.fft.rfft2(b)), s=a.shape[1:])
    norm = np.sqrt((a ** 2).sum(axis=(1, 2)) * (b ** 2).sum(axis=(1, 2))) + 1e-12
    return _peak_shifts(corr), corr.max(axis=(1, 2)) / norm


def cross_correlation_shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Shift (dy, dx) such that ``b`` shifted by it matches ``a``; parabolic sub-pixel refinement of the peak."""
    shift, _ = _block_correlation(a[None].astype(np.float64), b[None].astype(np.float64))
    return float(shift[0, 0]), float(shift[0, 1])


def shift_image(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    from scipy.ndimage import shift as nd_shift

    return nd_shift(image.astype(np.float64), shift, order=3, mode="nearest")


def _blocks(shape: tuple[int, int], size: int, step: int) -> np.ndarray:
    """(n, 2) top-left corners of ``size`` blocks every ``step`` pixels covering ``shape`` (the last flush)."""
    def starts(n):
        s = list(range(0, n - size + 1, step))
        return s + [n - size] if s and s[-1] != n - size else s

    return np.array([(y, x) for y in starts(shape[0]) for x in starts(shape[1])], int).reshape(-1, 2)


def block_displacements(a: np.ndarray, b: np.ndarray, size: int, step: int):
    """Local displacements ``r`` with ``b(p + r) ~ a(p)`` of blocks on a grid: centres (n, 2), r (n, 2), peak (n,)."""
    corners = _blocks(a.shape, size, step)
    stack = lambda img: np.stack([img[y:y + size, x:x + size] for y, x in corners])  # noqa: E731
    shifts, peak = _block_correlation(stack(a), stack(b))
    return corners + (size - 1) / 2, -shifts, peak


def _affine_field(affine: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.stack([affine[i, 0] * (yy - cy) + affine[i, 1] * (xx - cx) + affine[i, 2] for i in range(2)])


def _fit_affine(centres: np.ndarray, displacements: np.ndarray, weights: np.ndarray, shape) -> np.ndarray:
    """Robust (IRLS, Tukey biweight) least-squares affine model of displacements at block centres: (2, 3)."""
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    design = np.column_stack([centres[:, 0] - cy, centres[:, 1] - cx, np.ones(len(centres))])
    w = weights.copy()
    affine = np.zeros((2, 3))
    for _ in range(10):
        sw = np.sqrt(w)[:, None]
        affine = np.linalg.lstsq(design * sw, displacements * sw, rcond=None)[0].T
        error = np.hypot(*(displacements - design @ affine.T).T)
        scale = max(1.4826 * np.median(error[w > 0]) if (w > 0).any() else 1.0, 0.05)
        w = weights * np.clip(1 - (error / (4.685 * scale)) ** 2, 0, None) ** 2
        if (w > 0).sum() < 6:
            break
    return affine


def global_affine(a: np.ndarray, b: np.ndarray, sizes: tuple[int, ...] = (128, 128, 96)) -> np.ndarray:
    """The affine displacement ``d`` (2, 3) with ``b(p + d(p)) ~ a(p)`` of two smoothed images: a translation by
    cross-correlation of the whole images, then, for each block size in ``sizes``, local shifts of blocks by
    cross-correlation (robust to displacements of many pixels) fitted robustly on the pair aligned so far."""
    dy, dx = cross_correlation_shift(a, b)
    affine = np.array([[0.0, 0.0, -dy], [0.0, 0.0, -dx]])
    for size in sizes:
        field = _affine_field(affine, a.shape)
        centres, r, peak = block_displacements(a, warp_image(b, field, order=1), size, size // 2)
        at = np.round(centres).astype(int)
        weights = np.clip(peak, 0, None) ** 2 * (np.hypot(*r.T) < size / 4)
        if (weights > 0).sum() < 6:
            break
        affine = _fit_affine(centres, field[:, at[:, 0], at[:, 1]].T + r, weights, a.shape)
    return affine


def warp_image(image: np.ndarray, field: np.ndarray, order: int = 3) -> np.ndarray:
    """``image`` sampled at ``p + field(p)`` (float64; cubic spline; edges repeated)."""
    from scipy.ndimage import map_coordinates

    grid = np.mgrid[0:field.shape[1], 0:field.shape[2]].astype(np.float64)
    return map_coordinates(image.astype(np.float64), grid + field, order=order, mode="nearest")


def local_shifts(a: np.ndarray, b: np.ndarray, corners: np.ndarray, size: int, field: np.ndarray | None = None,
                 iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Displacements ``r`` (n, 2) with ``b(p + field(p) + r) ~ a(p)`` of the ``size`` blocks at ``corners``.

    Lucas-Kanade per block with the block's own gain and offset (a noisy and a clean acquisition differ in both),
    iterated: unbiased near zero, unlike the peak of a windowed cross-correlation. Also returns whether each block
    can be trusted, as the structure tensor's smaller eigenvalue (the inverse of the estimate's variance along its
    worst direction; 0 for blocks with too little structure to tell), (n,).
    """
    from scipy.ndimage import map_coordinates

    offsets = np.mgrid[0:size, 0:size].astype(np.float64)
    points = corners[:, :, None, None] + offsets[None]  # (n, 2, size, size)
    ab = np.stack([a[y:y + size, x:x + size] for y, x in corners])
    ab = ab - ab.mean(axis=(1, 2), keepdims=True)
    base = points if field is None else points + np.stack([field[:, y:y + size, x:x + size] for y, x in corners])
    r = np.zeros((len(corners), 2))
    for _ in range(iterations):
        where = (base + r[:, :, None, None]).transpose(1, 0, 2, 3)
        bb = map_coordinates(b, where, order=3, mode="nearest")
        gy, gx = np.gradient(bb, axis=(1, 2))
        bc = bb - bb.mean(axis=(1, 2), keepdims=True)
        gain = (bc * ab).sum(axis=(1, 2)) / np.maximum((bc ** 2).sum(axis=(1, 2)), 1e-12)
        error = ab - gain[:, None, None] * bc
        gy, gx = gain[:, None, None] * gy, gain[:, None, None] * gx
        syy, sxy, sxx = ((u * v).sum(axis=(1, 2)) for u, v in ((gy, gy), (gx, gy), (gx, gx)))
        by, bx = (gy * error).sum(axis=(1, 2)), (gx * error).sum(axis=(1, 2))
        det = syy * sxx - sxy ** 2
        safe = np.where(det > 0, det, 1)
        r += np.clip(np.stack([(sxx * by - sxy * bx) / safe, (syy * bx - sxy * by) / safe], axis=1), -2, 2)
    smallest = (syy + sxx) / 2 - np.sqrt(((syy - sxx) / 2) ** 2 + sxy ** 2)
    measurable = (det > 0) & (gain > 0) & (smallest > 0.05 * np.median(smallest))
    return r, np.where(measurable, smallest, 0.0)


def _distortion(a, b, field, size: int = RESIDUAL_BLOCK):
    """What ``field`` still misses: local shifts of overlapping blocks, outliers dropped, smoothed on their grid
    (normalised convolution) and interpolated to every pixel."""
    from scipy.interpolate import RegularGridInterpolator
    from scipy.ndimage import gaussian_filter, median_filter

    corners = _blocks(a.shape, size, size // 2)
    r, weight = local_shifts(a, b, corners, size, field)
    ys, xs = np.unique(corners[:, 0]), np.unique(corners[:, 1])
    grid_r = r.reshape(len(ys), len(xs), 2)
    weight = weight.reshape(len(ys), len(xs))
    typical = np.stack([median_filter(np.where(weight > 0, grid_r[..., i], np.nan), size=3, mode="nearest")
                        for i in range(2)], axis=-1)  # NaNs spread: only a fully measurable 3x3 has a median
    filled = np.where(np.isfinite(typical), typical, grid_r)
    weight *= np.hypot(*(grid_r - filled).transpose(2, 0, 1)) < 1.0  # disagrees with its neighbours: an outlier
    sigma = FIELD_SIGMA / (size // 2)
    norm = gaussian_filter(weight, sigma, mode="nearest") + 1e-12
    smooth = [gaussian_filter(grid_r[..., i] * weight, sigma, mode="nearest") / norm for i in range(2)]
    centres = (ys + (size - 1) / 2, xs + (size - 1) / 2)
    yy, xx = np.mgrid[0:a.shape[0], 0:a.shape[1]].astype(np.float64)
    at = np.stack([np.clip(yy, centres[0][0], centres[0][-1]), np.clip(xx, centres[1][0], centres[1][-1])], -1)
    return np.stack([RegularGridInterpolator(centres, f)(at) for f in smooth])


def _valid_crop(field: np.ndarray) -> tuple[slice, slice]:
    """The largest centred-ish rectangle of the input grid where ``p + field(p)`` lies inside the target."""
    h, w = field.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    sy, sx = yy + field[0], xx + field[1]
    valid = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
    top, bottom, left, right = 0, h, 0, w
    while bottom - top > 0 and right - left > 0:
        inner = valid[top:bottom, left:right]
        bad = [(~inner[0]).sum(), (~inner[-1]).sum(), (~inner[:, 0]).sum(), (~inner[:, -1]).sum()]
        worst = int(np.argmax(bad))
        if bad[worst] == 0:
            break
        if worst == 0:
            top += 1
        elif worst == 1:
            bottom -= 1
        elif worst == 2:
            left += 1
        else:
            right -= 1
    return slice(top, bottom), slice(left, right)


def residual_misalignment(a: np.ndarray, b: np.ndarray, block: int = RESIDUAL_BLOCK) -> np.ndarray:
    """Misalignment (px) of each ``block`` of two aligned, smoothed images: (rows, columns); NaN where a block has
    too little structure to tell."""
    rows, cols = a.shape[0] // block, a.shape[1] // block
    if rows == 0 or cols == 0:
        return np.zeros((0, 0))
    corners = _blocks((rows * block, cols * block), block, block)
    r, weight = local_shifts(a, b, corners, block)
    return np.where(weight > 0, np.hypot(r[:, 0], r[:, 1]), np.nan).reshape(rows, cols)


def register_pair(moving_ref: np.ndarray, target: np.ndarray, min_correlation: float = MIN_CORRELATION
                  ) -> Registration:
    """Align ``target`` onto ``moving_ref`` (same grid, same shape) and measure what is left.

    Raises :class:`InputError` when the shapes differ or the aligned images do not show the same structure.
    """
    if moving_ref.shape != target.shape or moving_ref.ndim != 2:
        raise InputError(f"The two images must be 2D with the same shape (got {moving_ref.shape} and "
                         f"{target.shape}).")
    if min(moving_ref.shape) < 2 * RESIDUAL_BLOCK:
        raise InputError(f"The two images are too small to be registered (at least {2 * RESIDUAL_BLOCK} pixels "
                         f"along each side, not {moving_ref.shape[0]} x {moving_ref.shape[1]}).")
    a, b = _smooth(moving_ref), _smooth(target)
    shape = a.shape
    affine = global_affine(a, b)
    field = _affine_field(affine, shape)
    # unsmoothed: the gradients come from both images' structure and the noise averages out over each block
    # (smoothed even by 1 px, the errors on 30- and 8-electron pairs grew by a third)
    a, b = moving_ref.astype(np.float64), target.astype(np.float64)
    for _ in range(2):  # then what is left (drift, distortion), by a gradient-based estimate unbiased near zero
        field = field + _distortion(a, b, field)
    crop = _valid_crop(field)
    ys, xs = crop
    if ys.stop - ys.start < RESIDUAL_BLOCK or xs.stop - xs.start < RESIDUAL_BLOCK:
        raise InputError("The two images overlap too little to be registered; are they the same field of view?")
    # judged on coarse structure: short-dwell noise (8 electrons a pixel) halves the correlation of finer detail
    coarse = warp_image(_smooth(target, 4.0), field)[crop]
    correlation = float(np.corrcoef(_smooth(moving_ref, 4.0)[crop].ravel(), coarse.ravel())[0, 1])
    if not np.isfinite(correlation) or correlation < min_correlation:
        raise InputError(f"The two images could not be registered (correlation {correlation:.2f} after alignment); "
                         "are they the same field of view?")
    residual_map = residual_misalignment(a[crop], warp_image(b, field)[crop])
    values = residual_map[np.isfinite(residual_map)]
    values = values if values.size else np.zeros(1)
    centre = field[:, shape[0] // 2, shape[1] // 2]
    return Registration((-float(centre[0]), -float(centre[1])), correlation, float(np.median(values)),
                        float(np.percentile(values, 95)), crop, affine, field.astype(np.float32), residual_map)


def upsampled_field(field: np.ndarray, factor: int) -> np.ndarray:
    """A field on the input grid as the same displacement on a ``factor`` times finer grid (in its pixels)."""
    if factor == 1:
        return field
    import torch
    import torch.nn.functional as F

    fine = F.interpolate(torch.from_numpy(np.asarray(field, np.float32))[None], scale_factor=factor,
                         mode="bilinear", align_corners=False)[0].numpy()
    return fine * factor


def apply_registration(target: np.ndarray, reg: Registration, factor: int = 1) -> np.ndarray:
    """The target aligned onto the input, cropped to the valid region (on its own grid, ``factor`` x finer)."""
    aligned = warp_image(target, upsampled_field(reg.field, factor).astype(np.float64))
    ys, xs = reg.crop
    return aligned[ys.start * factor: ys.stop * factor, xs.start * factor: xs.stop * factor]
