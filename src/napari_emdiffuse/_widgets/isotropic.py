"""The Isotropic reconstruction dock widget (vEMDiffuse-i with a trained model, vEMDiffuse-a self-supervised)."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QSpinBox

from ..core.isotropic import (
    FACTORS,
    SELF_SUPERVISED_MIN_MINUTES,
    factor_from_voxel,
    isotropic,
    isotropic_self_supervised,
)
from ..core.models import dated_name
from ._common import RestoreWidget

WITH_MODEL, SELF_SUPERVISED = "model", "self-supervised"


class IsotropicWidget(RestoreWidget):
    task = "isotropic"
    suffix = "isotropic"
    planewise = False  # every output slice needs its acquired neighbours: "current slice" means the whole stack
    supports_live = False  # the same: no slice can be restored from what one view of one slice shows

    def add_task_controls(self, form) -> None:
        self.mode = QComboBox(objectName="mode")
        self.mode.addItem("Use the model above", WITH_MODEL)
        self.mode.addItem("Self-supervised: learn from this volume", SELF_SUPERVISED)
        self.mode.setToolTip("The model above: trained on isotropic data (vEMDiffuse-i: the bundled model, or one fine-tuned "
                             "on an isotropic volume of your tissue in Fine-tune), or learnt before. "
                             "Self-supervised: without isotropic training data, a model learns to interpolate from "
                             "the volume's own finely sampled y and x axes, then fills in z (vEMDiffuse-a); it is "
                             "saved and joins the model picker, for more of the same acquisition.")
        form.addRow("Mode", self.mode)
        self.minutes = QDoubleSpinBox(objectName="train_minutes", minimum=0.1, maximum=600.0, value=10.0,
                                      decimals=1, suffix=" min")
        self.minutes.setToolTip(f"Training time for the self-supervised mode; longer learns more. At least "
                                f"{SELF_SUPERVISED_MIN_MINUTES:g} min on a 2-core CPU: a model that does not beat "
                                "motion-compensated interpolation on columns kept aside is not used.")
        form.addRow("Training time", self.minutes)
        self.factor = QSpinBox(objectName="factor", minimum=FACTORS[0], maximum=FACTORS[-1], value=4)
        self.factor.setToolTip("R: the z spacing divided by the pixel size; R - 1 slices are made between two. "
                               "Follows the layer's scale when it tells, until you set it.")
        form.addRow("z factor R", self.factor)
        self.mode.currentIndexChanged.connect(self._mode_changed)
        self._mode_changed()
        self.factor_chosen = False  # once the user sets R, picking layers no longer changes it
        self.factor.valueChanged.connect(lambda: setattr(self, "factor_chosen", True))
        self.layer_picker.currentTextChanged.connect(self._factor_from_layer)
        self._factor_from_layer()

    def _factor_from_layer(self, *_) -> None:
        layer = self.layer_picker.layer()
        factor = factor_from_voxel(layer.scale) if layer is not None and layer.ndim == 3 else None
        if factor is not None and not self.factor_chosen:
            self.factor.blockSignals(True)
            self.factor.setValue(min(factor, FACTORS[-1]))  # shown in the box, for the user to change
            self.factor.blockSignals(False)

    def _mode_changed(self) -> None:
        learning = self.mode.currentData() == SELF_SUPERVISED
        self.model_picker.setEnabled(not learning)
        self.model_picker.menu_button.setEnabled(not learning)
        self.minutes.setEnabled(learning)

    @property
    def needs_model(self) -> bool:
        return self.mode.currentData() == WITH_MODEL

    def make_job(self, data, model, settings, norm=None):
        if data.ndim != 3:
            raise ValueError("Isotropic reconstruction needs a volume (z, y, x); this layer is 2D.")
        factor = self.factor.value()
        if self.mode.currentData() == SELF_SUPERVISED:
            return isotropic_self_supervised(data, factor, self.minutes.value(), settings,
                                             save_as=dated_name(f"self-supervised-R{factor}"))
        return isotropic(data, model, settings, factor=factor)

    def output_grid(self, layer):
        """R times finer in z over the same extent: acquired slices stay where they were."""
        scale = list(layer.scale)
        scale[-3] /= self.factor.value()
        return tuple(scale), tuple(layer.translate)
