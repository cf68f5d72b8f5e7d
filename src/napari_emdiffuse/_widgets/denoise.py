"""The Denoise dock widget (EMDiffuse-n)."""

from __future__ import annotations

from ..core.tasks import denoise
from ._common import RestoreWidget


class DenoiseWidget(RestoreWidget):
    task = "denoise"
    suffix = "denoised"

    def make_job(self, data, model, settings, norm=None):
        return denoise(data, model, settings, norm)
