"""How much the napari window slows a job down: the Isotropic widget on the synthetic sample volume, with the
window shown and hidden (the job itself is the same).

    xvfb-run -a python benchmarks/gui_speed.py              # as users get it
    xvfb-run -a python benchmarks/gui_speed.py --activity   # with napari's Activity dock even in software OpenGL

Reports the seconds of a reconstruction (K = 1) and the learning steps of 30 s of self-supervised learning. Under
Xvfb OpenGL is drawn in software (llvmpipe), as on remote desktops and virtual machines: there every repaint of the
window costs the job time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run(widget) -> tuple[float, list[str]]:
    from qtpy.QtCore import QEventLoop

    messages = []
    loop = QEventLoop()
    started = time.perf_counter()
    widget.run_button.click()
    widget.worker.yielded.connect(lambda p: messages.append(p.message))
    widget.worker.finished.connect(loop.quit)
    loop.exec()
    return time.perf_counter() - started, messages


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activity", action="store_true", help="report in napari's Activity dock regardless")
    parser.add_argument("--out", default="gui_speed.json")
    args = parser.parse_args()
    os.environ["EMDIFFUSE_MODELS_DIR"] = tempfile.mkdtemp()  # the learnt models are not kept
    import napari

    import napari_emdiffuse.core.isotropic as isotropic
    from napari_emdiffuse._widgets import _common

    isotropic.SELF_SUPERVISED_MIN_MINUTES = 0.5  # 30 s of learning measure its speed, not what it learns

    app = napari.qt.get_qapp()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.open_sample("napari-emdiffuse", "anisotropic_volume")
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Isotropic reconstruction")
    widget.samples.setValue(1)
    app.processEvents()
    report = {"software_opengl": _common.software_opengl(), "activity_dock": args.activity}
    if args.activity:
        _common._software_opengl = False
    for window in ("shown", "hidden"):
        if window == "hidden":
            viewer.window._qt_window.hide()
        widget.mode.setCurrentIndex(widget.mode.findData("model"))
        seconds, _ = run(widget)
        widget.mode.setCurrentIndex(widget.mode.findData("self-supervised"))
        widget.minutes.setValue(0.5)
        _, messages = run(widget)
        steps = max(int(m) for m in re.findall(r"step (\d+)", " ".join(messages)))
        report[window] = {"reconstruction_seconds": round(seconds, 1), "learning_steps_in_30_s": steps}
        print(window, report[window], flush=True)
    viewer.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
