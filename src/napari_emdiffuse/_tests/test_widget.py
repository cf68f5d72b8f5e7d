"""Real viewer tests: the Denoise dock widget from the plugin manifest, a run, and a cancel."""

import os
import subprocess
import sys

import numpy as np
import pytest

from napari_emdiffuse._widgets.denoise import DenoiseWidget


@pytest.fixture
def user_models(tiny_model, monkeypatch):
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", os.path.dirname(tiny_model))


def dock_denoise(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Denoise")
    return widget


def test_denoise_widget_adds_result_and_uncertainty_layers(make_napari_viewer, qtbot, em_pair, user_models,
                                                         tmp_path):
    viewer = make_napari_viewer()
    noisy = em_pair[1]
    viewer.add_image(noisy, name="noisy", scale=(4.0, 4.0), translate=(10.0, 20.0))
    widget = dock_denoise(viewer)
    assert isinstance(widget, DenoiseWidget)
    assert widget.layer_picker.currentText() == "noisy"  # the selected layer is preselected
    _, other = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Super-resolution")
    widget.model_picker.setCurrentText("tiny")
    widget.steps.setValue(2)
    widget.seed.setValue(7)
    run = widget.findChild(type(widget.run_button), "run_button")
    run.click()
    assert not run.isEnabled()  # no second run while one is going
    qtbot.waitUntil(lambda: "noisy_denoised_uncertainty" in viewer.layers and widget.worker is None, timeout=60_000)
    out, unc = viewer.layers["noisy_denoised"], viewer.layers["noisy_denoised_uncertainty"]
    assert out.data.shape == noisy.shape and out.data.dtype == noisy.dtype
    assert tuple(out.scale) == (4.0, 4.0) and tuple(out.translate) == (10.0, 20.0)
    assert tuple(unc.scale) == (4.0, 4.0) and tuple(unc.contrast_limits) == pytest.approx((0.0, 0.24))
    for layer in (out, unc):
        meta = layer.metadata
        assert {"uncertainty_score", "threshold", "reliable", "model", "samples", "steps", "seed"} <= set(meta)
        assert meta["model"] == "tiny" and meta["steps"] == 2 and meta["seed"] == 7 and meta["samples"] == 2
        assert meta["reliable"] == (meta["uncertainty_score"] <= meta["threshold"])
    assert unc.data.max() > 0
    assert "reliable" in widget.status.text() and run.isEnabled()
    np.testing.assert_array_equal(viewer.layers["noisy"].data, noisy)  # input untouched
    # no widget moves to the new output (napari selects it), and none offers a map as an input
    assert widget.layer_picker.currentText() == "noisy" and other.layer_picker.currentText() == "noisy"
    offered = [other.layer_picker.itemText(i) for i in range(other.layer_picker.count())]
    assert offered == ["noisy", "noisy_denoised"]
    # saved and opened again, the map is still a map (styled, never an input) and says how it was made
    [path] = unc.save(str(tmp_path / "map.tif"), plugin="napari-emdiffuse")
    viewer.layers.remove(unc)
    [again] = viewer.open(path, plugin="napari-emdiffuse")
    assert again.metadata["seed"] == 7 and again.metadata["map"] == "uncertainty"
    assert again.colormap.name == unc.colormap.name and tuple(again.contrast_limits) == pytest.approx((0.0, 0.24))
    assert [other.layer_picker.itemText(i) for i in range(other.layer_picker.count())] == offered


def test_model_menu_adds_saves_and_removes_user_models(make_napari_viewer, tiny_model, tiny_superres, tmp_path,
                                                       monkeypatch):
    import shutil

    from qtpy.QtWidgets import QMessageBox, QPushButton

    from napari_emdiffuse.core.models import read_metadata

    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path / "models"))  # empty: only the bundled models
    said = []
    monkeypatch.setattr("napari.utils.notifications.show_info", said.append)
    monkeypatch.setattr("napari.utils.notifications.show_error", said.append)
    widget = dock_denoise(make_napari_viewer())
    picker = widget.model_picker
    actions = [a.text() for a in widget.findChild(QPushButton, "model_menu").menu().actions()]
    assert actions == ["Add a model file…", "Save this model to a file…", "Remove this model"]
    shared = shutil.copy(tiny_model, tmp_path / "from_a_colleague.npz")
    picker.add_file(shared)
    assert picker.currentText() == "from_a_colleague" and "Added" in said[-1]
    picker.add_file(tiny_superres)  # another task's model: kept, offered by that task's widget, not this one
    assert "superres" in said[-1] and picker.findText("tiny-sr") < 0
    picker.add_file(tmp_path / "missing.npz")
    assert said[-1].startswith("The model was not added") and "not found" in said[-1]
    picker.setCurrentText("from_a_colleague")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    picker.save_current(str(tmp_path / "notes.txt" / "copy.npz"))  # cannot be written: said, not raised
    assert said[-1].startswith("The model was not saved")
    picker.save_current(str(tmp_path / "copy.npz"))
    assert read_metadata(tmp_path / "copy.npz")["name"] == "from_a_colleague" and said[-1].startswith("Saved")
    monkeypatch.setattr(QMessageBox, "question", lambda *a: QMessageBox.StandardButton.No)
    picker.remove_current()  # asked, and the answer was no
    assert picker.findText("from_a_colleague") >= 0
    monkeypatch.setattr(QMessageBox, "question", lambda *a: QMessageBox.StandardButton.Yes)
    picker.remove_current()
    assert picker.findText("from_a_colleague") < 0 and picker.currentText() == "denoise-sem"
    picker.remove_current()  # the bundled model stays
    assert "cannot be removed" in said[-1] and picker.currentText() == "denoise-sem"


