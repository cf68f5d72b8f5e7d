"""Zarr and OME-Zarr volumes: open them lazily with their pixel sizes, create OME-Zarr outputs (no Qt, no napari).

Inputs: a Zarr v2/v3 array, a group holding one array, or an OME-Zarr image (NGFF 0.4 or 0.5; the full-resolution
level is used). Outputs are OME-Zarr 0.5 (Zarr v3): the restored image at ``0`` and each further map (uncertainty,
difficulty) as its own OME-Zarr image in a sub-group, e.g. ``uncertainty/0``, all with the same pixel sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io import _UNIT_TO_NM, ImageFile
from .limits import check_voxel
from .normalize import InputError

NGFF_UNIT = "nanometer"  # pixel sizes are handled in nm everywhere else
AXES = ("z", "y", "x")


def is_zarr_store(path: str | os.PathLike) -> bool:
    """A folder that holds Zarr metadata (v3, v2 array or v2 group)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))


def is_zarr(path: str | os.PathLike) -> bool:
    """A path ending in .zarr (e.g. an output still to be made), or a Zarr store."""
    return Path(path).suffix.lower() == ".zarr" or is_zarr_store(path)


def _multiscales(attrs) -> list | None:
    return (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")  # NGFF 0.5, then 0.4


def open_volume(path: str | os.PathLike, levels: bool = False) -> ImageFile:
    """The volume (a lazy array: nothing is read yet), its pixel size per axis and unit.

    With ``levels``, ``data`` of a multi-level OME-Zarr image is the list of its levels, full resolution first (a
    napari multiscale layer).
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise InputError(f"Not found: {path}")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several types for folders that are not stores
        raise InputError(f"{path.name} could not be opened as Zarr ({type(err).__name__}: {err}).") from err
    scale, unit = None, "pixel"
    if isinstance(node, zarr.Group):
        multiscales = _multiscales(node.attrs)
        if multiscales:
            try:
                image = multiscales[0]
                datasets = image["datasets"] if levels else image["datasets"][:1]
                arrays = [node[level["path"]] for level in datasets]
                scale, unit = _ngff_pixel_size(image.get("axes", []),
                                               datasets[0].get("coordinateTransformations", []), arrays[0].ndim)
                if not all(isinstance(a, zarr.Array) for a in arrays):
                    raise TypeError("a level is not an array")
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
                raise InputError(f"{path.name} has malformed OME-Zarr metadata ({err!r}).") from err
            if scale is not None:
                check_voxel(scale, path.name)
        else:
            arrays = [a for _, a in node.arrays()]
            if len(arrays) != 1:
                raise InputError(f"{path.name} holds {len(arrays)} arrays; give the path of one, e.g. {path}/0.")
    else:
        arrays = [node]
    leading = arrays[0].ndim - 3
    scale = scale[leading:] if scale and leading > 0 else scale
    data = [_spatial(a) for a in arrays]
    return ImageFile(data if len(data) > 1 else data[0], tuple(scale) if scale else (1.0,) * data[0].ndim, unit)


def _spatial(array):
    """The array without leading axes of length one, e.g. OME-Zarr's (t, c, z, y, x) with one time point and one
    channel."""
    leading = array.ndim - 3
    if leading > 0:
        if any(s != 1 for s in array.shape[:leading]):
            raise InputError(f"Expected one 2D image or 3D volume, got the shape {array.shape}.")
        import dask.array as da

        array = da.from_zarr(array)[(0,) * leading]
    if array.ndim not in (2, 3):
        raise InputError(f"Expected a 2D image or a 3D volume (z, y, x), got the shape {array.shape}.")
    return array


def _ngff_pixel_size(axes: list, transforms: list, ndim: int) -> tuple[list[float] | None, str]:
    scale = next((t["scale"] for t in transforms if t.get("type") == "scale"), None)
    if scale is None or len(scale) != ndim:
        return None, "pixel"
    units = [_UNIT_TO_NM.get(str(a.get("unit", "")).lower()) if isinstance(a, dict) else None for a in axes]
    spatial = [i for i, a in enumerate(axes) if isinstance(a, dict) and a.get("type") == "space"]
    if len(axes) != ndim or not spatial or any(units[i] is None for i in spatial):
        return [float(s) for s in scale], "pixel"
    return [float(s) * (units[i] if i in spatial else 1.0) for i, s in enumerate(scale)], "nm"


def ngff_image(name: str, ndim: int, scale: tuple[float, ...], unit: str) -> dict:
    """OME-Zarr 0.5 ``ome`` attributes of a single-level image at path ``0`` with pixel sizes ``scale``."""
    axes = [{"name": n, "type": "space", **({"unit": NGFF_UNIT} if unit == "nm" else {})} for n in AXES[-ndim:]]
    return {"version": "0.5", "multiscales": [{
        "name": name, "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [float(s) for s in scale]}]}],
    }]}


def create_ome_zarr(path: str | os.PathLike, maps: dict[str, np.dtype], shape: tuple[int, ...],
                    chunks: tuple[int, ...], scale: tuple[float, ...], unit: str, fill_values: dict | None = None):
    """Create an OME-Zarr store: the first of ``maps`` (name -> dtype) at ``0``, the others at ``<name>/0``.

    Returns the root group. Chunks are only written when computed.
    """
    import zarr

    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for i, (name, dtype) in enumerate(maps.items()):
        group = root if i == 0 else root.create_group(name)
        group.attrs["ome"] = ngff_image(name, len(shape), scale, unit)
        group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=(fill_values or {}).get(name, 0),
                           dimension_names=AXES[-len(shape):])  # NGFF 0.5: the axes' names, in order
    return root


def map_path(name: str, first: str) -> str:
    """Where the map ``name`` lives in a store made by :func:`create_ome_zarr` whose first map is ``first``."""
    return "0" if name == first else f"{name}/0"
