"""The Fine-tune dock widget: one click from two selected layers to a model tuned to a new tissue."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QLineEdit, QWidget

from ..core.tasks import SUPERRES_SCALES
from ._common import JobWidget, LayerPicker, ModelPicker, noisiness

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


class FinetuneWidget(JobWidget):
    cancelled_text = "Cancelled; a validated improvement (if any) was saved, nothing else."

    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(viewer, parent)
        form = self.form
        self.task = QComboBox(objectName="task")
        self.task.addItem("Denoise", "denoise")
        self.task.addItem("Super-resolution", "superres")
        form.addRow("Task", self.task)
        self.scale = QComboBox(objectName="scale")
        for factor in SUPERRES_SCALES:
            self.scale.addItem(f"×{factor}", factor)
        form.addRow("Scale", self.scale)
        self.input_picker = LayerPicker(viewer, follow_selection=False)
        self.input_picker.setObjectName("input_picker")
        self.target_picker = LayerPicker(viewer, follow_selection=False)
        self.target_picker.setObjectName("target_picker")
        form.addRow("Input (fast)", self.input_picker)
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
        self.status.setText("Select the fast and the slow acquisition of one field of view.")
        self.task.currentIndexChanged.connect(self._task_changed)
        viewer.layers.selection.events.changed.connect(self.prefill)
        self._task_changed()

    def _task_changed(self, *_) -> None:
        task = self.task.currentData()
        self.scale.setEnabled(task == "superres")
        self.base.set_task(task)
        self.prefill()

    def prefill(self, event=None) -> None:
        """Two selected image layers: the noisier (or, for super-resolution, the smaller) is the input."""
        from napari.layers import Image

        chosen = [layer for layer in self.viewer.layers.selection if isinstance(layer, Image) and not layer.rgb]
        if len(chosen) != 2:
            return
        if self.task.currentData() == "superres":
            chosen.sort(key=lambda layer: np.prod(layer.data.shape))
        else:
            chosen.sort(key=lambda layer: -noisiness(layer.data))
        self.input_picker.setCurrentText(chosen[0].name)
        self.target_picker.setCurrentText(chosen[1].name)

    def run(self) -> None:
        from napari.utils.notifications import show_error

        from ..core.finetune import finetune

        if self.worker is not None:
            return
        source, target = self.input_picker.layer(), self.target_picker.layer()
        if source is None or target is None or source is target:
            show_error("Choose two different image layers: the fast (input) and the slow (target) acquisition.")
            return
        job = finetune(self.task.currentData(), np.asarray(source.data), np.asarray(target.data),
                       base=self.base.currentData(), name=self.name.text().strip() or None,
                       scale=self.scale.currentData(), minutes=self.minutes.value())
        self.plot.clear()
        self.status.setText("Registering the pair…")
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
            self.status.setText(f"Validating ({p.message})…")

    def on_result(self, result) -> None:
        from napari.utils.notifications import show_info

        self.progress.setValue(1000)
        self.status.setText(result.message)
        show_info(result.message)