def start_long_run(viewer, qtbot, name: str):
    """Dock Denoise and start a run of many small tiles and steps on a new layer; return once it is under way."""
    viewer.add_image(np.random.default_rng(0).random((384, 384)).astype(np.float32), name=name)
    widget = dock_denoise(viewer)
    widget.model_picker.setCurrentText("tiny")
    widget.steps.setValue(200)
    widget.tile.setValue(64)
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.progress.value() > 0, timeout=30_000)
    return widget


@pytest.mark.parametrize("software", [False, True])
def test_runs_report_in_the_activity_dock_unless_opengl_is_drawn_in_software(make_napari_viewer, qtbot, user_models,
                                                                              monkeypatch, software):
    from napari_emdiffuse._widgets import _common

    monkeypatch.setattr(_common, "_software_opengl", software)
    viewer = make_napari_viewer()
    widget = start_long_run(viewer, qtbot, "img")
    assert (getattr(widget.worker, "pbar", None) is None) is software  # napari's progress, with its animated indicator
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=2_000)


def test_the_renderer_is_known_once_a_viewer_is_shown(make_napari_viewer, qtbot, monkeypatch):
    from napari_emdiffuse._widgets import _common

    monkeypatch.setattr(_common, "_software_opengl", None)
    viewer = make_napari_viewer(show=True)
    qtbot.waitExposed(viewer.window._qt_window)
    assert _common.software_opengl() in (True, False) and _common._software_opengl is not None  # asked OpenGL


def test_software_renderers_are_told_from_gpus():
    from napari_emdiffuse._widgets._common import is_software_renderer

    for name in ("llvmpipe (LLVM 15.0.6, 256 bits)", "softpipe", "Google SwiftShader", "GDI Generic",
                 "Microsoft Basic Render Driver"):
        assert is_software_renderer(name), name
    for name in ("NVIDIA GeForce RTX 3080/PCIe/SSE2", "Mesa Intel(R) UHD Graphics 620 (KBL GT2)", "Apple M2",
                 "AMD Radeon Pro 5300M OpenGL Engine"):
        assert not is_software_renderer(name), name


def test_cancel_stops_quickly_and_adds_nothing(make_napari_viewer, qtbot, user_models):
    viewer = make_napari_viewer()
    widget = start_long_run(viewer, qtbot, "big")
    qtbot.waitUntil(lambda: "left" in widget.progress.format(), timeout=30_000)  # the bar says how long it needs
    widget.findChild(type(widget.cancel_button), "cancel_button").click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=2_000)  # stopped within 2 s
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert "Cancelled" in widget.status.text() and widget.run_button.isEnabled()
    assert widget.progress.format() == "%p%"


