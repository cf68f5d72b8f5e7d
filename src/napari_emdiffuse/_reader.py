"""Readers: TIFF images and stacks, and Zarr / OME-Zarr volumes (lazily), with their pixel sizes as the layer scale.

A result store written by ``emdiffuse ... -o OUT.zarr`` (or the widgets' *Whole layer to a Zarr file*) opens as
the restored image with its uncertainty (and difficulty) map, styled and described as when a widget adds them.
"""

from __future__ import annotations

from pathlib import Path

from .core.io import is_tiff
from .core.zarr_io import is_zarr_store

TIFF_SUFFIXES = (".tif", ".tiff")


def get_reader(path):
    """Return a reader for a single TIFF file or Zarr store, or None (fast) for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if Path(path).is_dir():
        return read_zarr_layers if is_zarr_store(path) else None
    if not str(path).lower().endswith(TIFF_SUFFIXES) or not is_tiff(path):
        return None
    return read_tiff_layer


def _layer_name(path) -> str:
    name = Path(path).name
    for suffix in (".zarr", ".ome", ".tiff", ".tif"):
        name = name.removesuffix(suffix).removesuffix(suffix.upper())
    return name


def read_tiff_layer(path):
    """One layer; a result or map we wrote (``emdiffuse ... -o``, or a result layer saved from napari) gets back
    the run's summary in its metadata, and a map its style."""
    from ._layers import MAPS, map_layer
    from .core.io import read_tiff
    from .core.tasks import UNCERTAINTY_THRESHOLD

    if isinstance(path, list):
        path = path[0]
    image = read_tiff(path)
    name = _layer_name(path)
    meta = {**(image.summary or {}), "path": str(path), "unit": image.unit, "pixel_size": image.scale}
    grid = {"scale": image.scale, **_units(image)}
    if len(meta.get("translate", ())) == image.data.ndim:
        grid["translate"] = tuple(meta.pop("translate"))
    if meta.get("map") in MAPS:
        return [map_layer(image.data, meta["map"], name, meta, meta.get("threshold", UNCERTAINTY_THRESHOLD), **grid)]
    rgb = image.data.ndim in (3, 4) and image.data.shape[-1] in (3, 4)
    return [(image.data, {"name": name, "metadata": meta, "rgb": rgb, **({} if rgb else grid)}, "image")]


def _units(image) -> dict:
    return {"units": ("nm",) * len(image.scale)} if image.unit == "nm" else {}


def read_zarr_layers(path):
    import zarr

    from ._layers import result_layers
    from .core.tasks import UNCERTAINTY_THRESHOLD
    from .core.zarr_io import map_path, open_volume

    if isinstance(path, list):
        path = path[0]
    image = open_volume(path, levels=True)  # raises InputError, which napari shows, for stores it cannot use
    name = _layer_name(path)
    meta = {"path": str(path), "unit": image.unit, "pixel_size": image.scale}
    root = zarr.open(str(path), mode="r")
    ours = root.attrs.get("emdiffuse") if isinstance(root, zarr.Group) else None
    if not ours:
        return [(image.data, {"name": name, "metadata": meta, "scale": image.scale, **_units(image)}, "image")]
    run, result = ours["run"], ours.get("result")
    meta.update(task=run["task"], model=run["model"], source=run["input"], settings=run["settings"])
    if result is None:  # still running, or stopped: chunks not yet written read as zeros
        name, meta["unfinished"] = f"{name} (unfinished)", True
    else:
        meta.update({k: v for k, v in result.items() if k not in ("output", "maps")})
    maps = {m: root[map_path(m, "image")] for m in ("uncertainty", "difficulty") if m in run["maps"]}
    normalizer = run["normalizer"]
    return result_layers(name, name, image.data, maps.get("uncertainty"), maps.get("difficulty"), meta,
                         meta.get("threshold", UNCERTAINTY_THRESHOLD), (normalizer["low"], normalizer["high"]),
                         scale=image.scale, **_units(image))
