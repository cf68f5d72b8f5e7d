"""How a restoration looks in napari: the image and its per-pixel maps as layer data tuples, styled the same
whether a widget has just made them or they are read back from a result store (no Qt)."""

from __future__ import annotations

MAPS = ("uncertainty", "difficulty")  # a layer's ``metadata["map"]``: our per-pixel maps, never an input


def pixel_size(scale, metadata: dict, units=()) -> tuple[tuple[float, ...], str]:
    """A layer's pixel size and its unit, ``"nm"`` or ``"pixel"``: as our readers recorded it in the metadata, else
    from napari's layer units (e.g. micrometres from an OME-Zarr reader, converted to nm)."""
    from .core.io import in_nanometres

    if metadata.get("unit") in ("nm", "pixel"):
        return tuple(float(s) for s in scale), metadata["unit"]
    return in_nanometres(scale, units)


def uncertainty_colormap(name: str = "emdiffuse_uncertainty"):
    """Flagged areas only: transparent up to the threshold, red above it (contrast limits 0..2*threshold), so that
    a reliable result shows as it is and the problems stand out."""
    from napari.utils.colormaps import Colormap

    colors = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]]
    # a short display name: napari's layer controls widen to fit it, narrowing the canvas
    return Colormap(colors=colors, controls=[0.0, 0.4999, 0.5, 1.0], name=name, display_name="flagged")


def full_uncertainty_colormap(name: str = "emdiffuse_uncertainty_full"):
    """The whole map: dark blue (certain) to light blue towards the threshold, orange to yellow above it."""
    from napari.utils.colormaps import Colormap

    colors = [[0.0, 0.0, 0.15, 1.0], [0.3, 0.6, 1.0, 1.0], [1.0, 0.45, 0.0, 1.0], [1.0, 1.0, 0.3, 1.0]]
    return Colormap(colors=colors, controls=[0.0, 0.4999, 0.5, 1.0], name=name, display_name="whole map")


FLAGGED_OPACITY = 0.6  # the result stays readable under the red


def style_uncertainty(layer, full: bool) -> None:
    """Show an uncertainty map layer as flagged areas over the result, or whole (the Map button). Only what changes
    is set: every change redraws the canvas, which costs tens of milliseconds with software OpenGL."""
    colormap = full_uncertainty_colormap() if full else uncertainty_colormap()
    if layer.colormap.name != colormap.name:
        layer.colormap = colormap
    opacity = 1.0 if full else FLAGGED_OPACITY
    if layer.opacity != opacity:
        layer.opacity = opacity


def result_layers(name: str, maps_name: str, image, uncertainty, difficulty, meta: dict, threshold: float,
                  contrast_limits=None, **grid) -> list[tuple]:
    """``(data, kwargs, "image")`` for the restored image ``name`` and its maps ``<maps_name>_uncertainty`` (only
    the areas above ``threshold``, in red) and ``<maps_name>_difficulty`` (hidden); all carry ``meta`` and the ``grid``
    (``scale``, ``translate``)."""
    layers = [(image, {"name": name, "metadata": meta, "contrast_limits": contrast_limits, **grid}, "image")]
    if uncertainty is not None:
        layers.append(map_layer(uncertainty, "uncertainty", f"{maps_name}_uncertainty", meta, threshold, **grid))
    if difficulty is not None:
        data, kwargs, kind = map_layer(difficulty, "difficulty", f"{maps_name}_difficulty", meta, threshold, **grid)
        layers.append((data, {**kwargs, "visible": False}, kind))
    return layers


def map_layer(data, kind: str, name: str, meta: dict, threshold: float, **grid) -> tuple:
    """One per-pixel map (``kind`` in ``MAPS``) as a layer data tuple, marked so that no widget takes it as input."""
    style = ({"colormap": uncertainty_colormap(), "contrast_limits": (0.0, 2 * threshold), "blending": "translucent",
              "opacity": FLAGGED_OPACITY} if kind == "uncertainty" else {"colormap": "magma"})
    return data, {"name": name, **style, "metadata": {**meta, "map": kind}, **grid}, "image"


def run_summary(metadata: dict) -> dict | None:
    """What a result layer's metadata says of the run that made it (for the file it is saved in); None for a
    layer that is not one of our results. Where the layer was read from, and its pixel size, stay out."""
    if "task" not in metadata or "model" not in metadata:
        return None
    return {k: v for k, v in metadata.items() if k not in ("path", "pixel_size", "unit", "run_key")}
