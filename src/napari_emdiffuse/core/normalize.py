"""Robust intensity normalisation and its exact inverse, for 8-bit, 16-bit and float images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Percentiles mapped to 0 and 1: robust to hot pixels and saturated specks, and identical in training and use.
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


class InputError(ValueError):
    """The image cannot be processed; the message is one sentence for the user."""


NOT_FINITE_INPUT = "The image contains NaN or infinite values"


def check_layout(shape: tuple[int, ...], dtype, ndims: tuple[int, ...] = (2, 3)) -> None:
    """Refuse an image by its shape and type alone (nothing read: the same check for arrays in memory and for lazy
    Zarr volumes), with a clear sentence."""
    shape, dtype = tuple(shape), np.dtype(dtype)
    if 0 in shape:
        raise InputError("The image is empty.")
    if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InputError(f"Images of type {dtype} are not supported; use integer or float grey values.")
    if len(shape) >= 3 and shape[-1] in (3, 4) and min(shape[-3:-1]) > 4:
        raise InputError("This looks like an RGB(A) image; convert it to greyscale first.")
    if len(shape) not in ndims:
        raise InputError(f"Expected a 2D image or a 3D stack (z, y, x), got {len(shape)} dimensions {shape}.")


def check_finite(arr: np.ndarray, where: str = "") -> np.ndarray:
    """Refuse input values that are not finite; ``where`` names the part read (e.g. a chunk of a volume)."""
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError(f"{NOT_FINITE_INPUT}{where}; nothing was written.")
    return arr


def check_image(image, ndims: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Return the image as an array or raise :class:`InputError` with a clear sentence."""
    arr = np.asarray(image)
    check_layout(arr.shape, arr.dtype, ndims)
    return check_finite(arr)


@dataclass(frozen=True)
class Normalizer:
    """Affine map of intensities ``[low, high] -> [0, 1]`` and back into the original dtype."""

    low: float
    high: float
    dtype: np.dtype

    @classmethod
    def fit(cls, image: np.ndarray, max_samples: int = 2_000_000) -> Normalizer:
        flat = np.asarray(image).reshape(-1)
        if flat.size > max_samples:  # percentiles of a regular subsample: fast on big stacks, deterministic
            flat = flat[:: flat.size // max_samples]
        low, high = np.percentile(flat.astype(np.float64), [LOW_PERCENTILE, HIGH_PERCENTILE])
        if not (np.isfinite(low) and np.isfinite(high)):  # a NaN normaliser would turn every output into NaN
            raise InputError(f"{NOT_FINITE_INPUT}; nothing was written.")
        if high - low <= max(1e-12, abs(low) * 1e-9):  # (nearly) constant: keep the value, any range does
            high = low + max(1.0, abs(low) * 1e-6)
        return cls(float(low), float(high), np.dtype(image.dtype))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return ((np.asarray(image, dtype=np.float64) - self.low) / (self.high - self.low)).astype(np.float32)

    def inverse(self, normalised: np.ndarray) -> np.ndarray:
        values = np.asarray(normalised, dtype=np.float64) * (self.high - self.low) + self.low
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            return np.clip(np.rint(values), info.min, info.max).astype(self.dtype)
        if self.dtype == np.bool_:
            return values > 0.5
        info = np.finfo(self.dtype)
        return np.clip(values, info.min, info.max).astype(self.dtype)
