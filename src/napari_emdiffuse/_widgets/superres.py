"""The Super-resolution dock widget (EMDiffuse-r): joint denoising and x2/x4 upsampling."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox

from ..core.tasks import SUPERRES_SCALES, superres
from ._common import RestoreWidget


class SuperresWidget(RestoreWidget):
    task = "superres"
    suffix = "superres"

    def add_task_controls(self, form) -> None:
        self.scale = QComboBox(objectName="scale")
        for factor in SUPERRES_SCALES:
            self.scale.addItem(f"×{factor}", factor)
        form.addRow("Scale", self.scale)

        self.scale.currentIndexChanged.connect(lambda: self.live_mode.restart_later())

    def make_job(self, data, model, settings, norm=None):
        return superres(data, model, settings, scale=self.scale.currentData(), norm=norm)

    def live_scale(self) -> int:
        return self.scale.currentData()

    def live_key(self) -> tuple:
        return (self.scale.currentData(),)

    def output_grid(self, layer):
        """Finer pixels over the same extent: the first output pixel's centre sits inside the first input pixel."""
        factor = self.scale.currentData()
        scale = list(layer.scale)
        translate = list(layer.translate)
        for axis in (-2, -1):
            translate[axis] -= scale[axis] * (factor - 1) / (2 * factor)
            scale[axis] /= factor
        return tuple(scale), tuple(translate)
