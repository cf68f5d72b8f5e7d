"""Checks of our output files by the community's own tools, not by our readers.

- OME-Zarr: the ``ome-zarr-models`` validator (NGFF 0.5), for the image at the root and every map in its sub-group;
- TIFF: tifffile's parser of ImageJ's metadata (what ImageJ/Fiji read: pixel size, unit, z spacing, Info), and
  ImageJ itself, headless, where it is installed (Debian/Ubuntu: ``apt install libij-java``, with Java).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

IMAGEJ_JAR = Path(os.environ.get("IMAGEJ_JAR", "/usr/share/java/ij.jar"))


def assert_valid_ome_zarr(path, maps=("image", "uncertainty"), unit: str | None = "nanometer") -> None:
    """Every image in a result store validates as an OME-Zarr 0.5 image; its arrays name their dimensions as the
    axes are named (every level), and the axes carry ``unit`` (None: no unit)."""
    import zarr
    from ome_zarr_models.v05 import Image

    for name in maps:
        group = zarr.open_group(str(path) if name == "image" else f"{path}/{name}", mode="r")
        image = Image.from_zarr(group)  # raises a pydantic ValidationError that says what is wrong
        multiscale = image.attributes.ome.multiscales[0]
        axes = [axis.name for axis in multiscale.axes]
        assert [axis.unit for axis in multiscale.axes] == [unit] * len(axes), name
        for dataset in multiscale.datasets:
            assert list(group[dataset.path].metadata.dimension_names) == axes, (name, dataset.path)


def imagej_reading(path) -> dict:
    """What ImageJ takes from a TIFF, as tifffile's parsers of ImageJ's metadata and the TIFF tags read it:
    ``pixel`` (x, y) in ``unit``, ``spacing`` (z, ImageJ files only), ``info`` (the Info text), ``imagej``."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        ij = tif.imagej_metadata or {}
        (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
        unit = ij.get("unit") if tif.is_imagej else {2: "inch", 3: "cm"}.get(int(tags["ResolutionUnit"].value))
        return {"imagej": tif.is_imagej, "pixel": (xd / xn, yd / yn), "unit": unit, "spacing": ij.get("spacing"),
                "info": ij.get("Info"), "axes": tif.series[0].axes}


def recorded_summary(info: str) -> dict:
    """The run summary in an ImageJ Info text (JSON, as ImageJ's *Show Info* shows it)."""
    return json.loads(info)["emdiffuse"]


IMAGEJ_MACRO = """
files = split(getArgument(), "\\n");
for (i = 0; i < files.length; i++) {
    open(files[i]);
    getVoxelSize(w, h, d, unit);
    print("{\\"width\\": " + getWidth() + ", \\"height\\": " + getHeight() + ", \\"slices\\": " + nSlices
          + ", \\"bits\\": " + bitDepth() + ", \\"voxel\\": [" + w + ", " + h + ", " + d + "], \\"unit\\": \\""
          + unit + "\\", \\"info\\": " + lengthOf(getMetadata("Info")) + "}");
    close();
}
"""


def open_in_imagej(paths, tmp_path) -> list[dict]:
    """Open each TIFF in ImageJ (headless batch macro) and return what it shows: size, bit depth, voxel size and
    unit, and the length of the Info text. Skips the test where ImageJ, Java or a display is missing."""
    java = shutil.which("java")
    if java is None or not IMAGEJ_JAR.is_file() or not os.environ.get("DISPLAY"):
        pytest.skip("ImageJ (ij.jar), Java and a display (xvfb-run) are needed to open the files in ImageJ")
    macro = Path(tmp_path) / "report.ijm"
    macro.write_text(IMAGEJ_MACRO)
    run = subprocess.run([java, "-jar", str(IMAGEJ_JAR), "-batch", str(macro), "\n".join(str(p) for p in paths)],
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(paths), run.stdout + run.stderr
    return [json.loads(line) for line in lines]
