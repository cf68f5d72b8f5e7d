"""The Fine-tune dock widget: one click from two selected layers (or one isotropic volume) to a model tuned to a
new tissue."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

from ..core.isotropic import FACTORS
from ..core.tasks import SUPERRES_SCALES
from ._common import JobWidget, LayerPicker, ModelPicker, full_resolution, noisiness

if TYPE_CHECKING:
    import napari


class LossPlot(QWidget):
    """The running training loss, drawn as a line (no plotting library needed)."""

    def __init__(self, parent=None):
        super().__init__(parent, objectName="loss_plot")
        self.setMinimumHeight(110)
        self.points: list[tuple[int, float]] = []

    def add(self, step: int, loss: float) -> None:
        """Record a point; drawn at the next ``update()``."""
        if np.isfinite(loss):
            self.points.append((step, loss))

    def clear(self) -> None:
        self.points = []
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), self.palette().base())
        painter.setPen(self.palette().text().color())
        if len(self.points) < 2:
            painter.drawText(self.rect(), Qt.AlignCenter, "training loss")
            return
        steps, losses = zip(*self.points)
        lo, hi = min(losses), max(losses)
        w, h, m = self.width(), self.height(), 6
        to_px = lambda s, v: QPointF(m + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 2 * m),  # noqa: E731
                                     h - m - (v - lo) / max(hi - lo, 1e-12) * (h - 2 * m))
        painter.drawText(m, 14, f"loss {losses[-1]:.4f} (step {steps[-1]})")
        painter.setPen(QPen(Qt.cyan, 1.5))
        painter.drawPolyline(QPolygonF([to_px(s, v) for s, v in self.points]))


# what each task learns from: the input's label, and the hint shown until a run starts
PAIR = ("Input (fast)", "Select the fast and the slow acquisition of one field of view.")
LEARNS_FROM = {
    "denoise": PAIR,
    "superres": PAIR,
    "isotropic": ("Volume", "Select a small isotropic volume of your tissue (e.g. FIB-SEM): the model learns to "
                            "generate the R - 1 slices between every R-th one, along z, y and x."),
}


class FinetuneWidget(JobWidget):
    cancelled_text = "Cancelled; a validated improvement (if any) was saved, nothing else."

    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(viewer, parent)
        form = self.form
        self.task = QComboBox(objectName="task")
        self.task.addItem("Denoise", "denoise")
        self.task.addItem("Super-resolution", "superres")
        self.task.addItem("Isotropic reconstruction", "isotropic")
        form.addRow("Task", self.task)
        self.scale = QComboBox(objectName="scale")
        for factor in SUPERRES_SCALES:
            self.scale.addItem(f"×{factor}", factor)
        form.addRow("Scale", self.scale)
        self.factor = QSpinBox(objectName="factor", minimum=FACTORS[0], maximum=FACTORS[-1], value=4)
        self.factor.setToolTip("R: the z spacing of the volumes to reconstruct over their pixel size")
        form.addRow("z factor R", self.factor)
        self.input_picker = LayerPicker(viewer, follow_selection=False)
        self.input_picker.setObjectName("input_picker")
        self.target_picker = LayerPicker(viewer, follow_selection=False)
        self.target_picker.setObjectName("target_picker")
        form.addRow(PAIR[0], self.input_picker)
        form.addRow("Target (slow)", self.target_picker)
        self.base = ModelPicker("denoise")
        self.base.setObjectName("base_picker")
        form.addRow("Base model", self.base.with_menu())
        self.minutes = QDoubleSpinBox(objectName="minutes", minimum=0.1, maximum=600.0, value=10.0, decimals=1)
        self.minutes.setSuffix(" min")
        form.addRow("Time budget", self.minutes)
        self.name = QLineEdit(objectName="name", placeholderText="automatic")
        form.addRow("Save as", self.name)
        self.progress.setMaximum(1000)
        self.plot = LossPlot()
        self.extra.addWidget(self.plot)
        self.task.currentIndexChanged.connect(self._task_changed)
        viewer.layers.selection.events.changed.connect(self.prefill)
        self._task_changed()

    def _task_changed(self, *_) -> None:
        task = self.task.currentData()
        for field, shown in ((self.scale, task == "superres"), (self.factor, task == "isotropic"),
                             (self.target_picker, task != "isotropic")):
            field.setVisible(shown)
            self.form.labelForField(field).setVisible(shown)
        label, hint = LEARNS_FROM[task]
        self.form.labelForField(self.input_picker).setText(label)
        self.status.setText(hint)
        self.base.set_task(task)
        self.prefill()

    def prefill(self, event=None) -> None:
        """Two selected image layers: the noisier (or, for super-resolution, the smaller) is the input; for
        isotropic reconstruction, the selected volume. Otherwise input and target at least differ."""
        from napari.layers import Image

        chosen = [layer for layer in self.viewer.layers.selection if isinstance(layer, Image) and not layer.rgb]
        task = self.task.currentData()
        if task == "isotropic":
            volumes = [layer for layer in chosen if layer.ndim == 3]
            if len(volumes) == 1:
                self.input_picker.setCurrentText(volumes[0].name)
            return
        if len(chosen) == 2:
            chosen.sort(key=(lambda layer: np.prod(layer.data.shape)) if task == "superres" else
                        (lambda layer: -noisiness(layer.data)))
            self.input_picker.setCurrentText(chosen[0].name)
            self.target_picker.setCurrentText(chosen[1].name)
        elif self.target_picker.currentIndex() == self.input_picker.currentIndex() and self.target_picker.count() > 1:
            self.target_picker.setCurrentIndex(0 if self.input_picker.currentIndex() else 1)

    def run(self) -> None:
        from napari.utils.notifications import show_error

        from ..core.finetune import finetune
        from ..core.isotropic import check_isotropic
        from ..core.normalize import InputError

        if self.worker is not None:
            return
        task, source = self.task.currentData(), self.input_picker.layer()
        target = None if task == "isotropic" else self.target_picker.layer()
        try:
            if task == "isotropic":
                if source is None or source.ndim != 3:
                    raise InputError("Choose a volume (z, y, x) to learn from: a small isotropic block of the "
                                     "tissue.")
                check_isotropic(source.scale)
            elif source is None or target is None or source is target:
                raise InputError("Choose two different image layers: the fast (input) and the slow (target) "
                                 "acquisition.")
        except InputError as error:
            show_error(str(error))
            return
        job = finetune(task, np.asarray(full_resolution(source)),
                       None if target is None else np.asarray(full_resolution(target)),
                       base=self.base.currentData(), name=self.name.text().strip() or None,
                       scale=self.scale.currentData(), factor=self.factor.value(), minutes=self.minutes.value())
        self.plot.clear()
        self.status.setText("Preparing the volume…" if task == "isotropic" else "Registering the pair…")
        self.start(job, "Fine-tune", self.on_result)

    def on_progress(self, p) -> None:
        from ..core.train import TrainProgress

        if isinstance(p, TrainProgress):
            self.plot.add(p.step, p.loss)  # every point, drawn once a second with the rest
            if self.update_due(last=p.fraction >= 1):
                self.plot.update()
                self.status.setText(f"Training: step {p.step}, {p.seconds:.0f} s")  # before the bar: see RestoreWidget
                self.show_progress(int(1000 * p.fraction), 1000, "training")
        elif self.update_due():
            self.status.setText(f"{p.message[0].upper()}{p.message[1:]}…")

    def on_result(self, result) -> None:
        from napari.utils.notifications import show_info

        self.progress.setValue(1000)
        self.status.setText(result.message)
        show_info(result.message)
