"""README figures, made on synthetic EM-like images (the real EM data must not be committed, not even as crops).

    xvfb-run -a python benchmarks/figures.py docs/

Writes ``denoise_synthetic.png`` (noisy | BM3D | EMDiffuse-n | uncertainty | truth),
``superres_synthetic.png`` (low-res input | bicubic | BM3D+bicubic | EMDiffuse-r | truth),
``isotropic_synthetic_xz.png`` (an XZ plane: every 4th slice acquired | linear | vEMDiffuse-i | vEMDiffuse-a,
learnt from the decimated volume alone in 3 minutes | truth) and ``denoise_widget.png`` (a screenshot of napari
with the Denoise widget and its result). ``--only isotropic`` (etc.) makes one of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import bm3d, psnr, to_uint8, tune  # noqa: E402

from napari_emdiffuse.core.isotropic import decimate, interpolate, isotropic, self_supervised  # noqa: E402
from napari_emdiffuse.core.simulate import SEMNoise, area_downsample, synthetic_em, synthetic_volume  # noqa: E402
from napari_emdiffuse.core.tasks import Settings, denoise, drive, superres, upsample  # noqa: E402


def save(path: Path, panels: list[np.ndarray]) -> None:
    from skimage.io import imsave

    gap = np.full((panels[0].shape[0], 4), 255, np.uint8)
    row = [p for panel in panels for p in (panel, gap)][:-1]
    imsave(path, np.concatenate(row, axis=1), check_contrast=False)
    print("wrote", path)


def heat(uncertainty: np.ndarray, threshold: float = 0.12) -> np.ndarray:
    return to_uint8(np.clip(uncertainty / (2 * threshold), 0, 1) * 255)


def screenshot(path: Path) -> None:
    import napari
    from napari.settings import get_settings

    from napari_emdiffuse._sample_data import noisy_sem

    get_settings().application.first_time = True  # the window at the size napari gives a new user
    viewer = napari.Viewer(show=True)
    data, kwargs, _ = noisy_sem()[0]
    viewer.add_image(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Denoise")
    widget.run_button.click()
    while widget.worker is not None:
        napari.qt.get_qapp().processEvents()
    for _ in range(20):
        napari.qt.get_qapp().processEvents()
    canvas, window = viewer.window._qt_viewer.canvas.native.width(), viewer.window._qt_window.width()
    print(f"canvas {canvas} of {window} px")
    viewer.screenshot(path, canvas_only=False)
    print("wrote", path)
    viewer.close()


def denoise_figure(out: Path, rng) -> None:
    clean = synthetic_em((256, 256), seed=21)
    noisy = to_uint8(SEMNoise(electrons=40, read=0.02, correlation_x=0.7)(clean, rng) * 200 + 30)
    truth = to_uint8(clean * 200 + 30)
    result = drive(denoise(noisy, None, Settings()))
    classical = bm3d(noisy, tune("bm3d", noisy, truth))
    print(f"denoise: noisy {psnr(noisy, truth):.2f} dB, BM3D {psnr(classical, truth):.2f} dB, "
          f"EMDiffuse {psnr(result.image, truth):.2f} dB")
    save(out / "denoise_synthetic.png", [noisy, classical, result.image, heat(result.uncertainty), truth])


def superres_figure(out: Path, rng) -> None:
    clean = synthetic_em((384, 384), seed=22)
    lr = to_uint8(SEMNoise(electrons=60, read=0.02, blur=0.4)(area_downsample(clean, 2), rng) * 200 + 30)
    truth = to_uint8(clean * 200 + 30)[96:352, 96:352]
    result = drive(superres(lr, None, Settings(), scale=2))
    cubic = to_uint8(upsample(lr.astype(np.float32), 2))
    sigma = max([0.02, 0.04, 0.06, 0.09], key=lambda s: psnr(to_uint8(upsample(bm3d(lr, s).astype(np.float32), 2)),
                                                          to_uint8(clean * 200 + 30)))
    classical = to_uint8(upsample(bm3d(lr, sigma).astype(np.float32), 2))
    crop = (slice(96, 352), slice(96, 352))
    nearest = np.kron(lr, np.ones((2, 2), np.uint8))
    print(f"superres x2: bicubic {psnr(cubic[crop], truth):.2f} dB, BM3D+bicubic {psnr(classical[crop], truth):.2f} dB,"
          f" EMDiffuse {psnr(result.image[crop], truth):.2f} dB")
    save(out / "superres_synthetic.png", [nearest[crop], cubic[crop], classical[crop], result.image[crop], truth])


def isotropic_figure(out: Path, factor: int = 4) -> None:
    truth = to_uint8(synthetic_volume((61, 128, 128), seed=5) * 200 + 30)
    kept = decimate(truth, factor)
    linear = to_uint8(interpolate(kept, factor))
    trained = drive(isotropic(kept, None, Settings(), factor=factor)).image
    learnt = drive(self_supervised(kept, factor, minutes=3.0))
    self_taught = drive(isotropic(kept, learnt, Settings(), factor=factor)).image
    print("isotropic (XZ figure): " + ", ".join(f"{name} {psnr(v[1::2], truth[1::2]):.2f} dB" for name, v in
                                                 [("linear", linear), ("vEMDiffuse-i", trained),
                                                  ("vEMDiffuse-a", self_taught)]))
    xz = lambda v: np.kron(v[:, 64, :], np.ones((2, 2), np.uint8))  # noqa: E731  enlarged for the page
    acquired = np.repeat(kept, factor, axis=0)[: len(truth)]
    save(out / "isotropic_synthetic_xz.png", [xz(v) for v in (acquired, linear, trained, self_taught, truth)])


FIGURES = {"denoise": denoise_figure, "superres": superres_figure,
           "isotropic": lambda out, rng: isotropic_figure(out)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs"))
    parser.add_argument("--only", choices=["denoise", "superres", "isotropic", "screenshot"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, make in FIGURES.items():
        if args.only in (None, name):
            make(args.out, rng)
    if args.only in (None, "screenshot"):
        screenshot(args.out / "denoise_widget.png")


if __name__ == "__main__":
    main()
