"""Live mode, result display and layer naming in the real viewer (Denoise and Super-resolution docks)."""

import os

import numpy as np
import pytest

from napari_emdiffuse.core.live import ViewDone


@pytest.fixture
def user_models(tiny_model, tiny_superres, monkeypatch):
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", os.path.dirname(tiny_model))


def dock(viewer, name, model):
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", name)
    widget.model_picker.setCurrentText(model)
    widget.samples.setValue(1)
    return widget


def live_done(widget):
    return "view restored" in widget.status.text()


@pytest.mark.slow
def test_live_mode_follows_camera_and_slices_reuses_tiles_and_stops(make_napari_viewer, qtbot, em_pair,
                                                                    user_models):
    viewer = make_napari_viewer()
    stack = np.stack([em_pair[1], em_pair[1][::-1], em_pair[1][:, ::-1]])  # 3 x 128 x 160
    viewer.add_image(stack, name="noisy", scale=(1.0, 2.0, 2.0))
    widget = dock(viewer, "Denoise", "tiny")
    widget.live_tile.setValue(64)  # the view then spans several tiles of the 128 x 160 slice
    viewer.camera.zoom = 4.0  # the view shows about a quarter of the slice
    viewer.camera.center = (0, 64, 80)
    placed = []
    widget.live.setChecked(True)
    live = widget.live_mode
    live.worker.yielded.connect(placed.append)
    qtbot.waitUntil(lambda: live_done(widget), timeout=60_000)
    layers = [layer for layer in viewer.layers if layer.metadata.get("live")]
    assert [layer.name for layer in layers] == ["noisy_denoised (live)", "noisy_denoised (live)_uncertainty"]
    result = layers[0]
    assert result.data.dtype == stack.dtype and tuple(result.scale) == (2.0, 2.0)
    box = live.box
    assert tuple(result.translate) == (2.0 * box[0], 2.0 * box[1])
    first_plane, first_tiles = live.plane, live.restorer.restored_tiles
    assert first_plane == 1 and first_tiles > 0
    # what the layer shows is the restored tile of this plane
    tile, _ = live.cache.get(live.restorer.tile_key(1, (0, 0)))
    np.testing.assert_array_equal(result.data[:tile.shape[0], :tile.shape[1]], tile)

    # another slice: restored into the same layer
    placed.clear()
    viewer.dims.set_current_step(0, 2)
    qtbot.waitUntil(lambda: live.plane == 2 and any(isinstance(e, ViewDone) for e in placed), timeout=60_000)
    assert [layer.name for layer in viewer.layers if layer.metadata.get("live")] == [layer.name for layer in layers]
    # a pan: the view moves, only the uncovered tiles are restored
    placed.clear()
    before = live.restorer.restored_tiles
    viewer.camera.center = (0, 64, 200)  # 60 data pixels right, most of the 75 on screen: one new tile column
    qtbot.waitUntil(lambda: any(isinstance(e, ViewDone) and e.view.plane == 2 for e in placed), timeout=60_000)
    assert 0 < live.restorer.restored_tiles - before < first_tiles
    # back to the first slice and place: all from the cache, no network evaluation
    placed.clear()
    evaluations = live.restorer.evaluations
    viewer.camera.center = (0, 64, 80)
    viewer.dims.set_current_step(0, 1)
    qtbot.waitUntil(lambda: any(isinstance(e, ViewDone) and e.view.plane == 1 for e in placed), timeout=60_000)
    assert live.restorer.evaluations == evaluations
    assert [e for e in placed if isinstance(e, ViewDone)][-1].restored == 0

    # a setting changes: served again with it; then the toggle stops everything
    widget.seed.setValue(3)
    qtbot.waitUntil(lambda: live.restorer is not None and live.restorer.settings.seed == 3, timeout=10_000)
    restorer, worker = live.restorer, live.worker
    widget.live.setChecked(False)
    assert live.restorer is None and restorer.stopped
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    data = result.data.copy()
    viewer.camera.center = (0, 30, 30)
    qtbot.wait(300)
    np.testing.assert_array_equal(result.data, data)  # nothing follows the camera any more


def test_live_mode_says_what_it_restores_when_zoomed_far_out(make_napari_viewer, em_pair, user_models):
    viewer = make_napari_viewer()
    viewer.add_image(np.tile(em_pair[1], (20, 16)), name="big")  # 2560 x 2560
    widget = dock(viewer, "Denoise", "tiny")
    viewer.camera.zoom = 0.1
    viewer.camera.center = (1280, 1280)
    widget.live.setChecked(True)
    assert "paused" in widget.status.text() and "zoom in" in widget.status.text()
    widget.live.setChecked(False)


def test_closing_the_viewer_ends_live_mode_and_its_worker(make_napari_viewer, em_pair, user_models):
    viewer = make_napari_viewer()
    viewer.add_image(em_pair[1], name="noisy")
    widget = dock(viewer, "Denoise", "tiny")
    widget.live.setChecked(True)
    live = widget.live_mode
    restorer, finished = live.restorer, live.finished
    viewer.close()  # while the first tile is restored
    assert restorer.stopped and finished.is_set() and not widget.live.isChecked()


