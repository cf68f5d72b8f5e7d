"""TIFF reading and writing with pixel sizes, clear errors and atomic writes (no Qt, no napari)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_path
from .limits import check_voxel
from .normalize import InputError

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)  # what the ImageJ TIFF format holds
MEMMAP_ABOVE_BYTES = 256 * 2**20  # bigger stacks open memory-mapped (when the file layout allows it)
_UNIT_TO_NM = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "µm": 1e3, "micron": 1e3, "micrometer": 1e3,
               "\\u00b5m": 1e3, "mm": 1e6, "millimeter": 1e6, "cm": 1e7, "m": 1e9, "meter": 1e9, "a": 0.1,
               "angstrom": 0.1, "å": 0.1}


def in_nanometres(scale, units) -> tuple[tuple[float, ...], str]:
    """Pixel sizes in nm and ``"nm"`` when every axis has a length unit (e.g. napari's layer units, "micrometer");
    else the sizes as they are and ``"pixel"``."""
    factors = [_UNIT_TO_NM.get(str(u).lower()) for u in units]
    if factors and len(factors) == len(scale) and None not in factors:
        return tuple(float(s) * f for s, f in zip(scale, factors)), "nm"
    return tuple(float(s) for s in scale), "pixel"


@dataclass
class ImageFile:
    data: np.ndarray  # or array-like (Zarr, dask); a list of levels from open_volume(levels=True)
    scale: tuple[float, ...]  # pixel size per axis (z, y, x or y, x); 1.0 where unknown
    unit: str  # "nm" when the file told us, else "pixel"
    summary: dict | None = None  # how napari-emdiffuse made the file (``write_tiff(summary=...)``), else None


def is_tiff(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except OSError:
        return False


def read_tiff(path: str | os.PathLike) -> ImageFile:
    """Read a 2D image or 3D stack; raises :class:`InputError` with one sentence for anything unusable."""
    import tifffile

    path = Path(path)
    if not path.exists():
        raise InputError(f"File not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a TIFF file.")
    if path.stat().st_size == 0:
        raise InputError(f"{path.name} is empty.")
    if not is_tiff(path):
        raise InputError(f"{path.name} is not a TIFF file.")
    try:
        with tifffile.TiffFile(path) as tif:
            scale, unit = _pixel_size(tif)
            data = None
            if path.stat().st_size > MEMMAP_ABOVE_BYTES:
                try:
                    data = tifffile.memmap(path, mode="r")
                except ValueError:  # compressed or tiled: not memory-mappable
                    data = None
            if data is None:
                data = tif.asarray()
            summary = _recorded_summary(tif)
    except InputError:
        raise
    except Exception as err:  # tifffile raises many types for damaged files
        reason = (str(err).strip().splitlines() or [""])[0]
        raise InputError(f"{path.name} could not be read as a TIFF ({type(err).__name__}: {reason}).") from err
    data = np.squeeze(data) if data.ndim > 2 else data
    scale = check_voxel(scale[-data.ndim:], path.name) if data.ndim <= 3 else (1.0,) * data.ndim
    return ImageFile(data, scale, unit, summary)


def _recorded_summary(tif) -> dict | None:
    """The run summary ``write_tiff`` stored: ImageJ's Info text, or tifffile's JSON description."""
    info = (tif.imagej_metadata or {}).get("Info")
    try:
        found = json.loads(info).get("emdiffuse") if info else (tif.shaped_metadata or ({},))[0].get("emdiffuse")
    except (ValueError, AttributeError):  # someone else's Info text
        return None
    return found if isinstance(found, dict) else None


def _pixel_size(tif) -> tuple[tuple[float, float, float], str]:
    """(z, y, x) pixel size in nm from OME or ImageJ metadata or resolution tags; ones if unknown."""
    if tif.is_ome and tif.ome_metadata:
        found = {ax: re.search(rf'PhysicalSize{ax}="([0-9.eE+-]+)"', tif.ome_metadata) for ax in "ZYX"}
        units = {ax: re.search(rf'PhysicalSize{ax}Unit="([^"]+)"', tif.ome_metadata) for ax in "ZYX"}
        if found["X"]:
            size = [float(found[ax].group(1)) * _UNIT_TO_NM.get((units[ax].group(1) if units[ax] else "µm").lower(),
                                                                   1e3) if found[ax] else 1.0 for ax in "ZYX"]
            return (size[0], size[1], size[2]), "nm"
    page = tif.pages[0]
    tags = page.tags
    if "XResolution" not in tags:
        return (1.0, 1.0, 1.0), "pixel"
    num, den = tags["XResolution"].value
    ynum, yden = tags["YResolution"].value if "YResolution" in tags else (num, den)
    if num == 0 or ynum == 0:
        return (1.0, 1.0, 1.0), "pixel"
    x, y = den / num, yden / ynum
    ij = tif.imagej_metadata or {}
    unit = str(ij.get("unit", "")).lower()
    if unit in _UNIT_TO_NM:
        factor = _UNIT_TO_NM[unit]
        z = float(ij.get("spacing", 1.0)) * factor
        return (z, y * factor, x * factor), "nm"
    res_unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 1
    factor = {2: 2.54e7, 3: 1e7}.get(int(res_unit))  # inch, centimetre
    if factor is None or (x == 1.0 and y == 1.0):
        return (1.0, 1.0, 1.0), "pixel"
    z = (tif.shaped_metadata or ({},))[0].get("spacing", 1.0)  # written by write_tiff for non-ImageJ types, in nm
    return (float(z), y * factor, x * factor), "nm"


def write_tiff(path: str | os.PathLike, data: np.ndarray, scale: tuple[float, ...] | None = None,
               unit: str = "nm", overwrite: bool = False, summary: dict | None = None) -> Path:
    """Write an ImageJ-compatible TIFF atomically (temporary file, then rename); pixel sizes in ``unit``.

    ``summary``, how the image was made (task, model, settings, uncertainty score, ...), goes into the file as JSON:
    ImageJ and Fiji show it under *Image > Show Info*, and ``read_tiff`` gives it back.
    """
    import tifffile

    from .safety import check_output

    path = check_output(path, overwrite=overwrite)  # a regular file only, never a link, FIFO or device
    data = np.asarray(data)
    if data.dtype in (np.float16, np.float64):
        data = data.astype(np.float32)  # ImageJ reads float32, neither float16 nor float64
    if data.dtype == bool:
        data = data.astype(np.uint8)
    calibrated = scale is not None and unit == "nm" and any(s != 1.0 for s in scale)
    spacing = {"spacing": scale[-3]} if calibrated and data.ndim == 3 and len(scale) >= 3 else {}
    if summary:
        summary = json.loads(json.dumps(summary, default=_plain))  # numpy scalars, tuples: plain JSON
    if data.dtype in IMAGEJ_DTYPES and data.ndim <= 3:
        # named axes: without them ImageJ takes a stack of 3 or 4 slices for channels
        kwargs: dict = {"imagej": True, "metadata": {"axes": "ZYX"[-data.ndim:]}}
        if calibrated:
            kwargs["resolution"] = (1.0 / scale[-1], 1.0 / scale[-2])
            kwargs["metadata"].update(unit="nm", **spacing)
        if summary:
            kwargs["metadata"]["Info"] = json.dumps({"emdiffuse": summary}, indent=1)
    else:  # grey-level planes: without photometric, tifffile would store a stack of 3 or 4 planes as RGB(A)
        kwargs = {"photometric": "minisblack",
                  "metadata": {"axes": "ZYX"[-data.ndim:], **({"emdiffuse": summary} if summary else {})}}
        if calibrated:  # the standard resolution tags, which ImageJ reads too, in its finest unit; z in the JSON
            kwargs.update(resolution=(1e7 / scale[-1], 1e7 / scale[-2]), resolutionunit="CENTIMETER")
            kwargs["metadata"].update(spacing)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)
    return path


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)
