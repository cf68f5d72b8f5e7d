"""Controls shared by every task widget: layer and model pickers, sampling settings, Run/Cancel, progress.

A task widget subclasses :class:`RestoreWidget`, names its task and output suffix, and turns the chosen layer into
a job generator (``make_job``). Running, progress, cancellation and the output layers are handled here, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .._layers import MAPS, pixel_size, result_layers
from ..core.tasks import PRECISIONS, UNCERTAINTY_THRESHOLD, Settings, Throttle, TimeLeft, time_left_text, verdict

if TYPE_CHECKING:
    import napari


SCOPES = (("Whole layer", "layer"), ("Current slice", "slice"), ("Current view", "view"),
          ("Whole layer to a Zarr file (chunk by chunk)", "zarr"))
LARGE_LAYER_BYTES = 512 * 2**20
DOCK_WIDTH = 172  # pixels of rows the task docks ask for (they need 171), plus the scroll bar's: at napari's
# first-run window size (1089 wide under Xvfb, layer controls 320) the canvas keeps 558 px
MODEL_FILES = "napari-emdiffuse models (*.npz);;BioImage.io model packages (*.zip)"  # .zip: export_model's package
MODEL_FILES_TO_ADD = ("Model files (*.npz *.zip *.pth *.pt);;" + MODEL_FILES
                      + ";;EMDiffuse authors' checkpoints (*.pth *.pt)")
# at most one progress update a second: each repaints the window, which with software OpenGL (remote desktops,
# virtual machines) costs the job measurable time (isotropic reconstruction of the sample volume: 19 s at five
# updates a second, 10-11 s at one, 7-10 s with the window hidden)
UPDATE_SECONDS = 1.0
SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swrast", "swiftshader", "software rasterizer", "gdi generic",
                      "basic render driver")  # Mesa's, Google's and Windows' OpenGL without a GPU


def is_software_renderer(renderer: str) -> bool:
    return any(name in renderer.lower() for name in SOFTWARE_RENDERERS)


_software_opengl: bool | None = None


def software_opengl() -> bool:
    """Whether napari's canvas is drawn without a GPU (remote desktops, virtual machines). There napari's animated
    activity indicator repaints the whole window 25 times a second and leaves a job a third of its speed
    (self-supervised learning on 2 cores: about 110 steps in 30 s instead of 330-430), so jobs report in the widget
    only."""
    global _software_opengl
    if _software_opengl is None:
        try:
            from vispy.gloo import gl
            from vispy.gloo.context import get_current_canvas

            canvas = get_current_canvas()  # napari's, once a viewer is shown
            if canvas is None:
                return False  # not known yet
            canvas.set_current()
            _software_opengl = is_software_renderer(str(gl.glGetParameter(gl.GL_RENDERER)))
        except Exception:  # no OpenGL information: assume a GPU (and ask again next time)
            return False
    return _software_opengl


def compact(widget: QWidget) -> None:
    """Narrow enough for napari's default window to keep most of its width for the canvas: labels go above their
    fields (fields get the whole width, and the rows' height does not depend on it: a short window scrolls the dock
    rather than squeezing rows), and drop-down lists are as wide as the dock, not as their longest entry."""
    for form in widget.findChildren(QFormLayout):
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapAllRows)
    for box in widget.findChildren(QComboBox):
        box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        box.setMinimumContentsLength(6)


def folded_form(title: str, name: str):
    """A collapsible section, folded, holding a form (returned too) aligned with the rows above it."""
    from superqt import QCollapsible

    section = QCollapsible(title)
    section.setObjectName(name)
    section.layout().setContentsMargins(0, 0, 0, 0)
    content = QWidget()
    form = QFormLayout(content)
    form.setContentsMargins(0, 0, 0, 0)
    section.addWidget(content)
    return section, form


def full_resolution(layer):
    """The layer's data at full resolution (level 0 of a multiscale layer), as it is: numpy, dask or zarr."""
    return layer.data[0] if layer.multiscale else layer.data


