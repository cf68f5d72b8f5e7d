import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_emdiffuse._reader import get_reader
from napari_emdiffuse._tests.standards import imagej_reading, open_in_imagej, recorded_summary
from napari_emdiffuse._writer import write_image
from napari_emdiffuse.core.io import read_tiff, write_tiff
from napari_emdiffuse.core.normalize import InputError


def test_reader_declines_other_files_fast(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG")
    fake = tmp_path / "fake.tif"
    fake.write_text("hello")
    assert get_reader(str(png)) is None
    assert get_reader(str(fake)) is None
    assert get_reader([str(png), str(fake)]) is None
    assert get_reader(str(tmp_path)) is None  # a folder that is not a Zarr store
    (tmp_path / "empty.zarr").mkdir()
    assert get_reader(str(tmp_path / "empty.zarr")) is None  # nor is a folder just named like one


def test_reader_opens_every_level_of_an_ome_zarr_lazily(tmp_path):
    zarr = pytest.importorskip("zarr")
    data = np.arange(4 * 32 * 48, dtype=np.uint16).reshape(1, 4, 32, 48)  # (c, z, y, x), one channel
    root = zarr.open_group(str(tmp_path / "em.ome.zarr"), mode="w")
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    datasets = []
    for level in range(2):
        root.create_array(str(level), data=data[..., :: 2**level, :: 2**level], chunks=(1, 1, 16, 16))
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 0.04, 0.008 * 2**level, 0.008 * 2**level]}]})
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    [(levels, kwargs, kind)] = get_reader(str(tmp_path / "em.ome.zarr"))(str(tmp_path / "em.ome.zarr"))
    assert kind == "image" and kwargs["name"] == "em" and kwargs["scale"] == pytest.approx((40.0, 8.0, 8.0))
    assert [level.shape for level in levels] == [(4, 32, 48), (4, 16, 24)]
    assert np.array_equal(np.asarray(levels[1]), data[0, :, ::2, ::2])


def test_reader_uses_imagej_pixel_size_as_scale(tmp_path):
    path = tmp_path / "stack.tif"
    data = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 5.0, 1 / 5.0), metadata={"unit": "nm", "spacing": 50})
    [(layer_data, kwargs, kind)] = get_reader(str(path))(str(path))
    assert kind == "image" and kwargs["name"] == "stack"
    assert np.array_equal(np.asarray(layer_data), data)
    assert kwargs["scale"] == pytest.approx((50.0, 5.0, 5.0)) and kwargs["units"] == ("nm",) * 3


def test_ome_pixel_sizes_in_micrometres_become_nm(tmp_path):
    path = tmp_path / "ome.ome.tif"
    tifffile.imwrite(path, np.zeros((4, 16, 16), np.uint8), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.008, "PhysicalSizeY": 0.008, "PhysicalSizeZ": 0.04})
    assert read_tiff(path).scale == pytest.approx((40.0, 8.0, 8.0))


def test_big_stacks_open_memory_mapped(tmp_path, monkeypatch):
    import napari_emdiffuse.core.io as io

    monkeypatch.setattr(io, "MEMMAP_ABOVE_BYTES", 1000)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, np.ones((4, 64, 64), np.uint8), photometric="minisblack")
    assert isinstance(read_tiff(path).data, np.memmap)


def test_writer_round_trip_keeps_dtype_and_scale(tmp_path):
    path = tmp_path / "out.tif"
    data = np.random.default_rng(0).random((2, 10, 12)).astype(np.float32)
    [written] = write_image(str(path), data, {"scale": (30.0, 4.0, 4.0), "metadata": {"unit": "nm"}})
    back = read_tiff(written)
    assert np.array_equal(back.data, data) and back.scale == pytest.approx((30.0, 4.0, 4.0))


def test_writer_takes_napari_layer_units_and_knows_pixels_are_not_nanometres(tmp_path):
    import pint

    data = np.zeros((2, 8, 8), np.uint8)
    um = pint.get_application_registry().Unit("micrometer")  # as napari's layer state gives them
    [written] = write_image(str(tmp_path / "um.tif"), data, {"scale": (0.04, 0.008, 0.008), "units": (um,) * 3})
    assert read_tiff(written).scale == pytest.approx((40.0, 8.0, 8.0)) and read_tiff(written).unit == "nm"
    [written] = write_image(str(tmp_path / "px.tif"), data, {"scale": (1.0, 1.0, 1.0), "units": ("pixel",) * 3})
    assert read_tiff(written).unit == "pixel"


def test_a_stack_of_four_slices_is_a_stack_for_imagej_not_four_channels(tmp_path):
    path = write_tiff(tmp_path / "four.tif", np.zeros((4, 24, 40), np.uint8), (40.0, 8.0, 8.0))
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["slices"] == 4
    assert read_tiff(path).scale == pytest.approx((40.0, 8.0, 8.0))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])  # an ImageJ file, and one ImageJ cannot hold
def test_a_tiff_records_how_it_was_made_and_gives_it_back(tmp_path, dtype):
    summary = {"task": "denoise", "model": "denoise-sem", "uncertainty_score": np.float32(0.25), "seed": 3,
               "notes": ["a note"], "reliable": False}
    path = write_tiff(tmp_path / "out.tif", np.zeros((3, 8, 8), dtype), (40.0, 8.0, 8.0), summary=summary)
    back = read_tiff(path)
    assert back.summary == {**summary, "uncertainty_score": 0.25} and back.data.shape == (3, 8, 8)
    assert read_tiff(write_tiff(tmp_path / "plain.tif", np.zeros((8, 8), dtype))).summary is None
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, np.zeros((8, 8), np.uint8), imagej=True, metadata={"Info": "acquired on the Helios"})
    assert read_tiff(other).summary is None


