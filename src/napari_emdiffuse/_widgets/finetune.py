"""The Fine-tune dock widget: one click from two selected layers (or one isotropic volume) to a model tuned to a
new tissue."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

from ..core.isotropic import GAPS
from ..core.tasks import SUPERRES_SCALES
from ._common import JobWidget, LayerPicker, ModelPicker, compact, full_resolution, noisiness

if TYPE_CHECKING:
    import napari


class LossPlot(QWidget):
    """The training loss (its running mean; on a log axis when positive, so that a late fall stays visible) and the
    validation PSNR of each checkpoint on a second axis, against the base model's (dashed); no plotting library
    needed. Axis labels sit in margins of their own, never on the curves."""

    LEFT, RIGHT, TOP, BOTTOM = 38, 30, 32, 16  # the title takes two lines: the dock is narrow

    def __init__(self, parent=None):
        super().__init__(parent, objectName="loss_plot")
        self.setMinimumHeight(150)
        self.points: list[tuple[int, float]] = []
        self.validation: list[tuple[int, float]] = []
        self.base: float | None = None

    def add(self, step: int, loss: float) -> None:
        """Record a point; drawn at the next ``update()``."""
        if np.isfinite(loss):
            self.points.append((step, loss))

    def add_validation(self, step: int, psnr: float, base: float) -> None:
        if np.isfinite(psnr):
            self.validation.append((step, psnr))
            self.base = base
            self.update()

    def clear(self) -> None:
        self.points, self.validation, self.base = [], [], None
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), self.palette().base())
        text = self.palette().text().color()
        painter.setPen(text)
        if len(self.points) < 2:
            painter.drawText(self.rect(), Qt.AlignCenter | Qt.TextWordWrap, "training loss and validation PSNR")
            return
        steps, losses = map(np.asarray, zip(*self.points))
        # the first steps' loss is far above the rest: scaled to the bulk, the trend after them stays readable; a
        # loss with a learnt difficulty (a likelihood) can be negative, and then has a linear axis
        log = bool((losses > 0).all())
        logs = np.log10(losses) if log else losses
        lo, hi = np.percentile(logs[len(logs) // 20:], [1, 100])
        lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 0.1 else (lo, hi)
        x0, x1 = self.LEFT, self.width() - self.RIGHT
        y0, y1 = self.TOP, self.height() - self.BOTTOM
        last = max(int(steps[-1]), 1)
        to_x = lambda s: x0 + s / last * (x1 - x0)  # noqa: E731
        to_y = lambda v, a, b: y1 - (np.clip(v, a, b) - a) / max(b - a, 1e-12) * (y1 - y0)  # noqa: E731
        painter.drawRect(x0, y0, x1 - x0, y1 - y0)
        small = painter.font()
        small.setPointSizeF(max(small.pointSizeF() * 0.8, 6))
        painter.setFont(small)
        right_aligned = Qt.AlignRight | Qt.AlignVCenter
        for v in (lo, hi):
            painter.drawText(0, int(to_y(v, lo, hi)) - 8, x0 - 3, 16, right_aligned, f"{10 ** v if log else v:.3g}")
        painter.drawText(x0, y1, x1 - x0, self.BOTTOM, Qt.AlignRight | Qt.AlignBottom, f"step {steps[-1]}")
        painter.drawText(x0, y1, x1 - x0, self.BOTTOM, Qt.AlignLeft | Qt.AlignBottom, "0")
        painter.setPen(QPen(Qt.cyan, 1.5))
        painter.drawText(0, 0, self.width(), self.TOP // 2, Qt.AlignLeft | Qt.AlignVCenter,
                         f"loss {losses[-1]:.4f}{' (log)' if log else ''}")
        painter.drawPolyline(QPolygonF([QPointF(to_x(s), to_y(v, lo, hi)) for s, v in zip(steps, logs)]))
        if not self.validation:
            return
        scores = [v for _, v in self.validation] + [self.base]
        p_lo, p_hi = min(scores) - 0.1, max(scores) + 0.1
        orange = QColor(255, 160, 40)
        painter.setPen(QPen(orange, 1.0, Qt.DashLine))
        painter.drawLine(QPointF(x0, to_y(self.base, p_lo, p_hi)), QPointF(x1, to_y(self.base, p_lo, p_hi)))
        painter.setPen(QPen(orange, 1.5))
        painter.setBrush(orange)
        for s, v in self.validation:
            painter.drawEllipse(QPointF(to_x(s), to_y(v, p_lo, p_hi)), 3, 3)
        left_aligned = Qt.AlignLeft | Qt.AlignVCenter
        for v in (p_lo + 0.1, p_hi - 0.1):
            painter.drawText(x1 + 3, int(to_y(v, p_lo, p_hi)) - 8, self.RIGHT - 3, 16, left_aligned, f"{v:.2f}")
        painter.drawText(0, self.TOP // 2, self.width(), self.TOP // 2, Qt.AlignRight | Qt.AlignVCenter,
                         f"validation {self.validation[-1][1]:.2f} dB, base - -")


# what each task learns from: the input's label, and the hint shown until a run starts
PAIR = ("Input (fast)", "Select the fast and the slow acquisition of one field of view.")
LEARNS_FROM = {
    "denoise": PAIR,
    "superres": PAIR,
    "isotropic": ("Volume", "Select a small isotropic volume of your tissue (e.g. FIB-SEM): the model learns to "
                            "generate the R - 1 slices between every R-th one, along z, y and x."),
}


class FinetuneWidget(JobWidget):
    cancelled_text = "Cancelled; nothing was saved (a model is saved only once judged better than the base)."
    dock_width = 184  # the canvas keeps half of napari's first-run window; the loss plot keeps 100 px of curve

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
        self.factor = QSpinBox(objectName="factor", minimum=int(GAPS[0]), maximum=int(GAPS[1]), value=4)
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
        self.residual_map = QCheckBox("Show misalignment", objectName="residual_map")
        self.residual_map.setToolTip("Add a layer with the misalignment left after registration, per 64-pixel block")
        form.addRow(self.residual_map)
        self.target_brightness = QCheckBox("Target's brightness", objectName="target_brightness")
        self.target_brightness.setToolTip("Off: results keep their input's brightness and contrast (for measuring "
                                          "intensities). On: the tuned model gives the target acquisition's.")
        form.addRow(self.target_brightness)
        self.progress.setMaximum(1000)
        self.plot = LossPlot()
        self.extra.addWidget(self.plot)
        self.task.currentIndexChanged.connect(self._task_changed)
        viewer.layers.selection.events.changed.connect(self.prefill)
        self._task_changed()
        compact(self)

    def _task_changed(self, *_) -> None:
        task = self.task.currentData()
        for field, shown in ((self.scale, task == "superres"), (self.factor, task == "isotropic"),
                             (self.target_picker, task != "isotropic"), (self.residual_map, task != "isotropic"),
                             (self.target_brightness, task != "isotropic")):
            field.setVisible(shown)
            if self.form.labelForField(field) is not None:  # the check box has no label of its own
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
                       scale=self.scale.currentData(), factor=self.factor.value(), minutes=self.minutes.value(),
                       target_brightness=self.target_brightness.isChecked())
        self.plot.clear()
        self.status.setText("Preparing the volume…" if task == "isotropic" else "Registering the pair…")
        self.source = source
        self.start(job, "Fine-tune", self.on_result)

    def on_progress(self, p) -> None:
        from ..core.finetune import ValidationPoint
        from ..core.train import TrainProgress

        if isinstance(p, ValidationPoint):
            self.plot.add_validation(p.step, p.psnr, p.base)
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
        reg = result.registration
        if reg is not None and self.residual_map.isChecked() and reg.residual_map.size:
            self.show_residual_map(reg)
        show_info(result.message)

    def show_residual_map(self, reg) -> None:
        """One pixel per 64-px block of the input, where the registration's crop starts; NaN: too little
        structure to measure."""
        from ..core.register import RESIDUAL_BLOCK

        scale = np.asarray(self.source.scale[-2:], float)
        offset = np.array([reg.crop[0].start, reg.crop[1].start]) + (RESIDUAL_BLOCK - 1) / 2
        self.viewer.add_image(reg.residual_map.astype(np.float32), name=f"{self.source.name} residual (px)",
                              scale=scale * RESIDUAL_BLOCK, translate=np.asarray(self.source.translate[-2:]) + offset
                              * scale, colormap="magma", contrast_limits=(0.0, max(1.0, reg.residual_p95)),
                              opacity=0.6, metadata={"registration": reg.summary()})
