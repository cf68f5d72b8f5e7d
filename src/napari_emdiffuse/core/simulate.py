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
    """

    electrons: float = 200.0
    read: float = 0.01
    correlation_x: float = 0.6
    correlation_y: float = 0.6
    blur: float = 0.0

    def __call__(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        signal = gaussian_filter(clean, self.blur) if self.blur > 0 else clean
        signal = np.clip(signal, 0.0, None) * 0.9 + 0.05  # detectors never see exactly zero electrons
        mean = float(signal.mean())
        shot = rng.poisson(signal * (self.electrons / mean)) * (mean / self.electrons) - signal
        noise = shot + rng.normal(0.0, self.read, size=clean.shape)
        if self.correlation_x > 0 or self.correlation_y > 0:
            std = noise.std()
            noise = gaussian_filter(noise, (self.correlation_y, self.correlation_x))
            noise *= std / max(noise.std(), 1e-12)  # correlation redistributes, it does not remove, noise power
        return ((signal - 0.05) / 0.9 + noise / 0.9).astype(np.float32)

    @classmethod
    def random(cls, rng: np.random.Generator, electrons=(15.0, 400.0), read=(0.0, 0.05)) -> SEMNoise:
        """Levels from barely noisy to very noisy; a third of draws with strong scan-line correlation."""
        scanline = rng.random() < 0.33
        cx = rng.uniform(0.8, 2.0) if scanline else rng.uniform(0.0, 1.0)
        return cls(
            electrons=float(np.exp(rng.uniform(np.log(electrons[0]), np.log(electrons[1])))),
            read=float(rng.uniform(*read)),
            correlation_x=float(cx),
            correlation_y=float(rng.uniform(0.0, 0.3) if scanline else rng.uniform(0.0, 1.0)),
            blur=float(rng.uniform(0.0, 0.8)),
        )


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """What a detector with ``factor``-times larger pixels sees: the mean over each block (crops the remainder)."""
    h, w = (image.shape[-2] // factor) * factor, (image.shape[-1] // factor) * factor
    view = image[..., :h, :w].reshape(*image.shape[:-2], h // factor, factor, w // factor, factor)
    return view.mean(axis=(-3, -1)).astype(np.float32)
