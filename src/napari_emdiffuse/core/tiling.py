"""Whole-image denoising from overlapping tiles, fused at every sampling step.

The sampler always works on the whole image with one shared noise field; only the network evaluation is tiled.
Each tile's estimate is blended with smooth weights that sum to one everywhere, so neighbouring tiles agree before
the next step starts and no tile border can survive into the result.
"""

from __future__ import annotations

import math
from collections.abc import Generator

import numpy as np
import torch
from torch.nn import functional as F

from .diffusion import precondition
from .memory import is_out_of_memory, smaller


def tile_starts(length: int, tile: int, overlap: int, origin: int = 0) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` shared pixels.

    Tiles sit on a grid anchored in the full image (multiples of ``tile - overlap``; this image starts at ``origin``
    in it), plus one tile flush with each edge: a window cut from a larger image is tiled like the larger image
    everywhere but near the window's edges, which is what makes chunked processing match whole-image processing.
    """
    if tile >= length:
        return [0]
    stride = tile - overlap
    first = -(-origin // stride) * stride - origin  # the first grid start at or after this image's start
    return sorted({0, length - tile, *range(first, length - tile, stride)})


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """1D weights: a raised-cosine ramp over the overlap, flat inside, never zero (so edges of the image count)."""
    w = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
        w[:overlap] = ramp
        w[-overlap:] = ramp[::-1]
    return np.maximum(w, 1e-3)


def tile_plan(height: int, width: int, tile: int, overlap: int,
              origin: tuple[int, int] = (0, 0)) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Tile corners and the per-pixel weight map of one tile, such that weights summed over tiles are positive.

    At most a quarter of the tile is overlap: more buys no quality, only evaluations. ``origin`` is where this
    image starts in the full plane (see :func:`tile_starts`).
    """
    overlap = min(overlap, tile // 4)
    ys, xs = tile_starts(height, tile, overlap, origin[0]), tile_starts(width, tile, overlap, origin[1])
    th, tw = min(tile, height), min(tile, width)
    window = np.outer(blend_window(th, min(overlap, th // 2)), blend_window(tw, min(overlap, tw // 2)))
    return [(y, x) for y in ys for x in xs], window


def pad_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad the last two axes at the bottom/right; reflect where the image is big enough, else replicate."""
    ph, pw = height - image.shape[-2], width - image.shape[-1]
    if ph == 0 and pw == 0:
        return image
    mode = "reflect" if ph < image.shape[-2] and pw < image.shape[-1] else "replicate"
    return F.pad(image, (0, pw, 0, ph), mode=mode)


def padded_size(height: int, width: int, tile: int, multiple: int) -> tuple[int, int, int]:
    """Size the image is padded to, and the tile size, both multiples of the network's ``multiple``."""
    return (math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple,
            max(multiple, tile // multiple * multiple))


NOISE_CELL = 64  # the noise field is drawn in cells of this size, on a grid anchored in the full plane


class NoiseField:
    """Gaussian noise of shape ``(samples, 1, height, width)`` as a function of position in the full plane.

    Each call returns the next field (one per sampling step). Every ``NOISE_CELL``-square cell of the full plane
    has its own random stream, seeded from ``(seed, call, cell row, cell column)``, and a window starting at
    ``origin`` cuts out what it covers: a chunk of a plane gets exactly the noise the whole plane gets there.
    Samples come in antithetic pairs (sample 2j + 1 gets the negated noise of sample 2j): the mean of a pair cancels
    the noise's first-order effect, a variance reduction measured on every denoising set (real pair +0.08 dB,
    SSIM +0.002; strong noise +0.10 dB, SSIM +0.005, with K = 2).
    """

    def __init__(self, seed: int, samples: int, height: int, width: int, origin: tuple[int, int] = (0, 0)):
        self.seed, self.shape, self.origin = seed % 2**64, (samples, height, width), origin
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        k, h, w = self.shape
        (oy, ox), c = self.origin, NOISE_CELL
        out = np.empty((k, 1, h, w), np.float32)
        for cy in range(oy // c, -(-(oy + h) // c)):
            for cx in range(ox // c, -(-(ox + w) // c)):
                drawn = np.random.default_rng((self.seed, self.calls, cy, cx)).standard_normal((-(-k // 2), c, c),
                                                                                                 np.float32)
                cell = np.stack([drawn, -drawn], axis=1).reshape(-1, c, c)[:k]
                y0, x0 = max(cy * c, oy), max(cx * c, ox)  # the part of the cell inside the window
                y1, x1 = min((cy + 1) * c, oy + h), min((cx + 1) * c, ox + w)
                out[:, 0, y0 - oy:y1 - oy, x0 - ox:x1 - ox] = cell[:, y0 - cy * c:y1 - cy * c, x0 - cx * c:x1 - cx * c]
        self.calls += 1
        return torch.from_numpy(out)


FLIPS = ((), (-1,), (-2,), (-2, -1))  # sample k is evaluated mirrored by FLIPS[k % 4]


Label = int | tuple[float, float] | None  # a model variant: its index, or a position (gap, fraction); see network


def labels(label: Label, n: int, device) -> torch.Tensor | None:
    """``label`` for a batch of ``n``: (n,) indices or (n, 2) positions."""
    if label is None:
        return None
    if isinstance(label, tuple):
        return torch.tensor(label, dtype=torch.float32, device=device).expand(n, 2)
    return torch.full((n,), label, device=device)


class TiledDenoiser:
    """``denoiser(x, sigma)`` for a whole image: tiles, runs the network in batches, blends.

    ``cond`` is the padded condition, shape ``(1, C, H, W)``; ``x`` has shape ``(K, 1, H, W)``, one row per sample.
    Sample k is evaluated in its own mirror orientation (``FLIPS``): the network's small orientation biases then
    differ between samples, so the mean of the samples is also a geometric self-ensemble (at no extra cost) and
    the spread between samples includes that model uncertainty.
    With ``dtype`` (e.g. bfloat16) the network runs under autocast to it; the blending stays in float32.
    The difficulty map (phi) of the first, noisiest call is kept in ``self.first_log_phi``. When the device runs
    out of memory, the batch and then the tile size are halved and the evaluation is repeated (noted in ``notes``).
    """

    def __init__(self, net, cond: torch.Tensor, tile: int, overlap: int, batch: int, device: torch.device,
                 label: Label = None, origin: tuple[int, int] = (0, 0), dtype: torch.dtype | None = None):
        self.net, self.device, self.batch, self.dtype = net, device, max(1, batch), dtype
        self.cond, self.label, self.overlap, self.origin = cond, label, overlap, origin
        self.first_log_phi: torch.Tensor | None = None
        self.notes: list[str] = []
        self._plan(tile)

    def _plan(self, tile: int) -> None:
        h, w = self.cond.shape[-2:]
        self.tile = tile
        self.corners, window = tile_plan(h, w, tile, self.overlap, self.origin)
        self.th, self.tw = min(tile, h), min(tile, w)
        self.window = torch.from_numpy(window)
        total = torch.zeros(h, w)
        for y, x in self.corners:
            total[y:y + self.th, x:x + self.tw] += self.window
        self.inv_total = 1 / total

    def __call__(self, x: torch.Tensor, sigma: float) -> Generator[int, None, torch.Tensor]:
        while True:
            try:
                return (yield from self._evaluate(x, sigma))
            except (RuntimeError, MemoryError) as err:
                if not is_out_of_memory(err):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.batch > 1:
                    self.batch //= 2
                else:
                    tile = smaller(self.tile, self.net.config.multiple)
                    if tile is None:
                        raise MemoryError("Out of memory even with the smallest tiles; free memory or use the CPU.")
                    self._plan(tile)
                self.notes.append(f"out of memory: retried with tiles of {self.tile} px, batch {self.batch}")

    def _evaluate(self, x: torch.Tensor, sigma: float) -> Generator[int, None, torch.Tensor]:
        jobs = [(k, y, xx) for k in range(x.shape[0]) for (y, xx) in self.corners]
        out = torch.zeros_like(x)
        log_phi = torch.zeros_like(x) if self.first_log_phi is None else None
        for start in range(0, len(jobs), self.batch):
            chunk = jobs[start:start + self.batch]
            flip = [FLIPS[k % len(FLIPS)] for k, _, _ in chunk]
            xt = torch.stack([x[k, :, y:y + self.th, xx:xx + self.tw].flip(f) for f, (k, y, xx) in zip(flip, chunk)])
            ct = torch.stack([self.cond[0, :, y:y + self.th, xx:xx + self.tw].flip(f) for f, (_, y, xx) in
                              zip(flip, chunk)])
            xt = xt.to(self.device).contiguous(memory_format=torch.channels_last)
            ct = ct.to(self.device).contiguous(memory_format=torch.channels_last)
            sig = torch.full((len(chunk),), sigma, device=self.device)
            label = labels(self.label, len(chunk), self.device)
            with torch.inference_mode(), torch.autocast(self.device.type, self.dtype or torch.float32,
                                                        enabled=self.dtype is not None):
                d, _, lp = precondition(self.net, xt, ct, sig, label)
            d = d.float().cpu()
            for i, (k, y, xx) in enumerate(chunk):
                out[k, :, y:y + self.th, xx:xx + self.tw] += d[i].flip(flip[i]) * self.window
                if log_phi is not None and lp is not None:
                    log_phi[k, :, y:y + self.th, xx:xx + self.tw] += lp[i].float().cpu().flip(flip[i]) * self.window
            yield len(chunk)
        if log_phi is not None and lp is not None:  # a network without a difficulty head has no phi (not phi = 1)
            self.first_log_phi = log_phi * self.inv_total
        return out * self.inv_total
