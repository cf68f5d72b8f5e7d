"""Metrics and classical baselines shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import sys
import types

import numpy as np


def _piq_fsim():
    # piq's package __init__ imports torchvision (for FID/LPIPS feature extractors we don't use), and the CPU
    # torch wheel here has no matching torchvision: load piq's FSIM module without running that __init__.
    import importlib.util

    if "piq" not in sys.modules:
        package = types.ModuleType("piq")
        package.__path__ = list(importlib.util.find_spec("piq").submodule_search_locations)
        sys.modules["piq"] = package
    from piq.fsim import fsim

    return fsim


def psnr(result: np.ndarray, truth: np.ndarray, data_range: float = 255.0) -> float:
    mse = np.mean((result.astype(np.float64) - truth.astype(np.float64)) ** 2)
    return float(10 * np.log10(data_range**2 / mse))


def ssim(result: np.ndarray, truth: np.ndarray, data_range: float = 255.0) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(result.astype(np.float64), truth.astype(np.float64), data_range=data_range))


def fsim(result: np.ndarray, truth: np.ndarray, data_range: float = 255.0) -> float:
    import torch

    to_t = lambda a: torch.from_numpy(np.clip(a.astype(np.float32) / data_range, 0, 1))[None, None]  # noqa: E731
    return float(_piq_fsim()(to_t(result), to_t(truth), data_range=1.0, chromatic=False))


def sharpness(result: np.ndarray, truth: np.ndarray) -> float:
    """Mean gradient magnitude relative to the truth's: well below 1 means over-smoothed."""
    grad = lambda a: np.hypot(*np.gradient(a.astype(np.float64))).mean()  # noqa: E731
    return float(grad(result) / grad(truth))


def metrics(result, truth) -> dict:
    return {"psnr": psnr(result, truth), "ssim": ssim(result, truth), "fsim": fsim(result, truth),
            "sharpness": sharpness(result, truth)}


def to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def gaussian(noisy, sigma):
    from scipy.ndimage import gaussian_filter

    return to_uint8(gaussian_filter(noisy.astype(np.float64), sigma))


def nlm(noisy, h):
    from skimage.restoration import denoise_nl_means

    x = noisy.astype(np.float64) / 255
    return to_uint8(denoise_nl_means(x, h=h, patch_size=5, patch_distance=6, fast_mode=True) * 255)


def bm3d(noisy, sigma):
    import bm3d as _bm3d

    return to_uint8(_bm3d.bm3d(noisy.astype(np.float64) / 255, sigma_psd=sigma) * 255)


BASELINES = {  # each tuned over its grid on the first image of a data set, by PSNR against the truth
    "gaussian": (gaussian, [0.5, 0.7, 0.85, 1.0, 1.3, 1.7, 2.2]),
    "nlm": (nlm, [0.008, 0.012, 0.018, 0.025, 0.035, 0.05, 0.07, 0.1]),
    "bm3d": (bm3d, [0.015, 0.022, 0.03, 0.04, 0.055, 0.075, 0.1, 0.14]),
}


def tune(method: str, noisy: np.ndarray, truth: np.ndarray) -> float:
    fn, grid = BASELINES[method]
    return max(grid, key=lambda p: psnr(fn(noisy, p), truth))


def patch_spearman(uncertainty: np.ndarray, error: np.ndarray, patch: int = 16) -> float:
    """Spearman correlation between per-patch mean uncertainty and per-patch mean absolute error."""
    from scipy.stats import spearmanr

    h, w = (uncertainty.shape[0] // patch) * patch, (uncertainty.shape[1] // patch) * patch
    block = lambda a: a[:h, :w].reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3)).ravel()  # noqa: E731
    return float(spearmanr(block(uncertainty), block(error)).statistic)
