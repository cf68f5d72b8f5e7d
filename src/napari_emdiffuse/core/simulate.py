"""Degradations that a microscope produces, simulated on clean images (for training and benchmarks).

All functions take and return float images scaled so that the clean image's 0.5-99.5 percentile range is [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


def scale01(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [0.5, 99.5])
    return ((image.astype(np.float32) - low) / max(high - low, 1e-6)).astype(np.float32)


@dataclass
class SEMNoise:
    """Short-dwell SEM noise: shot noise, read noise, scan correlation and slight beam blur.

    ``electrons`` is the mean number of detected electrons per pixel at mean intensity (fewer = noisier);
    ``read`` the std of Gaussian detector noise as a fraction of the range; ``correlation_x/y`` the Gaussian
    sigma (pixels) that correlates neighbouring noise values (scan lines correlate along x); ``blur`` the beam blur.
    ``inverted``: the image shows the detector signal inverted, as backscattered-electron images of stained tissue
    usually are (membranes dark): dark pixels then collected the most electrons and carry the most shot noise, as
    in the real short-dwell/long-dwell pair (noise std 8.9 grey levels in its darkest eighth, 6.9 in its brightest).
    """

    electrons: float = 200.0
    read: float = 0.01
    correlation_x: float = 0.6
    correlation_y: float = 0.6
    blur: float = 0.0
    inverted: bool = False

    def __call__(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        signal = gaussian_filter(clean, self.blur) if self.blur > 0 else clean
        signal = np.clip(signal, 0.0, None) * 0.9 + 0.05  # detectors never see exactly zero electrons
        detected = np.clip(1.0 - signal, 0.05, None) if self.inverted else signal
        mean = float(detected.mean())
        shot = rng.poisson(detected * (self.electrons / mean)) * (mean / self.electrons) - detected
        noise = (-shot if self.inverted else shot) + rng.normal(0.0, self.read, size=clean.shape)
        if self.correlation_x > 0 or self.correlation_y > 0:
            std = noise.std()
            noise = gaussian_filter(noise, (self.correlation_y, self.correlation_x))
            noise *= std / max(noise.std(), 1e-12)  # correlation redistributes, it does not remove, noise power
        return ((signal - 0.05) / 0.9 + noise / 0.9).astype(np.float32)

    @classmethod
    def random(cls, rng: np.random.Generator, electrons=(15.0, 400.0), read=(0.0, 0.05)) -> SEMNoise:
        """Levels from barely noisy to very noisy; a third of draws with strong scan-line correlation; half of them
        with the detector signal shown inverted."""
        scanline = rng.random() < 0.33
        cx = rng.uniform(0.8, 2.0) if scanline else rng.uniform(0.0, 1.0)
        return cls(
            electrons=float(np.exp(rng.uniform(np.log(electrons[0]), np.log(electrons[1])))),
            read=float(rng.uniform(*read)),
            correlation_x=float(cx),
            correlation_y=float(rng.uniform(0.0, 0.3) if scanline else rng.uniform(0.0, 1.0)),
            blur=float(rng.uniform(0.0, 0.8)),
            inverted=bool(rng.random() < 0.5),
        )


def in_detector_range(image: np.ndarray, rng: np.random.Generator, contrast=(0.3, 1.0)) -> np.ndarray:
    """``image`` (its 0.5-99.5 percentile range scaled to [0, 1]) placed in a random part of the detector's range.

    Real acquisitions rarely fill the detector's range (the real pair's clean image spans 40% of its 8 bits, the
    FIB-SEM slices about 50%), and shot noise is set by the electrons collected, not by the image's contrast: noise
    simulated on a full-range image is up to three times weaker, relative to the structures, than the same dose on a
    real one. Training on these placements covers both.
    """
    c = float(np.exp(rng.uniform(np.log(contrast[0]), np.log(contrast[1]))))
    return (rng.uniform(0.0, 1.0 - c) + c * image).astype(np.float32)


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """What a detector with ``factor``-times larger pixels sees: the mean over each block (crops the remainder)."""
    h, w = (image.shape[-2] // factor) * factor, (image.shape[-1] // factor) * factor
    view = image[..., :h, :w].reshape(*image.shape[:-2], h // factor, factor, w // factor, factor)
    return view.mean(axis=(-3, -1)).astype(np.float32)


def coarser_voxels(volume: np.ndarray, scale: float) -> np.ndarray:
    """The volume (z, y, x) as recorded with ``1 / scale`` times larger voxels (``scale`` <= 1, any fraction):
    each voxel the mean of the fine ones it covers (float32)."""
    import torch
    import torch.nn.functional as F

    if not 0 < scale <= 1:
        raise ValueError(f"scale must lie in (0, 1], not {scale}")
    fine = torch.from_numpy(np.asarray(volume, np.float32))[None, None]
    return F.interpolate(fine, scale_factor=scale, mode="area")[0, 0].numpy()


def synthetic_em(shape: tuple[int, int] = (512, 512), seed: int = 0) -> np.ndarray:
    """A clean EM-like image in [0, 1]: bright cytoplasm, dark membranes between cells, vesicles and mitochondria.

    Generated on the fly for tests and the sample data (real EM must not ship with the package).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # cell membranes: borders of a warped Voronoi partition
    n_cells = max(4, h * w // 9000)
    centres = rng.uniform(0, 1, size=(n_cells, 2)) * (h, w)
    warp_y = gaussian_filter(rng.normal(0, 1, shape), 12) * 120
    warp_x = gaussian_filter(rng.normal(0, 1, shape), 12) * 120
    d = np.stack([(yy + warp_y - cy) ** 2 + (xx + warp_x - cx) ** 2 for cy, cx in centres])
    d.sort(axis=0)
    gap = np.sqrt(d[1]) - np.sqrt(d[0])
    image = 0.65 + 0.08 * gaussian_filter(rng.normal(0, 1, shape), 3)
    image -= 0.45 * np.exp(-(gap / 2.2) ** 2)
    # vesicles: small dark rings; mitochondria: dark ellipses with lighter cristae stripes
    for _ in range(h * w // 2500):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 7)
        ring = np.abs(np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r)
        image -= 0.3 * np.exp(-(ring / 1.0) ** 2)
    for _ in range(max(1, h * w // 40000)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        a, b, t = rng.uniform(15, 35), rng.uniform(8, 14), rng.uniform(0, np.pi)
        u = ((yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)) / a
        v = (-(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)) / b
        inside = np.clip(1.5 * (1 - np.sqrt(u**2 + v**2)), 0, 1)
        image -= inside * (0.3 + 0.12 * np.cos(u * a / 2.5))
    return np.clip(gaussian_filter(image, 0.7), 0, 1).astype(np.float32)


def synthetic_volume(shape: tuple[int, int, int] = (64, 128, 128), seed: int = 0) -> np.ndarray:
    """A clean, isotropic EM-like volume in [0, 1] (z, y, x): the 3D counterpart of :func:`synthetic_em`.

    Cells of a warped 3D Voronoi partition with dark membranes, vesicles as dark spherical shells and mitochondria
    as dark ellipsoids; used for isotropic-reconstruction figures and the sample volume. Each object is drawn in
    its own bounding box (its profile is below 1e-6 outside), so the time grows with the volume, not its square.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    warped = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    warped += np.stack([gaussian_filter(rng.normal(0, 1, shape), 10) * 100 for _ in range(3)])
    centres = rng.uniform(0, 1, size=(max(4, int(np.prod(shape)) // 15000), 3)) * shape
    d, _ = cKDTree(centres).query(warped.reshape(3, -1).T, k=2)  # distances to the two nearest cell centres
    volume = 0.65 + 0.08 * gaussian_filter(rng.normal(0, 1, shape), 3)
    volume -= 0.45 * np.exp(-((d[:, 1] - d[:, 0]).reshape(shape) / 2.2) ** 2)
    del warped, d

    def box(centre, reach):
        """The slices of the volume within ``reach`` of ``centre`` and the coordinates there (open grids)."""
        sl = tuple(slice(max(0, int(c - r)), min(n, int(c + r) + 2)) for c, r, n in zip(centre, reach, shape))
        return sl, np.ogrid[sl]

    for _ in range(int(np.prod(shape)) // 8000):
        c, r = rng.uniform(0, 1, 3) * shape, rng.uniform(3, 7)
        sl, grid = box(c, [r + 4] * 3)
        shell = np.abs(np.sqrt(sum((grid[a] - c[a]) ** 2 for a in range(3))) - r)
        volume[sl] -= 0.3 * np.exp(-(shell / 1.0) ** 2)
    for _ in range(max(1, int(np.prod(shape)) // 400000)):
        c, radii = rng.uniform(0, 1, 3) * shape, rng.uniform([8, 8, 15], [14, 14, 35])
        sl, grid = box(c, radii)
        u = np.sqrt(sum(((grid[a] - c[a]) / radii[a]) ** 2 for a in range(3)))
        volume[sl] -= np.clip(1.5 * (1 - u), 0, 1) * (0.3 + 0.12 * np.cos((grid[2] - c[2]) / 2.5))
    return np.clip(gaussian_filter(volume, 0.7), 0, 1).astype(np.float32)
