"""Sample data: a synthetic EM-like image with short-dwell SEM noise (real EM data is not shipped)."""

from __future__ import annotations

import numpy as np


def noisy_sem():
    from .core.simulate import SEMNoise, synthetic_em

    clean = synthetic_em((512, 512), seed=1)
    noisy = SEMNoise(electrons=60, read=0.02, correlation_x=0.7, correlation_y=0.5)(clean, np.random.default_rng(1))
    data = np.clip(noisy * 200 + 30, 0, 255).astype(np.uint8)
    return [(data, {"name": "noisy_sem", "metadata": {"source": "synthetic, napari-emdiffuse sample data"}}, "image")]
