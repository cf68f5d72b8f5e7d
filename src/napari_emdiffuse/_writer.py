"""TIFF writer: the layer's data in its own dtype, its scale as the pixel size (in nm), written atomically."""

from __future__ import annotations


def write_image(path: str, data, meta: dict) -> list[str]:
    from ._layers import pixel_size
    from .core.io import write_tiff

    scale, unit = pixel_size(meta.get("scale", ()), meta.get("metadata", {}), meta.get("units", ()))
    return [str(write_tiff(path, data, scale or None, unit, overwrite=True))]