def test_live_superres_overlays_the_input_on_the_output_grid(make_napari_viewer, qtbot, em_pair, user_models):
    viewer = make_napari_viewer()
    viewer.add_image(em_pair[1], name="lowmag", scale=(4.0, 4.0))
    widget = dock(viewer, "Super-resolution", "tiny-sr")
    viewer.camera.zoom = 3.0
    viewer.camera.center = (256, 320)
    widget.live.setChecked(True)
    qtbot.waitUntil(lambda: live_done(widget), timeout=60_000)
    layer = viewer.layers["lowmag_superres (live)"]
    box = widget.live_mode.box
    assert tuple(layer.scale) == (2.0, 2.0) and layer.data.shape == (box[2] - box[0], box[3] - box[1])
    assert tuple(layer.translate) == pytest.approx((-1.0 + 2.0 * box[0], -1.0 + 2.0 * box[1]))
    widget.live.setChecked(False)


def test_results_named_after_their_task_replaced_when_run_again_and_pickers_stay(make_napari_viewer, qtbot,
                                                                                 em_pair, user_models):
    viewer = make_napari_viewer()
    viewer.add_image(em_pair[1], name="noisy")
    denoiser = dock(viewer, "Denoise", "tiny")
    upscaler = dock(viewer, "Super-resolution", "tiny-sr")
    for widget in (denoiser, upscaler):
        widget.samples.setValue(2)
        widget.run_button.click()
        qtbot.waitUntil(lambda widget=widget: widget.worker is None, timeout=60_000)
        assert denoiser.layer_picker.currentText() == "noisy" and upscaler.layer_picker.currentText() == "noisy"
    names = [layer.name for layer in viewer.layers]
    assert names == ["noisy", "noisy_denoised", "noisy_denoised_uncertainty", "noisy_superres",
                     "noisy_superres_uncertainty"]
    first = viewer.layers["noisy_denoised"]
    denoiser.run_button.click()  # the same settings: its own result is replaced
    qtbot.waitUntil(lambda: denoiser.worker is None, timeout=60_000)
    assert [layer.name for layer in viewer.layers] == names and viewer.layers["noisy_denoised"] is first
    denoiser.seed.setValue(9)  # other settings: a result of its own
    denoiser.run_button.click()
    qtbot.waitUntil(lambda: denoiser.worker is None, timeout=60_000)
    assert len(viewer.layers) == 7
    # the user can still choose a result as input, by selecting it
    viewer.layers.selection.active = viewer.layers["noisy"]
    viewer.layers.selection.active = first
    qtbot.waitUntil(lambda: upscaler.layer_picker.currentText() == "noisy_denoised", timeout=2_000)


def test_result_input_and_map_buttons(make_napari_viewer, qtbot, em_pair, user_models):
    viewer = make_napari_viewer()
    viewer.add_image(em_pair[1], name="noisy")
    widget = dock(viewer, "Denoise", "tiny")
    widget.samples.setValue(2)
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    image, result, unc = (viewer.layers[n] for n in ("noisy", "noisy_denoised", "noisy_denoised_uncertainty"))
    # by default: the result, with only the flagged areas coloured (transparent below the threshold)
    assert result.visible and unc.visible and unc.colormap.name == "emdiffuse_uncertainty"
    assert unc.colormap.map(np.array([0.49]))[0, 3] == 0 and unc.colormap.map(np.array([0.51]))[0, 3] == 1
    widget.show_buttons.set_mode("Input")
    assert image.visible and not result.visible and not unc.visible
    widget.show_buttons.set_mode("Map")
    assert unc.visible and unc.colormap.name == "emdiffuse_uncertainty_full" and unc.opacity == 1.0
    assert unc.colormap.map(np.array([0.1]))[0, 3] == 1  # the whole map, below the threshold too
    widget.show_buttons.set_mode("Result")
    assert result.visible and unc.colormap.name == "emdiffuse_uncertainty"


def test_rarely_changed_settings_are_folded_away(make_napari_viewer, qtbot):
    from napari_emdiffuse._sample_data import noisy_sem

    viewer = make_napari_viewer(show=True)
    viewer.add_image(noisy_sem()[0][0], name="noisy_sem")
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Denoise")
    qtbot.wait(300)
    assert not widget.more_settings.isExpanded()  # rarely changed settings are folded away
    assert widget.more_settings.content().height() == 0  # and take no room
    widget.more_settings.expand(animate=False)
    qtbot.waitUntil(lambda: widget.more_settings.content().height() > 0, timeout=2_000)  # one click away


@pytest.mark.parametrize("name", ["Denoise", "Super-resolution", "Isotropic reconstruction", "Fine-tune"])
def test_at_napari_first_window_size_the_dock_leaves_the_canvas_room_and_squeezes_no_row(make_napari_viewer, qtbot,
                                                                                         name):
    from napari.settings import get_settings

    from napari_emdiffuse._layers import style_uncertainty
    from napari_emdiffuse._sample_data import noisy_sem

    get_settings().application.first_time = True  # napari sizes a new user's window to its contents
    viewer = make_napari_viewer(show=True)
    viewer.add_image(noisy_sem()[0][0], name="noisy_sem")
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", name)
    qtbot.wait(300)
    for full in (False, True):  # a result's map selected: napari's layer controls fit its colormap's name
        style_uncertainty(viewer.add_image(np.zeros((8, 8)), name="noisy_sem_denoised_uncertainty"), full)
        qtbot.wait(100)
        window, canvas = viewer.window._qt_window.width(), viewer.window._qt_viewer.canvas.native.width()
        assert canvas >= 0.5 * window, (canvas, window)
        viewer.layers.pop()
    # a window too short for every row scrolls the dock instead of squeezing rows on top of each other
    assert widget.content.height() >= widget.content.minimumSizeHint().height() > widget.scroll.viewport().height() \
        or widget.content.height() == widget.scroll.viewport().height()
    assert widget.run_button.height() >= widget.run_button.minimumSizeHint().height()
