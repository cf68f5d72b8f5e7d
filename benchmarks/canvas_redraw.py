"""What one redraw of napari's canvas costs the GUI thread, by the number of image layers on screen.

Live mode places each restored block by updating its layer, and napari redraws the canvas; with software OpenGL
(Mesa's llvmpipe under Xvfb, remote desktops, virtual machines) the redraw, not our code, is what blocks the GUI
thread. This measures it on an idle machine, in the window size of ``live_latency.py``:

    xvfb-run -a python benchmarks/canvas_redraw.py [--out benchmarks/results/canvas_redraw.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "canvas_redraw.json"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_emdiffuse._layers import map_layer

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1200)
    rng = np.random.default_rng(0)
    image = viewer.add_image(rng.integers(0, 255, (4096, 4096), dtype=np.uint8), name="input")
    live = viewer.add_image(rng.integers(0, 255, (1280, 1280), dtype=np.uint8), name="live")
    data, kwargs, _ = map_layer(np.zeros((1280, 1280), np.float32), "uncertainty", "map", {}, 0.12)
    uncertainty = viewer.add_image(data, **kwargs)

    def settle():
        for _ in range(20):
            app.processEvents()
            time.sleep(0.01)

    settle()
    viewer.scene.camera.zoom, viewer.scene.camera.center = 1.0, (640, 640)
    settle()
    results = {"machine": f"{os.cpu_count()}-core CPU, load average {os.getloadavg()[0]:.1f}, Xvfb, software OpenGL",
               "canvas": list(viewer.canvas.size), "ms_per_redraw": {}}
    for shown, hidden in ((3, []), (2, [uncertainty]), (1, [uncertainty, image])):
        for layer in hidden:
            layer.visible = False
        settle()
        times = []
        for i in range(args.repeats):
            live.data[256 * (i % 4):256 * (i % 4 + 1), :256] = rng.integers(0, 255, (256, 256), dtype=np.uint8)
            started = time.perf_counter()
            live.refresh()  # what live mode does with a block
            app.processEvents()  # the redraw
            times.append(time.perf_counter() - started)
        results["ms_per_redraw"][f"{shown} layers shown"] = round(1000 * float(np.median(times)), 1)
        print(shown, "layers:", results["ms_per_redraw"][f"{shown} layers shown"], "ms", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    viewer.close()


if __name__ == "__main__":
    main()
