"""TIFF writer: the layer's data in its own dtype, its scale as the pixel size (in nm), written atomically; a
result layer's file also records how it was made (model, settings, uncertainty score), which the reader restores."""

from __future__ import annotations


def write_image(path: str, data, meta: dict) -> list[str]:
    from ._layers import pixel_size, run_summary
    from .core.io import write_tiff

    metadata = meta.get("metadata", {})
    scale, unit = pixel_size(meta.get("scale", ()), metadata, meta.get("units", ()))
    return [str(write_tiff(path, data, scale or None, unit, overwrite=True, summary=run_summary(metadata)))]
