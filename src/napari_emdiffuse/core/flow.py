"""Motion between neighbouring sections: Lucas-Kanade optical flow and motion-compensated interpolation.

Membranes and organelles run obliquely through a volume, so between two acquired slices they move as well as
change. Interpolating along that motion, instead of straight across z, puts them close to where they are in the
missing slices (on 10 nm FIB-SEM with every 4th slice kept: about +1.0 dB PSNR over linear interpolation and far
less blur, see ``benchmarks/isotropic_quality.py``); the diffusion model then only adds what motion cannot explain.

Torch only (batched, runs where the model runs). Every step is local: a fixed, small pyramid and box windows, so a
plane processed in chunks with a halo gets (almost exactly) the flow of the whole plane.
"""

from __future__ import annotations

import numpy as np

RADIUS = 16  # half-width of the window over which motion is assumed constant (pixels, at every pyramid level)
RADII = (4, 8, 16, 32, 64)  # the windows of the flow estimates motion_interpolation averages over
LEVELS = 3  # pyramid levels: motion up to about RADIUS * 2 ** (LEVELS - 1) pixels
WARPS = 3  # Lucas-Kanade iterations per level


def _box(x, radius: int):
    """Window sums (up to a constant) over (2 radius + 1)^2 pixels; separable, so cheap for large windows."""
    import torch.nn.functional as F

    k = 2 * radius + 1
    x = F.avg_pool2d(x, (k, 1), stride=1, padding=(radius, 0))
    return F.avg_pool2d(x, (1, k), stride=1, padding=(0, radius))


def warp(image, flow):
    """``image`` sampled at ``position + flow`` (flow in pixels, channels y then x), bilinear, edges repeated."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    ys = torch.arange(h, dtype=image.dtype, device=image.device).view(1, h, 1)
    xs = torch.arange(w, dtype=image.dtype, device=image.device).view(1, 1, w)
    y = (ys + flow[:, 0]) * (2 / max(h - 1, 1)) - 1
    x = (xs + flow[:, 1]) * (2 / max(w - 1, 1)) - 1
    return F.grid_sample(image, torch.stack([x, y], dim=-1), mode="bilinear", padding_mode="border",
                         align_corners=True)


def lucas_kanade(reference, moving, radius: int = RADIUS, levels: int = LEVELS, warps: int = WARPS):
    """Flow ``v`` (n, 2, h, w) with ``moving(p + v(p)) ~ reference(p)``, for (n, 1, h, w) tensors.

    Iterative Lucas-Kanade, coarse to fine: at each level the moving image is warped by the current flow and the
    remaining motion solves, per pixel, the 2x2 least-squares system of the brightness-constancy equation summed
    over a box window. Windows without texture (singular systems) keep the flow they had.
    """
    import torch
    import torch.nn.functional as F

    pyramid = [(reference, moving)]
    for _ in range(levels - 1):
        r, m = pyramid[-1]
        if min(r.shape[-2:]) < 4 * radius:  # too small to learn anything new at a coarser level
            break
        pyramid.append((F.avg_pool2d(r, 2, ceil_mode=True), F.avg_pool2d(m, 2, ceil_mode=True)))
    flow = None
    for r, m in reversed(pyramid):
        if flow is None:
            flow = r.new_zeros((r.shape[0], 2) + r.shape[-2:])
        else:
            flow = 2 * F.interpolate(flow, size=r.shape[-2:], mode="bilinear", align_corners=False)
        for _ in range(warps):
            moved = warp(m, flow)
            gy, gx = torch.gradient(moved, dim=(-2, -1))
            error = gy * flow[:, :1] + gx * flow[:, 1:] + r - moved
            syy, sxy, sxx = _box(gy * gy, radius), _box(gx * gy, radius), _box(gx * gx, radius)
            by, bx = _box(gy * error, radius), _box(gx * error, radius)
            det = syy * sxx - sxy * sxy
            solvable = det > 1e-6 * (syy + sxx) ** 2 + 1e-12
            det = torch.where(solvable, det, torch.ones_like(det))
            new = torch.cat([(sxx * by - sxy * bx) / det, (syy * bx - sxy * by) / det], dim=1)
            flow = torch.where(solvable, new, flow)
    return flow


def motion_interpolation(below: np.ndarray, above: np.ndarray, fractions, device=None) -> np.ndarray:
    """The planes at ``fractions`` (0 = below, 1 = above) of the way between two slices, following their motion.

    A point at ``p`` in ``below`` is at ``p + v`` in ``above`` and, moving steadily, at ``p + s v`` at fraction
    ``s``: the plane there blends ``below`` sampled at ``p - s v`` and ``above`` at ``p + (1 - s) v``, weighted by
    closeness. One flow estimate is confidently wrong where the sections change a lot or have little texture, so
    the result is the mean over several: windows of each size in ``RADII``, estimated from below and from above.
    Where they agree it is as sharp as one; where they disagree, a blend rather than a wrong guess (on 10 nm
    FIB-SEM, three windows of 8-32 pixels: +0.18 dB at R = 4 and +0.25 dB at R = 6 over one of 16 pixels; five of
    4-64 pixels: another +0.06 to +0.14 dB at R = 4 along each axis of both volumes).
    Shapes as for linear interpolation: one pair (y, x) with fractions (k,) gives (k, y, x); n pairs
    (n, y, x) with fractions (n, k) give (n, k, y, x). float32, computed on ``device`` (default: the CPU).
    """
    import torch

    with torch.no_grad():
        b = torch.tensor(np.asarray(below, np.float32), device=device)  # a copy: inputs may be read-only views
        a = torch.tensor(np.asarray(above, np.float32), device=device)
        single = b.ndim == 2
        b, a = (t.reshape((-1, 1) + t.shape[-2:]) for t in (b, a))
        s = torch.tensor(np.asarray(fractions, np.float32), device=device).reshape(len(b), -1, 1, 1)
        total = torch.zeros((len(b), s.shape[1]) + b.shape[-2:], device=device)
        for radius in RADII:
            for first, second, t in ((b, a, s), (a, b, 1 - s)):
                flow = lucas_kanade(first, second, radius)
                for i in range(s.shape[1]):
                    ti = t[:, i:i + 1]
                    total[:, i:i + 1] += (1 - ti) * warp(first, -ti * flow) + ti * warp(second, (1 - ti) * flow)
        out = (total / (2 * len(RADII))).cpu().numpy()
    return out[0] if single else out
