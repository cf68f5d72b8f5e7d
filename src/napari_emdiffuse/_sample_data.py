"""Sample data: synthetic EM-like images and volumes with realistic noise (real EM data is not shipped)."""

from __future__ import annotations

import numpy as np

SOURCE = "synthetic, napari-emdiffuse sample data"


def noisy_sem():
    from .core.simulate import SEMNoise, synthetic_em

    clean = synthetic_em((512, 512), seed=1)
    noisy = SEMNoise(electrons=60, read=0.02, correlation_x=0.7, correlation_y=0.5)(clean, np.random.default_rng(1))
    data = np.clip(noisy * 200 + 30, 0, 255).astype(np.uint8)
    return [(data, {"name": "noisy_sem", "metadata": {"source": SOURCE}}, "image")]


def low_magnification_sem():
    """A synthetic SEM image recorded at a low magnification: membranes and vesicles only two or three pixels
    across, mild noise. What super-resolution is for; x2 with the bundled model is reliable on it."""
    from .core.simulate import SEMNoise, synthetic_em

    coarse = SEMNoise(electrons=200, read=0.01)(synthetic_em((512, 512), seed=4), np.random.default_rng(4))
    data = np.clip(coarse * 200 + 30, 0, 255).astype(np.uint8)
    return [(data, {"name": "low_magnification_sem", "metadata": {"source": SOURCE}}, "image")]


def anisotropic_volume(factor: int = 4, pixel: float = 10.0):
    """Every ``factor``-th slice of a synthetic isotropic volume (``pixel`` nm voxels, mild FIB-SEM-like noise),
    and, hidden, the whole volume: what isotropic reconstruction should recover."""
    from .core.isotropic import decimate
    from .core.simulate import SEMNoise, synthetic_volume

    rng = np.random.default_rng(2)
    noise = SEMNoise(electrons=400, read=0.01)
    clean = synthetic_volume((15 * factor + 1, 192, 192), seed=2)
    truth = np.stack([np.clip(noise(plane, rng) * 200 + 30, 0, 255) for plane in clean]).astype(np.uint8)
    acquired = decimate(truth, factor)

    def meta(z: float):
        return {"source": SOURCE, "unit": "nm", "pixel_size": (z, pixel, pixel)}

    # the truth first: the last layer added is the selected one, which the task widgets start on
    return [(truth, {"name": "isotropic_truth", "scale": (pixel,) * 3, "units": "nm", "visible": False,
                     "metadata": meta(pixel)}, "image"),
            (acquired, {"name": "anisotropic_volume", "scale": (factor * pixel, pixel, pixel), "units": "nm",
                        "metadata": meta(factor * pixel)}, "image")]
