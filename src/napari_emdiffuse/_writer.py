"""TIFF writer: the layer's data in its own dtype, its scale as the pixel size (in nm), written atomically; a
result layer's file also records how it was made (model, settings, uncertainty score) and where it lies (a result of
the current view is offset), which the reader restores."""

from __future__ import annotations


def write_image(path: str, data, meta: dict) -> list[str]:
    from ._layers import pixel_size, run_summary
    from .core.io import write_tiff

    metadata = meta.get("metadata", {})
    layer_scale = meta.get("scale", ())
    scale, unit = pixel_size(layer_scale, metadata, meta.get("units", ()))
    summary = run_summary(metadata)
    translate = meta.get("translate", ())
    if summary is not None and unit == "nm" and any(translate):  # in nm, as the pixel size
        summary["translate"] = [t * nm / s for t, nm, s in zip(translate, scale, layer_scale)]
    return [str(write_tiff(path, data, scale or None, unit, overwrite=True, summary=summary))]
