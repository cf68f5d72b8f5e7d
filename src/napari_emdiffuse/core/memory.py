"""Memory planning: choose tiles that fit before a run, and recover from out-of-memory errors during one."""

from __future__ import annotations

import math

import numpy as np

# Measured on the bundled network (peak RSS growth during one evaluation, tiles of 256-1024 px, batches 1-4):
# 250-700 bytes per tile pixel, more for small batches; we plan with the upper end.
BYTES_PER_TILE_PIXEL = 700
# Whole-image float32 buffers per sample while sampling: estimate, update, noise, condition, difficulty, result.
BYTES_PER_IMAGE_PIXEL = 4 * 6
MIN_TILE = 64


def available_bytes(device=None) -> int:
    """Memory the run may use: free GPU memory, or the system's available RAM (``device`` None: RAM)."""
    if device is not None and device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with napari; without it assume a modest laptop
        return 4 * 2**30


def estimate_bytes(height: int, width: int, samples: int, tile: int, batch: int) -> int:
    return int(samples * height * width * BYTES_PER_IMAGE_PIXEL + batch * tile * tile * BYTES_PER_TILE_PIXEL)


def fit_to_memory(height: int, width: int, samples: int, tile: int, batch: int, device,
                  multiple: int, budget: float = 0.7) -> tuple[int, int, str | None]:
    """Largest ``(tile, batch)`` at most the requested ones whose estimate fits ``budget`` of the free memory.

    Raises MemoryError with a clear sentence when even the smallest tiles cannot fit (the whole-image buffers alone
    are too big: the user must process a smaller region or fewer samples).
    """
    free = available_bytes(device) * budget
    original = (tile, batch)
    while estimate_bytes(height, width, samples, tile, batch) > free:
        if batch > 1:
            batch //= 2
        elif smaller(tile, multiple) is not None:
            tile = smaller(tile, multiple)
        else:
            need = estimate_bytes(height, width, samples, tile, batch) / 2**30
            raise MemoryError(f"This image needs about {need:.1f} GB with {samples} samples but only "
                              f"{free / 2**30:.1f} GB is free; use fewer samples or process a smaller region.")
    note = None
    if (tile, batch) != original:
        note = f"tiles reduced to {tile} px (batch {batch}) to fit in {free / 2**30:.1f} GB of free memory"
    return tile, batch, note


def result_bytes(shape: tuple[int, ...], dtype, maps: int) -> int:
    """RAM for a result held whole: the output in ``dtype`` and ``maps`` float32 maps of ``shape``, plus one map's
    worth for scoring the uncertainty (its percentile works on a copy)."""
    return math.prod(shape) * (np.dtype(dtype).itemsize + 4 * (maps + (maps > 0)))


def check_result_fits(nbytes: int, budget: float = 0.7) -> None:
    """Refuse at once, with what to do instead, a result that cannot fit in the free RAM: better than a process
    killed for memory near the end of a long run (in napari, with every unsaved layer)."""
    free = available_bytes() * budget
    if nbytes > free:
        raise MemoryError(f"The result needs about {nbytes / 2**30:.1f} GB of memory but only {free / 2**30:.1f} GB "
                          "is free; process the current view or slice, or write the whole result chunk by chunk to "
                          "a Zarr file (Process: Whole layer to a Zarr file; on the command line, an output ending "
                          "in .zarr).")


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or "out of memory" in str(err).lower() or type(err).__name__ in (
        "OutOfMemoryError", "CUDAOutOfMemoryError")


def smaller(tile: int, multiple: int) -> int | None:
    """The next tile size to try after running out of memory, or None at the minimum."""
    if tile <= MIN_TILE:
        return None
    return max(MIN_TILE, math.floor(tile / 2 / multiple) * multiple)
