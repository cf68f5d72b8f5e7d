"""TIFF writer: the layer's data in its own dtype, its scale as the pixel size, written atomically."""

from __future__ import annotations


def write_image(path: str, data, meta: dict) -> list[str]:
    from .core.io import write_tiff

    scale = tuple(float(s) for s in meta.get("scale", ())) or None
    unit = meta.get("metadata", {}).get("unit", "nm" if scale else "pixel")
    return [str(write_tiff(path, data, scale, unit, overwrite=True))]
