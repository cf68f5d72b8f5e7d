"""Fine-tuning and self-supervised isotropic reconstruction from their widgets, in a viewer drawn on screen.

Run by ``test_triton_guard.py`` in a process of its own (a segmentation fault ends only that process):
``python training_in_a_shown_viewer.py DENOISE_MODEL``. Prints one ``state:`` line and ``done`` at the end.
"""

import sys
import time

import numpy as np


def wait_for(widget, app, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while widget.worker is not None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{type(widget).__name__} did not finish in {seconds} s")
        app.processEvents()
        time.sleep(0.02)


def main(denoise_model: str) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_emdiffuse.core.register import shift_image
    from napari_emdiffuse.core.simulate import SEMNoise, synthetic_em, synthetic_volume
    from napari_emdiffuse.core.triton_guard import mesa_llvm_loaded

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer()
    clean = synthetic_em((160, 192), seed=9)
    viewer.add_image(shift_image(clean, (1.5, -2.0)).astype(np.float32), name="slow")
    viewer.add_image(SEMNoise(electrons=20)(clean, np.random.default_rng(0)), name="fast")
    viewer.screenshot(canvas_only=True)  # the canvas is drawn: OpenGL (and with Mesa, its LLVM) is loaded
    print(f"state: mesa_llvm={mesa_llvm_loaded()} triton_loaded={sys.modules.get('triton') is not None}",
          flush=True)

    _, tune = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Fine-tune")
    tune.input_picker.setCurrentText("fast")
    tune.target_picker.setCurrentText("slow")
    tune.base.setCurrentIndex(tune.base.findData(denoise_model))
    tune.minutes.setValue(0.1)
    tune.run_button.click()
    wait_for(tune, app)
    print(f"fine-tune: {tune.status.text()} ({len(tune.plot.points)} loss points)", flush=True)

    import napari_emdiffuse.core.isotropic as isotropic

    isotropic.SELF_SUPERVISED_MIN_MINUTES = 0.1  # this checks that training runs, not what it learns
    volume = (synthetic_volume((12, 48, 96), seed=4) * 200 + 20).astype(np.uint8)  # 48 x columns kept aside
    viewer.add_image(volume, name="sections", scale=(40.0, 10.0, 10.0))
    _, iso = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Isotropic reconstruction")
    iso.layer_picker.setCurrentText("sections")
    iso.mode.setCurrentIndex(iso.mode.findData("self-supervised"))
    iso.minutes.setValue(0.1)
    iso.steps.setValue(2)
    iso.run_button.click()
    wait_for(iso, app)
    print(f"self-supervised: {'sections_isotropic' in viewer.layers}", flush=True)
    viewer.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
