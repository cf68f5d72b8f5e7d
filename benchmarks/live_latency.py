"""Live mode's latency in the real viewer: from a camera move to the restored 1024 x 1024 view.

Run under Xvfb (software OpenGL, as on remote desktops) with the bundled denoising model:

    xvfb-run -a python benchmarks/live_latency.py [--out benchmarks/results/live_latency.json]

Measures, for K = 1 and K = 2: the time from moving the camera to an unseen place to the first restored tile on
screen and to the whole view; a pan by a quarter of the view (tiles restored vs tiles shown); a return to a
restored view (network evaluations, time); and the longest time the GUI thread was blocked (a 5 ms QTimer
heartbeat: the largest gap between two ticks, minus the interval) while live mode worked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

VIEW = 1024  # image pixels on screen, each way


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "live_latency.json"))
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_emdiffuse._sample_data import noisy_sem
    from napari_emdiffuse._widgets import _live
    from napari_emdiffuse.core.live import LIVE_TILE, Canvas, Tile, ViewDone, live_halo

    events = []
    place = _live.LiveMode._place

    placing = []  # seconds our code spent placing each event (the redraw that follows is napari's)

    def recorded(self, event):
        started = time.perf_counter()
        place(self, event)  # placed first: the time is when the user sees it
        events.append((time.perf_counter(), event))
        placing.append(events[-1][0] - started)

    _live.LiveMode._place = recorded
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    image = np.tile(noisy_sem()[0][0], (8, 8))  # 4096 x 4096: room for unseen places
    viewer.add_image(image, name="noisy_sem_tiled")
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Denoise")
    viewer.window._qt_window.resize(1600, 1200)
    ticks = []
    heartbeat = QTimer(interval=5, timeout=lambda: ticks.append(time.perf_counter()))
    heartbeat.start()

    def pump(until, timeout=args.timeout):
        end = time.perf_counter() + timeout
        while not until() and time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.001)
        if not until():
            raise TimeoutError("live mode did not finish the view")

    for _ in range(50):  # the window settles to its size
        app.processEvents()
        time.sleep(0.01)
    height, width = viewer.canvas.size
    viewer.camera.zoom = min(height, width) / VIEW

    def move(center):
        """Move the camera; return the timings of what live mode did until the view was whole."""
        events.clear()
        ticks.clear()
        placing.clear()
        evaluations = widget.live_mode.restorer.evaluations
        restored = widget.live_mode.restorer.restored_tiles
        t0 = time.perf_counter()
        ticks.append(t0)
        viewer.camera.center = (center[0], center[1])
        pump(lambda: any(isinstance(e, ViewDone) and e.view.box[0] <= center[0] < e.view.box[2]
                         and e.view.box[1] <= center[1] < e.view.box[3] for _, e in events))
        done = [t for t, e in events if isinstance(e, ViewDone)][-1]
        tiles = [t for t, e in events if isinstance(e, Tile)]
        canvas = [e for _, e in events if isinstance(e, Canvas)][-1]
        gaps = np.diff([t for t in ticks if t <= done + 0.05])
        return {
            "view_pixels": [canvas.view.box[2] - canvas.view.box[0], canvas.view.box[3] - canvas.view.box[1]],
            "tiles_in_view": len(_tiles(canvas)),
            "tiles_restored": widget.live_mode.restorer.restored_tiles - restored,
            "network_evaluations": widget.live_mode.restorer.evaluations - evaluations,
            "first_tile_s": round(tiles[0] - t0, 3) if tiles else None,
            "view_s": round(done - t0, 3),
            "gui_blocked_max_ms": round(1000 * (gaps.max() - 0.005), 1) if len(gaps) else None,
            "placements": len(tiles),  # tile events placed: each redraws the canvas
            "placing_max_ms": round(1000 * max(placing), 1) if placing else None,  # our code, without the redraw
        }

    def _tiles(canvas):
        from napari_emdiffuse.core.live import view_tiles

        return view_tiles(canvas.view.box, widget.live_mode.restorer.tile)

    load = os.getloadavg()[0]
    results = {"machine": f"{os.cpu_count()}-core CPU, load average {load:.1f} at the start, Xvfb, software OpenGL",
               "canvas": [height, width],
               "zoom": viewer.camera.zoom, "tile": LIVE_TILE, "halo": live_halo(1)}
    for samples in (1, 2):
        widget.samples.setValue(samples)
        widget.live_mode.cache.clear()
        if not widget.live.isChecked():
            widget.live.setChecked(True)
        else:
            widget.live_mode.restart()
        base = 600 + 1600 * (samples - 1)
        move((base, base))  # warm-up: the model loads, the first evaluations are slow
        fresh = move((base + 1100, base))
        pan = move((base + 1100, base + VIEW / 4))
        back = move((base + 1100, base))
        results[f"K={samples}"] = {"fresh_view": fresh, "quarter_pan": pan, "return": back}
        print(json.dumps(results[f"K={samples}"]), flush=True)
    widget.live.setChecked(False)
    heartbeat.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))
    viewer.close()


if __name__ == "__main__":
    main()