def test_a_saved_uncertainty_map_opens_again_as_one(tmp_path):
    meta = {"task": "denoise", "model": "denoise-sem", "threshold": 0.1, "uncertainty_score": 0.05, "map":
            "uncertainty", "path": "/elsewhere/noisy.tif", "unit": "nm", "pixel_size": (4.0, 4.0)}
    data = np.random.default_rng(0).random((10, 12)).astype(np.float32)
    [written] = write_image(str(tmp_path / "noisy_uncertainty.tif"), data,
                            {"scale": (4.0, 4.0), "translate": (40.0, 8.0), "metadata": meta})
    [(back, kwargs, _)] = get_reader(written)(written)
    assert np.array_equal(back, data) and kwargs["name"] == "noisy_uncertainty"
    assert kwargs["translate"] == pytest.approx((40.0, 8.0))  # e.g. the current view's result: where it was
    assert kwargs["contrast_limits"] == (0.0, 0.2) and kwargs["colormap"].name == "emdiffuse_uncertainty"
    assert kwargs["metadata"]["map"] == "uncertainty" and kwargs["metadata"]["model"] == "denoise-sem"
    assert kwargs["metadata"]["path"] == written and kwargs["scale"] == pytest.approx((4.0, 4.0))
    [written] = write_image(str(tmp_path / "raw.tif"), data, {"scale": (4.0, 4.0), "metadata": {"map": "uncertainty"}})
    [(_, kwargs, _)] = get_reader(written)(written)  # not a result of ours: nothing recorded, a plain layer
    assert "map" not in kwargs["metadata"] and "colormap" not in kwargs


OUTPUT_DTYPES = [np.uint8, np.uint16, np.int16, np.float32, np.float16, np.float64, np.int32, np.uint32]


def test_every_tiff_we_write_gives_imagej_its_pixel_size_and_the_run_summary(tmp_path):
    """Read by tifffile's parsers of ImageJ's metadata and the TIFF tags, and by ImageJ itself where installed."""
    summary = {"task": "denoise", "model": "denoise-sem", "uncertainty_score": 0.05, "seed": 3}
    paths = []
    for dtype in OUTPUT_DTYPES:
        for shape, scale in (((3, 8, 10), (40.0, 4.0, 4.5)), ((8, 10), (4.0, 4.5))):
            path = tmp_path / f"{np.dtype(dtype).name}-{len(shape)}d.tif"
            paths.append(write_tiff(path, np.ones(shape, dtype), scale, summary=summary))
            seen = imagej_reading(path)
            assert seen["axes"] == "ZYX"[-len(shape):], path.name  # a stack of slices, not of channels or colours
            if np.dtype(dtype) in (np.uint8, np.uint16, np.int16, np.float32, np.float16, np.float64):
                assert seen["imagej"] and seen["unit"] == "nm", path.name  # float16/64 are written as float32
                assert seen["pixel"] == pytest.approx((4.5, 4.0)) and seen["spacing"] == (scale[0] if len(shape) == 3
                                                                                          else None)
                assert recorded_summary(seen["info"]) == summary
            else:  # 32-bit integers: no ImageJ file, but the standard resolution tags (and the summary as JSON)
                assert seen["unit"] == "cm" and np.array(seen["pixel"]) * 1e7 == pytest.approx((4.5, 4.0))
            assert read_tiff(path).scale == pytest.approx(scale) and read_tiff(path).summary == summary
    opened = open_in_imagej(paths, tmp_path)
    for path, seen in zip(paths, opened):
        three_d = path.stem.endswith("3d")
        assert (seen["width"], seen["height"], seen["slices"]) == (10, 8, 3 if three_d else 1), path.name
        factor = {"nm": 1.0, "µm": 1e3, "micron": 1e3}[seen["unit"]]
        assert np.array(seen["voxel"][:2]) * factor == pytest.approx((4.5, 4.0)), path.name
        if "int32" not in path.name:
            assert seen["voxel"][2] == (40.0 if three_d else 1.0) and seen["info"] > 0, path.name


def test_write_refuses_to_overwrite_by_default(tmp_path):
    path = tmp_path / "x.tif"
    write_tiff(path, np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="exists"):
        write_tiff(path, np.ones((4, 4), np.uint8))
    assert read_tiff(path).data.max() == 0


def test_a_stack_of_three_slices_in_a_non_imagej_dtype_is_written_as_grey_planes_not_rgb(tmp_path):
    data = np.arange(3 * 8 * 8, dtype=np.int32).reshape(3, 8, 8)
    path = write_tiff(tmp_path / "x.tif", data)
    assert tifffile.TiffFile(path).pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
    assert np.array_equal(read_tiff(path).data, data)


def _valid_tiff_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.arange(24 * 20, dtype=np.uint16).reshape(24, 20), imagej=True,
                     resolution=(0.25, 0.25), metadata={"unit": "nm"})
    return buffer.getvalue()


VALID_TIFF = _valid_tiff_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(VALID_TIFF) - 1), st.integers(0, 255)), max_size=8),
       st.integers(8, len(VALID_TIFF)))
def test_mutated_tiffs_never_raise_anything_but_a_clear_error(tmp_path, flips, length):
    data = bytearray(VALID_TIFF[:length])
    for position, value in flips:
        if position < len(data):
            data[position] = value
    path = tmp_path / "fuzz.tif"
    path.write_bytes(bytes(data))
    try:
        image = read_tiff(path)
    except InputError as err:
        assert str(err) and "\n" not in str(err)
    else:
        assert isinstance(image.data, np.ndarray) and len(image.scale) == image.data.ndim