class LayerPicker(QComboBox):
    """Grey-level image layers of the viewer (not our maps), kept in sync with it.

    With ``follow_selection`` it moves to the layer the user selects (a task widget's one input), but not to a result
    just added (napari selects every new layer: a result appearing must not change what the widgets work on);
    without, it is set by its widget (the fine-tuning pair, which comes from two selected layers).
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent=None, follow_selection: bool = True):
        super().__init__(parent)
        self.viewer = viewer
        self._just_added = None
        viewer.layers.events.inserted.connect(self._inserted)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.moved.connect(self.refresh)
        self.refresh()
        if follow_selection:
            viewer.layers.selection.events.active.connect(self._follow_selection)
            self._follow_now()

    def _images(self):
        from napari.layers import Image

        return [layer for layer in self.viewer.layers
                if isinstance(layer, Image) and not layer.rgb and layer.metadata.get("map") not in MAPS
                and not layer.metadata.get("live")]  # live mode's canvas is no input

    def refresh(self, event=None):
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        for layer in self._images():
            self.addItem(layer.name)
            layer.events.name.connect(self.refresh)
        index = self.findText(current)
        self.setCurrentIndex(index if index >= 0 else (0 if self.count() else -1))
        self.blockSignals(False)

    def _inserted(self, event) -> None:
        self._just_added = event.value
        self.refresh()

    def _follow_selection(self, event=None):
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, self._follow_now)  # after the insertion that may have caused it is known

    def _follow_now(self) -> None:
        active = self.viewer.layers.selection.active
        just_added, self._just_added = self._just_added, None
        if active is just_added and active is not None and "task" in active.metadata:
            return  # a result just added: the user chooses it explicitly
        if active is not None and active in self._images():
            self.setCurrentText(active.name)

    def layer(self):
        name = self.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None


def noisiness(image: np.ndarray) -> float:
    """Fine-scale variation relative to the overall contrast: larger for the noisier of two acquisitions."""
    from scipy.ndimage import gaussian_filter

    a = np.asarray(image)
    a = (a[..., ::2, ::2] if a.size > 4_000_000 else a).astype(np.float32)  # a subsample says enough for big layers
    return float(np.std(a - gaussian_filter(a, 1.0)) / (np.std(a) + 1e-12))


class ModelPicker(QComboBox):
    """The models of one task; follows the registry (new fine-tuned, imported or removed models)."""

    models_updated = Signal()  # emitted from any thread; the refresh runs in the GUI thread

    def __init__(self, task: str, parent=None):
        from ..core.models import on_models_changed

        super().__init__(parent, objectName="model_picker")
        self.task = task
        self.menu_button = None  # see with_menu
        self.export_options = dict  # what a BioImage.io package is made for: the isotropic widget gives its factor
        self.models_updated.connect(self.refresh)
        on_models_changed(self._registry_changed)
        self.refresh()

    def _registry_changed(self) -> None:
        try:
            self.models_updated.emit()
        except RuntimeError:  # the Qt side is already deleted
            pass

    def set_task(self, task: str) -> None:
        self.task = task
        self.refresh()

    def refresh(self) -> None:
        from ..core.models import list_models

        current = self.currentText()
        self.clear()
        for entry in list_models(self.task):
            self.addItem(entry.name, str(entry.path))
            self.setItemData(self.count() - 1, entry.description, Qt.ToolTipRole)
        index = self.findText(current)
        if index >= 0:
            self.setCurrentIndex(index)

    def with_menu(self) -> QHBoxLayout:
        """The picker beside a "…" button whose menu adds a model file, saves the chosen model to a file or
        removes it (the command line's ``emdiffuse models --import/--export/--remove``)."""
        from qtpy.QtWidgets import QMenu

        button = QPushButton("…", objectName="model_menu")
        button.setToolTip("Add a model file (e.g. fine-tuned on another computer), save this model to a file (to "
                          "share it or to use it on a cluster), or remove it.")
        menu = QMenu(button)
        menu.addAction("Add a model file…", self._choose_file_to_add)
        menu.addAction("Save this model to a file…", self._choose_file_to_save)
        menu.addAction("Remove this model", self.remove_current)
        button.setMenu(menu)
        button.setStyleSheet("QPushButton::menu-indicator { image: none; width: 0px; }")  # no arrow: like the Zarr file's
        self.menu_button = button
        row = QHBoxLayout()
        row.addWidget(self, 1)
        row.addWidget(button)
        return row

    def _choose_file_to_add(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(self, "Add a model file", "", MODEL_FILES_TO_ADD)
        if path:
            self.add_file(path)

    def ask_task(self, path: str) -> str | None:
        """The task of a model file that does not record it (the authors' checkpoints); None if the user cancels."""
        from qtpy.QtWidgets import QInputDialog

        from ..core.models import TASKS

        task, ok = QInputDialog.getItem(self, "Which task?", f"{Path(path).name} does not say what it was trained "
                                        "for.\nIt is a model for:", list(TASKS), TASKS.index(self.task), False)
        return task if ok else None

    def _choose_file_to_save(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        if self.currentIndex() >= 0:
            path, _ = QFileDialog.getSaveFileName(self, "Save the model to a file", f"{self.currentText()}.npz",
                                                  MODEL_FILES)
            if path:
                self.save_current(path)

    def add_file(self, path: str) -> None:
        """Copy a checked model file into the user's models and choose it (it then appears in every picker of
        its task)."""
        from napari.utils.notifications import show_error, show_info

        from ..core.models import CHECKPOINT_SUFFIXES, ModelFileError, import_model, read_metadata

        task = None
        if Path(path).suffix in CHECKPOINT_SUFFIXES:
            task = self.ask_task(path)
            if task is None:
                return
        try:
            installed = import_model(path, task=task)
        except ModelFileError as err:
            show_error(f"The model was not added: {err}")
            return
        task = read_metadata(installed)["task"]
        if task == self.task:
            self.setCurrentText(installed.stem)
            show_info(f"Added the model '{installed.stem}'.")
        else:
            show_info(f"Added the model '{installed.stem}', a {task} model: the {task} widget offers it.")

    def save_current(self, path: str) -> None:
        from napari.utils.notifications import show_error, show_info

        from ..core.models import ModelFileError, export_model

        try:  # the file dialog has already asked before replacing a file
            saved = export_model(self.currentData(), path, overwrite=True, **self.export_options())
        except (ModelFileError, OSError) as err:
            show_error(f"The model was not saved: {err}")
            return
        show_info(f"Saved the model '{self.currentText()}' to {saved}.")

    def remove_current(self) -> None:
        """Remove the chosen user model, after asking; bundled models stay."""
        from napari.utils.notifications import show_error
        from qtpy.QtWidgets import QMessageBox

        from ..core.models import ModelFileError, list_models, remove_model

        name = self.currentText()
        if not name:
            return
        if any(entry.name == name and entry.bundled for entry in list_models(self.task)):
            show_error(f"'{name}' comes with the plugin and cannot be removed.")
            return
        asked = QMessageBox.question(self, "Remove the model", f"Remove your model '{name}'? Its file is deleted.")
        if asked != QMessageBox.StandardButton.Yes:
            return
        try:
            remove_model(name)
        except ModelFileError as err:
            show_error(f"The model was not removed: {err}")


class DockRows(QWidget):
    """A dock's rows, asking for at most ``width`` pixels (labels sit above their fields: see :func:`compact`), so
    that the canvas keeps most of the window. The minimum is capped too: Qt fixes a dock's minimum width from it
    once, when the dock is added and napari's smaller font is not yet applied (the task docks' rows then measure
    208 px; styled, 171)."""

    def __init__(self, width: int | None):
        super().__init__(objectName="content")
        self.width_limit = width

    def _capped(self, hint):
        if self.width_limit is not None:
            hint.setWidth(min(hint.width(), self.width_limit))
        return hint

    def sizeHint(self):
        return self._capped(super().sizeHint())

    def minimumSizeHint(self):
        return self._capped(super().minimumSizeHint())

    def heightForWidth(self, width: int) -> int:
        """What the scroll area gives the rows: never less than their minimum (the layouts' preferred height for a
        width, the status line's wrapping, can be less, and the rows would be squeezed)."""
        return max(super().heightForWidth(width), self.minimumSizeHint().height())


class JobWidget(QWidget):
    """Run/Cancel buttons, a progress bar and a status line around one job generator at a time.

    ``start(job, description)`` runs the generator in a napari thread worker (napari's close confirmation, cancel
    between two yields, the Activity dock unless OpenGL is drawn in software); subclasses handle
    ``on_progress``/``on_result``.
    """

    cancelled_text = "Cancelled; nothing was added."
    dock_width = None  # at most this many pixels wide (None: as wide as the rows ask)

    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.worker = None
        self._pbar = None
        self._time_left = TimeLeft()
        self.update_due = Throttle(UPDATE_SECONDS)  # (last=False) -> whether to show progress now
        self.form = QFormLayout()
        self.run_button = QPushButton("Run", objectName="run_button")
        self.cancel_button = QPushButton("Cancel", objectName="cancel_button", enabled=False)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar(objectName="progress", minimum=0, maximum=1, value=0)
        self.status = QLabel("", objectName="status", wordWrap=True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.extra = QVBoxLayout()  # room for subclasses (e.g. a loss plot) between progress and status

        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.content = DockRows(self.dock_width)
        layout = QVBoxLayout(self.content)
        layout.addLayout(self.form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addLayout(self.extra)
        layout.addWidget(self.status)
        layout.addStretch(1)
        # a window too short for every row scrolls the dock instead of squeezing its rows on top of each other
        scroll = QScrollArea(widgetResizable=True, frameShape=QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(self.content)
        self.scroll = scroll
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)  # the scroll area fills the dock

    def sizeHint(self):
        """The rows' width and room for the scroll bar, which a short window shows."""
        hint = super().sizeHint()
        hint.setWidth(self.content.sizeHint().width() + self.scroll.verticalScrollBar().sizeHint().width())
        return hint

    def run(self) -> None:
        raise NotImplementedError

    def start(self, job, description: str, on_result) -> None:
        from napari.qt.threading import create_worker

        def work():
            return (yield from job)

        self._set_running(True)
        self._time_left = TimeLeft()
        activity = not software_opengl() and {"desc": description}  # napari's Activity dock
        self.worker = create_worker(work, _progress=activity, _ignore_errors=True)
        self._pbar = getattr(self.worker, "pbar", None)
        self.worker.yielded.connect(self.on_progress)
        self.worker.returned.connect(on_result)
        self.worker.errored.connect(self._on_error)
        self.worker.aborted.connect(self._on_aborted)
        # a cancelled worker drops its generator without closing it: close the job right there, in the worker's
        # thread, so that its clean-up (e.g. stopping a chunked run's tasks) runs now and off the GUI thread
        self.worker.aborted.connect(job.close, Qt.ConnectionType.DirectConnection)
        self.worker.finished.connect(lambda: self._set_running(False))
        self.worker.start()

    def cancel(self) -> None:
        if self.worker is not None:
            self.status.setText("Cancelling…")
            self.worker.quit()

    def show_progress(self, done: int, total: int, message: str) -> None:
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)
        left = time_left_text(self._time_left(done, total)) if done < total else ""
        self.progress.setFormat(f"%p%  ·  {left}" if left else "%p%")
        if self._pbar is not None and total:
            if self._pbar.total != total:
                self._pbar.total = total
            self._pbar.update(done - self._pbar.n)
            self._pbar.set_description(f"{message} ({left})" if left else message)

    def on_progress(self, p) -> None:
        self.show_progress(p.done, p.total, p.message)

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if not running:
            self.worker = None
            self.progress.setFormat("%p%")  # no time left after an end, a cancel or an error

    def _on_error(self, err: Exception) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(f"Failed: {err}")
        show_error(f"{self.title} failed: {err}")

    def _on_aborted(self) -> None:
        self.progress.setValue(0)
        self.status.setText(self.cancelled_text)

    @property
    def title(self) -> str:
        return type(self).__name__.removesuffix("Widget")


class RestoreWidget(JobWidget):
    dock_width = DOCK_WIDTH
    task = ""  # set by subclasses: "denoise", ...
    suffix = ""  # output layer name suffix, e.g. "denoised"
    doing = ""  # what the running job is, for the status line

    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        from ..core.live import CACHE_MB, LIVE_TILE
        from ._live import LiveMode

        super().__init__(viewer, parent)
        form = self.form
        self.layer_picker = LayerPicker(viewer)
        self.layer_picker.setObjectName("layer_picker")
        form.addRow("Image", self.layer_picker)
        self.model_picker = ModelPicker(self.task)
        form.addRow("Model", self.model_picker.with_menu())
        self.add_task_controls(form)
        self.samples = self._spin(form, "Samples", 1, 16, 2, "samples",
                                  "Number of samples K; their mean is the result, their spread (with the spread the "
                                  "model predicts for each) the uncertainty.")
        self.steps = self._spin(form, "Steps", 0, 200, 0, "steps",
                                "Sampling steps per sample (network evaluations); 0 (auto) uses the model's default.")
        self.steps.setSpecialValueText("auto")  # short: the dock is narrow
        self.seed = self._spin(form, "Seed", 0, 2**31 - 1, 0, "seed", "Same seed, same result.")
        self.scope = QComboBox(objectName="scope")
        for text, scope in SCOPES:
            self.scope.addItem(text, scope)
        self.scope.setToolTip("Big or lazily loaded (e.g. OME-Zarr) layers: try settings on the current view, then "
                              "process the whole layer chunk by chunk into a Zarr file, opened lazily when done.")
        form.addRow("Process", self.scope)
        self.live = QCheckBox("Live view", objectName="live")
        self.live.setToolTip("Restores the part of the current slice on screen as you pan, zoom or change slice, "
                             "tile by tile from the centre, into one result layer over the image. Tiles seen before "
                             "come from memory. Zoomed far out it waits until the view shows at most 4 million "
                             "full-resolution pixels.")
        if self.supports_live:
            form.addRow("", self.live)

        # rarely changed: folded away, so that the dock leaves the canvas most of the window
        self.more_settings, advanced = folded_form("More settings", "more_settings")
        form.addRow(self.more_settings)
        self.tile = self._spin(advanced, "Tile size", 64, 2048, 256, "tile",
                               "Tiles are fused at every step, so they leave no seams; smaller tiles use less memory.")
        self.tile.setSingleStep(64)
        self.device = QComboBox(objectName="device")
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        advanced.addRow("Device", self.device)
        self.precision = QComboBox(objectName="precision")
        self.precision.addItems(PRECISIONS)
        self.precision.setToolTip("Arithmetic of the network. auto: bfloat16 on CPUs that compute it natively "
                                  "(1.45x as fast, results within a grey level), float32 elsewhere.")
        advanced.addRow("Precision", self.precision)
        self.threshold = QDoubleSpinBox(objectName="threshold", decimals=3, minimum=0.001, maximum=1.0,
                                        singleStep=0.01, value=UNCERTAINTY_THRESHOLD)
        self.threshold.setToolTip("Uncertainty (std, in [0, 1] intensity units) above which pixels are flagged.")
        advanced.addRow("Threshold", self.threshold)
        self.difficulty = QCheckBox("Difficulty map", objectName="difficulty")
        self.difficulty.setToolTip("Add the model's difficulty map (phi): where it expects restoration to be hard.")
        advanced.addRow("", self.difficulty)
        self.zarr_path = QLineEdit(objectName="zarr_path", placeholderText="result.zarr")
        self.zarr_path.setMinimumWidth(60)  # long paths scroll; the dock stays narrow
        browse = QPushButton("…", objectName="browse_zarr")
        browse.clicked.connect(self._choose_zarr_path)
        row = QHBoxLayout()
        row.addWidget(self.zarr_path)
        row.addWidget(browse)
        advanced.addRow("Zarr file", row)
        self.cache_mb = self._spin(advanced, "Live memory", 16, 65536, CACHE_MB, "cache_mb",
                                   "Memory for tiles restored in live mode (least recently seen dropped first).")
        self.cache_mb.setSuffix(" MB")
        self.live_tile = self._spin(advanced, "Live tile", 64, 1024, LIVE_TILE, "live_tile",
                                    "Output pixels per tile in live mode: smaller tiles show sooner, larger ones cost "
                                    "fewer network evaluations per view.")
        self.live_tile.setSingleStep(64)

        self.show_buttons = ShowButtons(self)
        self.content.layout().insertWidget(self.content.layout().indexOf(self.status), self.show_buttons)
        self.live_mode = LiveMode(self, self.cache_mb.value())
        self.cache_mb.valueChanged.connect(self.live_mode.set_cache_mb)
        self.live.toggled.connect(self._toggle_live)
        for control in (self.layer_picker.currentTextChanged, self.model_picker.currentTextChanged,
                        self.samples.valueChanged, self.steps.valueChanged, self.seed.valueChanged,
                        self.device.currentTextChanged, self.precision.currentTextChanged,
                        self.live_tile.valueChanged):
            control.connect(self.live_mode.restart_later)
        self.scope.currentIndexChanged.connect(lambda: self.zarr_path.setEnabled(self.scope.currentData() == "zarr"))
        self.layer_picker.currentTextChanged.connect(self._default_scope)
        self._default_scope()
        compact(self)

    def _toggle_live(self, on: bool) -> None:
        from napari.utils.notifications import show_error

        if not on:
            self.live_mode.stop()
            self.status.setText("Live mode is off.")
            return
        message = self.live_mode.start() if self.supports_live else "This task has no live mode."
        if message:
            self.live.setChecked(False)
            show_error(message)

    def _spin(self, form, label, lo, hi, value, name, tip) -> QSpinBox:
        box = QSpinBox(objectName=name, minimum=lo, maximum=hi, value=value)
        box.setToolTip(tip)
        form.addRow(label, box)
        return box

    @property
    def title(self) -> str:
        return self.task

    # hooks for task widgets
    needs_model = True  # False while a widget trains its own model (self-supervised isotropic reconstruction)
    planewise = True  # planes are restored independently, so one slice can be processed on its own

    def add_task_controls(self, form: QFormLayout) -> None:
        """Add controls specific to the task (e.g. the scale factor)."""

    def make_job(self, data: np.ndarray, model, settings: Settings, norm=None):
        """The task's job on ``data`` (``norm``: the intensity mapping, when ``data`` is part of a larger image)."""
        raise NotImplementedError

    supports_live = True  # the task restores a plane from that plane alone (not isotropic reconstruction)

    def live_scale(self) -> int:
        """How many output pixels per input pixel along y and x."""
        return 1

    def live_key(self) -> tuple:
        """The task's own options that decide the result (e.g. the scale factor)."""
        return ()

    def show_layers(self, image, result, uncertainty) -> None:
        """The layers the Result / Input / Map buttons switch between (the latest result)."""
        self.show_buttons.follow(image, result, uncertainty)

    def output_grid(self, layer) -> tuple[tuple, tuple]:
        """``(scale, translate)`` of the output layers; the input's own for same-size outputs."""
        return tuple(layer.scale), tuple(layer.translate)

    def _default_scope(self, *_) -> None:
        """Lazy (dask/zarr) or big layers start on the current view; loading them whole could exhaust memory."""
        layer = self.layer_picker.layer()
        big = layer is not None and (layer.multiscale or not isinstance(layer.data, np.ndarray)
                                     or layer.data.nbytes > LARGE_LAYER_BYTES)
        self.scope.setCurrentIndex(self.scope.findData("view" if big else "layer"))
        self.zarr_path.setEnabled(self.scope.currentData() == "zarr")

    def _choose_zarr_path(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self, "Save the result as", "", "Zarr (*.zarr)")
        if path:
            self.zarr_path.setText(path if path.endswith(".zarr") else f"{path}.zarr")
            self.scope.setCurrentIndex(self.scope.findData("zarr"))

    def region(self, layer) -> tuple[slice, ...]:
        """The part of the layer's (full-resolution) data to process: all, the current slice or the current view."""
        data = full_resolution(layer)
        region = [slice(None)] * data.ndim
        scope = self.scope.currentData()
        if scope in ("slice", "view") and data.ndim == 3 and self.planewise:
            z = int(np.clip(round(layer.world_to_data(self.viewer.dims.point)[-3]), 0, data.shape[0] - 1))
            region[0] = slice(z, z + 1)
        if scope == "view" and self.viewer.dims.ndisplay == 2:  # in a 3D view: the current slice, whole
            corners = np.asarray(layer.corner_pixels, float)
            if layer.multiscale:
                corners = corners * layer.downsample_factors[layer.data_level]
            for axis in (-2, -1):
                lo, hi = int(max(0, np.floor(corners[0, axis]))), int(np.ceil(corners[1, axis])) + 1
                region[axis] = slice(lo, min(data.shape[axis], max(hi, lo + 1)))
        return tuple(region)

    def settings(self) -> Settings:
        return Settings(samples=self.samples.value(), steps=self.steps.value() or None, seed=self.seed.value(),
                        tile=self.tile.value(), device=self.device.currentText(),
                        precision=self.precision.currentText(), threshold=self.threshold.value(),
                        difficulty=self.difficulty.isChecked())

    def run(self) -> None:
        from napari.utils.notifications import show_error

        if self.worker is not None:
            return  # one run at a time per widget
        layer = self.layer_picker.layer()
        if layer is None:
            show_error("Choose an image layer to process first.")
            return
        if self.needs_model and self.model_picker.currentIndex() < 0:
            show_error(f"No {self.task} model is available.")
            return
        if self.scope.currentData() == "zarr":
            if not self.needs_model:
                show_error("Self-supervised learning needs the volume in memory: run it on the current view (the "
                           "learnt model is saved), then process the whole layer into a Zarr file with that model.")
                return
            self._run_to_zarr(layer)
            return
        region = self.region(layer)
        try:
            job = self.make_job(np.asarray(full_resolution(layer)[region]), self.model_picker.currentData(),
                                self.settings())
        except ValueError as err:
            show_error(str(err))
            return
        self.cancelled_text = type(self).cancelled_text
        self.doing = f"Running {self.task} on {layer.name}…"
        self.status.setText(self.doing)
        start = [s.start or 0 for s in region]
        key = self.run_key(layer, region)
        self.start(job, f"{self.task}: {layer.name}",
                   lambda result, layer=layer: self.on_result(layer, result, start, key))

    def _run_to_zarr(self, layer) -> None:
        """The whole layer, chunk by chunk in this process, into an OME-Zarr store (resumed if unfinished)."""
        from napari.utils.notifications import show_error

        from ..core.chunked import restore_volume

        path = self.zarr_path.text().strip()
        if not path:
            show_error("Choose the Zarr file to write the result to.")
            return
        pixel, unit = pixel_size(layer.scale, layer.metadata, layer.units)
        try:
            settings = self.settings()  # the shared validation (core/limits.py): its sentence, before any work
            task = self.chunked_task(layer)
        except ValueError as err:
            show_error(str(err))
            return
        job = restore_volume(full_resolution(layer), path, task,
                             self.model_picker.currentData(), settings, pixel_size=pixel,
                             unit=unit, scheduler="threads")
        self.cancelled_text = f"Cancelled; finished chunks are kept in {path}: run again to resume."
        self.doing = f"Running {self.task} on {layer.name} into {path}…"
        self.status.setText(self.doing)
        key = self.run_key(layer, path)
        self.start(job, f"{self.task}: {layer.name} → {path}",
                   lambda info, layer=layer: self.on_zarr_result(layer, path, info, key))

    def chunked_task(self, layer):
        """The task of a run into a Zarr file: how its output grid relates to the layer's."""
        from ..core.chunked import ChunkedTask

        out_scale, _ = self.output_grid(layer)
        return ChunkedTask(self.task, max(round(a / b) for a, b in zip(layer.scale, out_scale)))  # x2/x4 in y, x

    def run_key(self, layer, region) -> str:
        """What makes two runs the same: the input, the region (or target file), the model and every setting that
        decides the pixels. A run with the key of an earlier result replaces that result's layers."""
        from ..core.live import settings_key

        return repr((self.task, layer.name, id(layer.data), str(region), self.model_picker.currentData(),
                     settings_key(self.settings()), self.live_key()))

    def on_zarr_result(self, layer, path: str, info: dict, key: str | None = None) -> None:
        """Open the finished store lazily (dask arrays read chunk by chunk) as the usual output layers."""
        import dask.array as da

        from ..core.chunked import map_key
        from ..core.tasks import Restoration

        maps = {name: da.from_zarr(path, component=map_key(name)) for name in ("image", "uncertainty", "difficulty")
                if name in info["maps"]}
        result = Restoration(maps["image"], maps.get("uncertainty"), maps.get("difficulty"), info)
        self.on_result(layer, result, run_key=key)
        self.status.setText(f"{self.status.text()} Saved in {path} (drag it into napari to open it again).")

    def on_progress(self, p) -> None:
        if not self.update_due(last=p.done >= p.total):
            return
        # first: updating napari's progress bar can process the job's end, whose status must win
        self.status.setText(f"{self.doing}\n{p.message}")  # e.g. which gap and slice, or the learning's loss
        super().on_progress(p)

    def on_result(self, layer, result, start=None, run_key: str | None = None) -> None:
        """Add the output layers, named after the input and the task; ``start`` is the region's first input pixel
        (its place in the layer). The layers of an earlier run with the same ``run_key`` are replaced."""
        info = dict(result.info)
        meta = {k: info[k] for k in ("uncertainty_score", "threshold", "reliable", "model", "samples", "steps",
                                     "seed", "software")}
        meta.update(source=layer.name, task=self.task, sampler=info["sampler"], seconds=info["seconds"],
                    device=info["device"], precision=info["precision"], flagged_fraction=info.get("flagged_fraction"),
                    **{k: info[k] for k in ("factor", "section_gap", "regenerated") if k in info})
        if "unit" in layer.metadata:  # nm or pixel, for the writer's pixel size
            meta["unit"] = layer.metadata["unit"]
        scale, translate = self.output_grid(layer)
        if start is not None:
            translate = tuple(t + s * first for t, s, first in zip(translate, layer.scale, start))
        if run_key is not None:
            meta["run_key"] = run_key
        earlier = {old.metadata.get("map", "image"): old for old in self.viewer.layers
                   if run_key is not None and old.metadata.get("run_key") == run_key}
        added = {}
        name = f"{layer.name}_{self.suffix}"
        for data, kwargs, _ in result_layers(name, name, result.image, result.uncertainty, result.difficulty, meta,
                                             info["threshold"], layer.contrast_limits, scale=scale,
                                             translate=translate, units=layer.units, axis_labels=layer.axis_labels):
            kind = kwargs["metadata"].get("map", "image")
            old = earlier.get(kind)
            if old is None:
                added[kind] = self.viewer.add_image(data, **kwargs)
            else:  # the same run again: its own layers take the new result
                old.data, old.metadata = data, kwargs["metadata"]
                old.scale, old.translate = kwargs["scale"], kwargs["translate"]
                added[kind] = old
        self.show_layers(layer, added["image"], added.get("uncertainty"))
        done = f"Done in {info['seconds']:.1f} s ({info['device']}, {info['precision']})"
        if info["reliable"] is None:
            text = f"{done}; {'one sample' if info['samples'] else info['model']}: no uncertainty."
        else:
            flagged = 100 * info["flagged_fraction"]
            text = (f"{done}. {verdict(info['uncertainty_score'], info['threshold'])} "
                    f"({flagged:.2f}% of pixels above {info['threshold']:g}).")
        self.status.setText(" ".join([text, *(f"Note: {n}." for n in info.get("notes", [])), *self.result_notes(info)]))

    def result_notes(self, info: dict) -> list[str]:
        """What the task adds to the status line after a run."""
        return []


class ShowButtons(QWidget):
    """Result / Input / Map: one click shows the restored image (flagged areas in red over it), the input alone, or
    the whole uncertainty map."""

    MODES = ("Result", "Input", "Map")

    def __init__(self, parent=None):
        from qtpy.QtWidgets import QButtonGroup

        super().__init__(parent, objectName="show_buttons")
        self.layers = (None, None, None)
        self.group = QButtonGroup(self)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        for mode in self.MODES:
            button = QPushButton(mode, objectName=f"show_{mode.lower()}", checkable=True)
            button.setToolTip({"Result": "The result, with the areas above the uncertainty threshold in red.",
                               "Input": "The image the result was made from.",
                               "Map": "The whole uncertainty map (red-yellow above the threshold)."}[mode])
            self.group.addButton(button)
            row.addWidget(button)
        self.group.buttons()[0].setChecked(True)
        self.group.buttonClicked.connect(lambda _: self.apply())
        self.setEnabled(False)

    @property
    def mode(self) -> str:
        return self.group.checkedButton().text()

    def set_mode(self, mode: str) -> None:
        self.group.buttons()[self.MODES.index(mode)].setChecked(True)
        self.apply()

    def follow(self, image, result, uncertainty) -> None:
        self.layers = (image, result, uncertainty)
        self.setEnabled(True)
        self.apply()

    def apply(self) -> None:
        from .._layers import style_uncertainty

        image, result, uncertainty = self.layers
        mode = self.mode
        for layer, visible in ((image, True), (result, mode == "Result"), (uncertainty, mode != "Input")):
            if layer is not None and layer.visible != visible:  # each change redraws the canvas
                layer.visible = visible
        if uncertainty is not None:
            style_uncertainty(uncertainty, full=mode == "Map")