@pytest.mark.parametrize("data, free_bytes, expected", [
    (np.full((20, 20), np.nan, np.float32), None, "NaN"),
    (np.zeros((4, 32, 32), np.uint8), 2**10, "Zarr file"),  # a result that cannot fit in memory: the way out
])
def test_errors_reach_the_user_as_a_notification(data, free_bytes, expected, make_napari_viewer, qtbot, user_models,
                                                 monkeypatch):
    from napari_emdiffuse.core import memory

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    if free_bytes is not None:
        monkeypatch.setattr(memory, "available_bytes", lambda device=None: free_bytes)
    viewer = make_napari_viewer()
    viewer.add_image(data, name="input")
    widget = dock_denoise(viewer)
    widget.model_picker.setCurrentText("tiny")
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.worker is None and bool(shown), timeout=10_000)
    assert expected in shown[0] and "Traceback" not in shown[0]
    assert [layer.name for layer in viewer.layers] == ["input"]


def test_manifest_is_valid_and_importable():
    done = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-emdiffuse", "--imports"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_superres_widget_output_overlays_the_input(make_napari_viewer, qtbot, tiny_superres, user_models):
    from napari_emdiffuse._widgets.superres import SuperresWidget

    viewer = make_napari_viewer()
    lr = viewer.add_image(np.random.default_rng(0).random((24, 32)).astype(np.float32), name="lr",
                          scale=(6.6, 6.6), translate=(5.0, -3.0), units="nm", axis_labels=("y", "x"))
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Super-resolution")
    assert isinstance(widget, SuperresWidget)
    widget.model_picker.setCurrentText("tiny-sr")
    widget.scale.setCurrentIndex(widget.scale.findData(4))
    widget.steps.setValue(1)
    widget.run_button.click()
    qtbot.waitUntil(lambda: "lr_superres" in viewer.layers and widget.worker is None, timeout=60_000)
    hr = viewer.layers["lr_superres"]
    assert hr.data.shape == (96, 128)
    assert tuple(hr.scale) == pytest.approx((1.65, 1.65))
    edges = lambda layer: layer.extent.world + np.array([-0.5, 0.5])[:, None] * layer.scale  # noqa: E731  pixel edges
    np.testing.assert_allclose(edges(hr), edges(lr), atol=1e-6)  # same world extent
    assert hr.units == lr.units and hr.axis_labels == ("y", "x")
    assert "lr_superres_uncertainty" in viewer.layers


def test_closing_napari_during_a_run_is_known_to_napari_and_stops_the_run(make_napari_viewer, qtbot, user_models):
    viewer = make_napari_viewer()
    widget = start_long_run(viewer, qtbot, "img")
    manager = viewer.window._task_status_manager  # what napari's close dialog lists and cancels
    assert manager.is_busy() and manager.get_status()
    manager.cancel_all()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=2_000)
    assert [layer.name for layer in viewer.layers] == ["img"]


def test_finetune_widget_prefills_from_two_selected_layers_and_trains(make_napari_viewer, qtbot, tiny_model,
                                                                     user_models, tmp_path, monkeypatch):
    from napari_emdiffuse._widgets.finetune import FinetuneWidget
    from napari_emdiffuse.core.register import shift_image
    from napari_emdiffuse.core.simulate import SEMNoise, synthetic_em

    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path / "user"))
    clean = synthetic_em((160, 192), seed=9)
    viewer = make_napari_viewer()
    slow = viewer.add_image(shift_image(clean, (1.5, -2.0)).astype(np.float32), name="slow")
    fast = viewer.add_image(SEMNoise(electrons=20)(clean, np.random.default_rng(0)), name="fast")
    _, denoise_widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Denoise")
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Fine-tune")
    assert isinstance(widget, FinetuneWidget)
    viewer.layers.selection = {slow, fast}
    assert widget.input_picker.currentText() == "fast" and widget.target_picker.currentText() == "slow"
    viewer.layers.selection.active = slow  # one layer selected afterwards: the pair stays as it was
    assert widget.input_picker.currentText() == "fast" and widget.target_picker.currentText() == "slow"
    widget.base.setCurrentIndex(widget.base.findData(tiny_model))
    widget.minutes.setValue(0.1)
    widget.name.setText("tuned-here")
    widget.residual_map.setChecked(True)
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert len(widget.plot.points) >= 2
    residual = viewer.layers["fast residual (px)"]  # one pixel per 64-px block, over the input
    assert residual.scale[0] == pytest.approx(64.0) and residual.metadata["registration"]["residual_px"] >= 0
    text = widget.status.text()
    assert "Validation PSNR" in text or "kept" in text
    if "Validation PSNR" in text:  # saved: every task widget's picker lists it without being reopened
        assert denoise_widget.model_picker.findText("tuned-here") >= 0


