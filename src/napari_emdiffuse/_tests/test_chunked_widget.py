"""Task widgets on lazily loaded (zarr/dask) layers: the current view, and the whole layer into a Zarr file."""

import os

import numpy as np
import pytest

from napari_emdiffuse._tests.standards import assert_valid_ome_zarr

zarr = pytest.importorskip("zarr")
da = pytest.importorskip("dask.array")


def chunks_in_progress() -> int:
    """How many of this process's threads are restoring a chunk right now."""
    import sys
    import traceback

    return sum(any(f.name == "process_block" for f in traceback.extract_stack(frame))
               for frame in sys._current_frames().values())


@pytest.fixture
def zarr_layer(make_napari_viewer, tmp_path, tiny_model, monkeypatch):
    """A viewer with a zarr-backed (dask) 3D layer and the Denoise widget docked, the tiny model chosen."""
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", os.path.dirname(tiny_model))
    rng = np.random.default_rng(0)
    zarr.create_array(str(tmp_path / "in.zarr"), data=(rng.random((3, 96, 80)) * 200).astype(np.uint8),
                      chunks=(1, 32, 32))
    viewer = make_napari_viewer(show=True)  # shown: the canvas tells the layer what is in view
    layer = viewer.add_image(da.from_zarr(str(tmp_path / "in.zarr")), name="em", scale=(30.0, 4.0, 4.0),
                             translate=(0.0, 100.0, 0.0), metadata={"unit": "nm"})
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Denoise")
    widget.model_picker.setCurrentText("tiny")
    widget.steps.setValue(1)
    widget.tile.setValue(64)
    return viewer, layer, widget


def test_a_lazy_layer_starts_on_the_current_view_of_the_current_slice(zarr_layer, qtbot):
    viewer, layer, widget = zarr_layer
    assert widget.scope.currentData() == "view"
    viewer.dims.set_point(0, 60.0)  # world z 60 nm = slice 2
    widget.scope.setCurrentIndex(widget.scope.findData("slice"))
    widget.run_button.click()
    qtbot.waitUntil(lambda: "em_denoised" in viewer.layers and widget.worker is None, timeout=60_000)
    out = viewer.layers["em_denoised"]
    assert out.data.shape == (1, 96, 80)
    assert tuple(out.translate) == pytest.approx((60.0, 100.0, 0.0))  # placed on the slice it came from
    assert isinstance(layer.data, da.Array)  # the input stays lazy
    widget.scope.setCurrentIndex(widget.scope.findData("view"))
    viewer.scene.camera.center, viewer.scene.camera.zoom = (60.0, 100.0 + 48 * 4.0, 40 * 4.0), 50.0
    qtbot.waitUntil(lambda: layer.corner_pixels[1, -1] - layer.corner_pixels[0, -1] < 79, timeout=5_000)
    z, y, x = widget.region(layer)
    assert (z.start, z.stop) == (2, 3) and y.start <= 48 < y.stop and x.start <= 40 < x.stop
    assert x.stop - x.start < 79  # only what is in view
    viewer.dims.ndisplay = 3  # whole planes in view, seen at an angle: the current slice, whole
    assert widget.region(layer) == (slice(2, 3), slice(None), slice(None))


def test_the_whole_layer_goes_to_a_zarr_file_and_opens_lazily(zarr_layer, qtbot, tmp_path):
    viewer, layer, widget = zarr_layer
    layer.metadata.pop("unit")
    layer.units = "um"  # as an OME-Zarr reader gives them: the store is written in nm
    widget.scope.setCurrentIndex(widget.scope.findData("zarr"))
    widget.zarr_path.setText(str(tmp_path / "out.zarr"))
    widget.run_button.click()
    qtbot.waitUntil(lambda: "em_denoised_uncertainty" in viewer.layers and widget.worker is None, timeout=120_000)
    out, unc = viewer.layers["em_denoised"], viewer.layers["em_denoised_uncertainty"]
    assert isinstance(out.data, da.Array) and out.data.shape == (3, 96, 80) and out.data.dtype == np.uint8
    assert tuple(out.scale) == (30.0, 4.0, 4.0) and tuple(unc.translate) == (0.0, 100.0, 0.0)
    assert out.metadata["model"] == "tiny" and "reliable" in widget.status.text()
    assert f"Saved in {tmp_path / 'out.zarr'}" in widget.status.text()
    assert_valid_ome_zarr(tmp_path / "out.zarr", unit="nanometer")
    stored = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert stored.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [
        30_000.0, 4000.0, 4000.0]
    # opened again later (another session), it looks the same
    again, again_unc = viewer.open(str(tmp_path / "out.zarr"), plugin="napari-emdiffuse")
    assert (again.name, again_unc.name) == ("out", "out_uncertainty")
    assert np.array_equal(np.asarray(again.data), np.asarray(out.data)) and tuple(again.scale) == (30_000.0, 4000.0, 4000.0)
    assert again_unc.colormap.name == unc.colormap.name and tuple(again_unc.contrast_limits) == tuple(
        unc.contrast_limits)
    assert again.metadata["model"] == "tiny" and again_unc.metadata["map"] == "uncertainty"
    assert "out_uncertainty" not in [widget.layer_picker.itemText(i) for i in range(widget.layer_picker.count())]


def test_cancelling_a_zarr_run_keeps_finished_chunks_and_adds_nothing(zarr_layer, qtbot, tmp_path):
    viewer, _, widget = zarr_layer
    widget.steps.setValue(200)
    widget.scope.setCurrentIndex(widget.scope.findData("zarr"))
    widget.zarr_path.setText(str(tmp_path / "out.zarr"))
    widget.run_button.click()
    qtbot.waitUntil(lambda: chunks_in_progress() > 0, timeout=30_000)
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    assert [layer.name for layer in viewer.layers] == ["em"]
    assert "resume" in widget.status.text()
    # nothing goes on computing (or writing) in the background once the run is reported cancelled
    assert chunks_in_progress() == 0
