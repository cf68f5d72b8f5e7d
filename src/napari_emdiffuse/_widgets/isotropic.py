"""The Isotropic reconstruction dock widget (vEMDiffuse-i with a trained model, vEMDiffuse-a self-supervised): any z
factor, bad sections and damaged regions regenerated from their good neighbours."""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel, QLineEdit, QPushButton

from ..core.isotropic import (
    SELF_SUPERVISED_MIN_MINUTES,
    factor_from_voxel,
    isotropic,
    isotropic_self_supervised,
)
from ..core.limits import LIMITS
from ..core.models import dated_name
from ._common import RestoreWidget, folded_form, full_resolution

WITH_MODEL, SELF_SUPERVISED = "model", "self-supervised"
NO_REGIONS = "none"


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
        limit = LIMITS["factor"]
        self.factor = QDoubleSpinBox(objectName="factor", minimum=limit.low, maximum=limit.high, value=4.0,
                                     decimals=2, singleStep=0.5)
        self.factor.setToolTip("R: the sections' spacing over the output's z spacing, whole or not (50 nm sections "
                               "of 4 nm pixels: 12.5 for an isotropic output). The sections stay where they are. "
                               "Follows the layer's scale when it tells, until you set it; 1 only regenerates the "
                               "bad sections.")
        form.addRow("z factor R", self.factor)
        self.model_picker.export_options = lambda: {"factor": self.factor.value()}  # a package's fixed factor
        self.grid = QLabel(objectName="grid")
        self.grid.setToolTip("The output's z spacing, and the sections' spacing in pixels (what the model is told: "
                             "from the layer's scale, or R when the scale does not tell).")
        form.addRow("Output", self.grid)
        self.bad_sections = QLineEdit(objectName="bad_sections", placeholderText="e.g. 12, 40-41")
        self.bad_sections.setToolTip("Lost, folded or cracked sections to regenerate from their good neighbours, "
                                     "counted from 0 as the slider counts them. Find proposes suspects to check.")
        self.find_button = QPushButton("Find", objectName="find_sections")
        self.find_button.setToolTip("Propose sections that look damaged (poor correlation with both neighbours, "
                                    "blank or saturated areas, folds): look at each before you run.")
        self.find_button.clicked.connect(self.find_suspects)
        # for stacks with damaged or misaligned sections: folded away, so that the dock fits napari's default window
        self.sections, sections = folded_form("Sections", "sections")
        row = QHBoxLayout()
        row.addWidget(self.bad_sections)
        row.addWidget(self.find_button)
        sections.addRow("Bad sections", row)
        self.align = QComboBox(objectName="align")
        self.align.addItem("no (already aligned)", None)
        self.align.addItem("shift and rotation", "rigid")
        self.align.addItem("shift, rotation, elastic", "elastic")
        self.align.setToolTip("Align each section to its neighbours before reconstructing; the status says what "
                              "moved. Without it, a stack that looks misaligned gets a note after the run.")
        sections.addRow("Align", self.align)
        self.regions = QComboBox(objectName="damaged_regions")
        self.regions.setToolTip("A labels layer of the image's shape, painted where sections are damaged: only those "
                                "regions are regenerated, the rest of each section is kept.")
        sections.addRow("Damaged regions", self.regions)
        form.addRow(self.sections)
        for change in (self.bad_sections.textChanged, self.align.currentIndexChanged, self.regions.currentIndexChanged):
            change.connect(self._sections_title)
        self.mode.currentIndexChanged.connect(self._mode_changed)
        self._mode_changed()
        self.factor_chosen = False  # once the user sets R, picking layers no longer changes it
        self.factor.valueChanged.connect(lambda: setattr(self, "factor_chosen", True))
        self.factor.valueChanged.connect(self._show_grid)
        self.layer_picker.currentTextChanged.connect(self._factor_from_layer)
        self.layer_picker.currentTextChanged.connect(self._refresh_regions)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_regions)
        self._factor_from_layer()
        self._refresh_regions()

    def regions_layer(self) -> str | None:
        """The labels layer chosen as damaged regions, if any."""
        name = self.regions.currentText()
        return name if name not in (NO_REGIONS, "") and name in self.viewer.layers else None

    def _sections_title(self, *_) -> None:
        """The folded section says when it holds settings, so that none is forgotten there."""
        chosen = [what for what, on in (("bad", self.bad_sections.text().strip()), ("align", self.align.currentData()),
                                        ("regions", self.regions_layer())) if on]
        self.sections.setText("Sections" + (f": {', '.join(chosen)}" if chosen else ""))

    def _factor_from_layer(self, *_) -> None:
        layer = self.layer_picker.layer()
        factor = factor_from_voxel(layer.scale) if layer is not None and layer.ndim == 3 else None
        if factor is not None and not self.factor_chosen:
            self.factor.blockSignals(True)
            self.factor.setValue(min(factor, self.factor.maximum()))  # shown in the box, for the user to change
            self.factor.blockSignals(False)
        self._show_grid()

    def section_gap(self, layer) -> float:
        """The sections' spacing in pixels, what the model is told: the layer's z scale over its pixel size when it
        tells, else R (the output is then isotropic)."""
        return (factor_from_voxel(layer.scale) if layer is not None and layer.ndim == 3 else None) or \
            self.factor.value()

    def _show_grid(self, *_) -> None:
        layer = self.layer_picker.layer()
        if layer is None or layer.ndim != 3:
            self.grid.setText("")
            return
        unit = str(layer.units[-3]) if getattr(layer, "units", None) else ""
        unit = "" if unit in ("pixel", "") else f" {unit.replace('nanometer', 'nm')}"
        factor = self.factor.value()
        self.grid.setText(f"z {layer.scale[-3] / factor:.4g}{unit}, gaps {self.section_gap(layer):g} px")

    def _refresh_regions(self, *_) -> None:
        from napari.layers import Labels

        layer = self.layer_picker.layer()
        current = self.regions.currentText()
        self.regions.clear()
        self.regions.addItem(NO_REGIONS)
        for other in self.viewer.layers:
            if isinstance(other, Labels) and layer is not None and other.data.shape == full_resolution(layer).shape:
                self.regions.addItem(other.name)
        self.regions.setCurrentIndex(max(0, self.regions.findText(current)))

    def find_suspects(self) -> None:
        """Run the detector on the layer: whole damaged sections go into the bad sections' box, local damage into a
        labels layer chosen as the damaged regions (to look at, paint over or erase), with the reasons."""
        from napari.utils.notifications import show_error, show_info

        from ..core.sections import format_sections, suspect_sections

        layer = self.layer_picker.layer()
        if layer is None or layer.ndim != 3:
            show_error("Choose a volume (z, y, x) to look for damaged sections in.")
            return
        data = np.asarray(full_resolution(layer))
        try:
            found = suspect_sections(data)
        except ValueError as err:
            show_error(str(err))
            return
        if not found:
            self.status.setText("No section looks damaged.")
            return
        local = [s for s in found if s.region is not None and not s.region.all()]
        self.bad_sections.setText(format_sections(s.index for s in found if s not in local))
        if local:
            damage = np.zeros(data.shape, np.uint8)
            for suspect in local:
                damage[suspect.index][suspect.region] = 1
            name = f"{layer.name}_suspect_damage"
            if name in self.viewer.layers:
                self.viewer.layers[name].data = damage
            else:
                self.viewer.add_labels(damage, name=name, scale=layer.scale, translate=layer.translate)
            self._refresh_regions()
            self.regions.setCurrentText(name)
        reasons = "; ".join(f"{s.index}: {s.reason}" for s in found)
        self.status.setText(f"Suspect sections (check each before you run): {reasons}.")
        show_info(f"Suspect sections: {format_sections(s.index for s in found)}")

    def _bad(self, layer, data_shape):
        """What to regenerate: the listed sections, and the damaged regions' labels (cropped as the data is)."""
        from ..core.sections import parse_sections

        sections = parse_sections(self.bad_sections.text(), data_shape[0])
        if self.regions_layer() is None:
            return list(sections) or None
        mask = np.asarray(self.viewer.layers[self.regions_layer()].data)[self.region(layer)] != 0
        mask[list(sections)] = True
        return mask

    def _mode_changed(self) -> None:
        learning = self.mode.currentData() == SELF_SUPERVISED
        self.model_picker.setEnabled(not learning)
        self.model_picker.menu_button.setEnabled(not learning)
        for field in (self.minutes, self.form.labelForField(self.minutes)):
            field.setVisible(learning)  # a row only for the self-supervised mode

    @property
    def needs_model(self) -> bool:
        return self.mode.currentData() == WITH_MODEL

    def make_job(self, data, model, settings, norm=None):
        if data.ndim != 3:
            raise ValueError("Isotropic reconstruction needs a volume (z, y, x); this layer is 2D.")
        layer = self.layer_picker.layer()
        factor, gap, bad = self.factor.value(), self.section_gap(layer), self._bad(layer, data.shape)
        align = self.align.currentData()
        if self.mode.currentData() == SELF_SUPERVISED:
            return isotropic_self_supervised(data, factor, self.minutes.value(), settings,
                                             save_as=dated_name(f"self-supervised-R{factor:g}"), gap=gap, bad=bad,
                                             align=align)
        return isotropic(data, model, settings, factor=factor, gap=gap, bad=bad, align=align)

    def chunked_task(self, layer):
        from ..core.chunked import ChunkedTask, check_chunkable
        from ..core.normalize import InputError

        try:
            check_chunkable(self.bad_sections.text().strip() or self.regions_layer(), self.align.currentData())
        except InputError as err:
            raise InputError(f"{err} Process the layer (or the current view) instead of a Zarr file.") from err
        return ChunkedTask(self.task, self.factor.value(), self.section_gap(layer))

    def output_grid(self, layer):
        """R times finer in z over the same extent: acquired slices stay where they were."""
        scale = list(layer.scale)
        scale[-3] /= self.factor.value()
        return tuple(scale), tuple(layer.translate)

    def result_notes(self, info: dict) -> list[str]:
        notes = [f"R = {info['factor']:g}, sections {info['section_gap']:g} pixels apart."] if "factor" in info else []
        return notes + ([f"Regenerated sections {info['regenerated']}."] if info.get("regenerated") else [])