def test_finetune_widget_tunes_an_isotropic_model_on_one_isotropic_volume(make_napari_viewer, qtbot, user_models,
                                                                          learnt_isotropic, monkeypatch):
    from napari_emdiffuse.core.simulate import synthetic_volume

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    volume = (synthetic_volume((20, 32, 32), seed=4) * 200 + 20).astype(np.uint8)
    viewer = make_napari_viewer()
    viewer.add_image(volume[0], name="plane")
    viewer.add_image(volume[::4], name="sections", scale=(40.0, 10.0, 10.0))
    fib = viewer.add_image(volume, name="fib", scale=(10.0, 10.0, 10.0))
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Fine-tune")
    assert widget.target_picker.currentText() != widget.input_picker.currentText()  # a pair differs from the start
    widget.task.setCurrentIndex(widget.task.findData("isotropic"))
    assert widget.target_picker.isHidden() and widget.scale.isHidden() and not widget.factor.isHidden()
    assert widget.form.labelForField(widget.input_picker).text() == "Volume"
    viewer.layers.selection = {fib}
    assert widget.input_picker.currentText() == "fib"
    widget.base.setCurrentIndex(widget.base.findData(learnt_isotropic))
    widget.input_picker.setCurrentText("plane")
    widget.run_button.click()
    assert widget.worker is None and "Choose a volume" in str(shown[-1])
    widget.input_picker.setCurrentText("sections")  # 40 nm sections of 10 nm pixels: not isotropic
    widget.run_button.click()
    assert widget.worker is None and "isotropic volume" in str(shown[-1])
    widget.input_picker.setCurrentText("fib")
    widget.minutes.setValue(0.1)
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert len(widget.plot.points) >= 2
    assert "Validation PSNR" in widget.status.text() or "kept" in widget.status.text()
    widget.task.setCurrentIndex(widget.task.findData("denoise"))  # and back: the pair's rows return
    assert not widget.target_picker.isHidden() and widget.factor.isHidden()


def test_the_loss_plot_shows_the_trend_and_the_validation_points_inside_its_frame(qtbot, tmp_path):
    from qtpy.QtGui import QColor

    from napari_emdiffuse._widgets.finetune import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.resize(360, 160)
    plot.show()
    steps = np.arange(1, 2001, 5)
    for s in steps:  # a large first loss, then a slow fall a linear axis would flatten
        plot.add(int(s), 0.02 + 0.01 * np.exp(-s / 800) + (0.5 if s < 20 else 0.0))
    for s, psnr in ((500, 25.3), (1000, 25.6), (2000, 25.9)):
        plot.add_validation(s, psnr, 25.2)
    image = plot.grab().toImage()
    image.save(str(tmp_path / "loss_plot.png"))
    cyan, orange = [], []
    for y in range(image.height()):
        for x in range(image.width()):
            c = QColor(image.pixel(x, y))
            if c.red() < 60 and c.green() > 200 and c.blue() > 200:
                cyan.append((x, y))
            elif c.red() > 230 and 120 < c.green() < 200 and c.blue() < 90:
                orange.append((x, y))
    curve = [(x, y) for x, y in cyan if y > LossPlot.TOP]  # below the title line
    assert curve and all(LossPlot.LEFT - 2 <= x <= image.width() - LossPlot.RIGHT + 2 for x, _ in curve)
    early = np.mean([y for x, y in curve if x < LossPlot.LEFT + 40])
    late = np.mean([y for x, y in curve if x > image.width() - LossPlot.RIGHT - 40])
    assert late - early > 0.3 * (image.height() - LossPlot.TOP - LossPlot.BOTTOM)  # falls visibly (y grows down)
    dots = [(x, y) for x, y in orange if y > LossPlot.TOP]
    assert len({x // 10 for x, _ in dots}) >= 3  # three validation points (and the base line) are drawn
