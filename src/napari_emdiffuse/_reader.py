"""TIFF reader: 2D images and stacks, with pixel sizes from ImageJ/OME metadata as the layer scale."""

from __future__ import annotations

from pathlib import Path

from .core.io import is_tiff

TIFF_SUFFIXES = (".tif", ".tiff")


def get_reader(path):
    """Return a reader for a single TIFF path, or None (fast) for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith(TIFF_SUFFIXES) or not is_tiff(path):
        return None
    return read_tiff_layer


def read_tiff_layer(path):
    from .core.io import read_tiff

    if isinstance(path, list):
        path = path[0]
    image = read_tiff(path)
    rgb = image.data.ndim in (3, 4) and image.data.shape[-1] in (3, 4)
    kwargs = {
        "name": Path(path).stem,
        "metadata": {"path": str(path), "unit": image.unit, "pixel_size": image.scale},
        "rgb": rgb,
    }
    if not rgb:
        kwargs["scale"] = image.scale
    return [(image.data, kwargs, "image")]
