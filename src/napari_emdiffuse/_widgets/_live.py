"""Live mode of a task widget: the region on screen of the current slice, restored as the user looks around.

The planning, the tile cache and the worker's loop are Qt-free (:mod:`..core.live`); this glue turns camera and
slice changes into view requests (throttled) and places what the worker yields in one result layer, plus its
uncertainty map, overlaying the input. The GUI thread never evaluates the network.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
from qtpy.QtCore import QObject
from superqt.utils import qdebounced, qthrottled

from .._layers import map_layer
from ..core.live import Canvas, LiveRestorer, Source, Tile, TileCache, View, ViewDone, plan_view
from ..core.tasks import verdict

VIEW_THROTTLE_MS = 100  # camera events arrive at every frame of a pan; the worker only needs the latest view


CLOSE_WAIT_S = 30  # at most this long for the tile in progress to reach its next network evaluation on closing


def _until_done(job, finished: threading.Event):
    """The worker's generator: ``job``'s events, then ``finished`` set, however it ends."""
    try:
        yield from job
    finally:
        finished.set()


class LiveMode(QObject):
    """Start, follow and stop live restoration for ``widget`` (a :class:`~._common.RestoreWidget`)."""

    def __init__(self, widget, cache_mb: int):
        super().__init__(widget)
        self.widget, self.viewer = widget, widget.viewer
        self.cache = TileCache(cache_mb * 2**20)
        self.restorer = self.worker = self.input = self.signature = self.window = None
        self.finished = threading.Event()  # set when the worker's generator has ended
        self.layer = self.map = None  # the live result and its map, reused from view to view
        self.box = None  # the output-pixel box the live layer covers now
        self.plane = None
        self.request_view = qthrottled(self._request_view_now, timeout=VIEW_THROTTLE_MS, leading=True)
        self.restart_later = qdebounced(self.restart, timeout=300)

    @property
    def active(self) -> bool:
        return self.restorer is not None

    def set_cache_mb(self, mb: int) -> None:
        self.cache.max_bytes = mb * 2**20

    # --- start and stop
    def start(self) -> str | None:
        """Start following the view; a sentence saying why not, or None."""
        from napari.qt.threading import create_worker

        from ..core.models import load_model
        from ..core.tasks import pick_device
        from ._common import full_resolution

        w = self.widget
        layer = w.layer_picker.layer()
        if layer is None:
            return "Choose an image layer first."
        if w.model_picker.currentIndex() < 0:
            return f"No {w.task} model is available."
        data = full_resolution(layer)
        if data.ndim not in (2, 3):
            return "Live mode restores 2D images and the slices of 3D stacks."
        path = w.model_picker.currentData()
        try:
            settings = w.settings()
            device = pick_device(settings.device)
        except ValueError as err:
            return str(err)
        model = functools.cache(lambda: load_model(path, device=device, task=w.task))  # loaded in the worker

        def restore_window(window, settings, norm):
            return w.make_job(window, model(), settings, norm=norm)

        source = Source(data, w.live_scale(), (w.task, path, os.path.getmtime(path), *w.live_key()))
        self.input = layer
        self.signature = self._signature()
        self.restorer = LiveRestorer(source, restore_window, settings, self.cache, tile=w.live_tile.value())
        self.finished = threading.Event()
        self.worker = create_worker(_until_done, self.restorer.run(), self.finished, _start_thread=False)
        self.worker.yielded.connect(self._place)
        self.worker.errored.connect(self._failed)
        self.worker.start()
        for emitter in self._view_events():
            emitter.connect(self.request_view)
        layer.events.data.connect(self.restart_later)
        self.window = w.window()
        self.window.installEventFilter(self)
        self._request_view_now()
        return None

    def stop(self) -> None:
        """Stop all live work now (a tile in progress ends at its next network evaluation); the last view stays."""
        if self.restorer is None:
            return
        for emitter in self._view_events():
            emitter.disconnect(self.request_view)
        self.input.events.data.disconnect(self.restart_later)
        self.window.removeEventFilter(self)
        self.restorer.stop()  # its loop returns within one network evaluation, ending the worker (and `finished`)
        self.restorer = self.worker = None

    def eventFilter(self, watched, event) -> bool:
        """The window closes: stop, and wait for the worker to end (within one network evaluation), so that no
        thread outlives the viewer."""
        from qtpy.QtCore import QEvent

        if event.type() == QEvent.Type.Close and self.active:
            finished = self.finished
            self.widget.live.setChecked(False)  # stops
            finished.wait(CLOSE_WAIT_S)
        return False

    def _signature(self) -> tuple:
        """What live mode restores with: the input, the model, the settings, the task's options."""
        from ..core.live import settings_key

        w = self.widget
        try:
            settings = settings_key(w.settings())
        except ValueError:
            settings = None
        layer = w.layer_picker.layer()
        return (layer, None if layer is None else id(layer.data), w.model_picker.currentData(), settings, w.live_key(),
                w.live_tile.value())

    def _view_events(self) -> tuple:
        """What moves the view: the camera, the slice, the canvas's size, the input's place in the world."""
        cam, dims = camera(self.viewer), self.viewer.dims
        return (cam.events.center, cam.events.zoom, dims.events.current_step, dims.events.ndisplay, dims.events.order,
                self.viewer.canvas.events.size, self.input.events.scale, self.input.events.translate)

    def restart(self, *_) -> None:
        """New settings, model or input: serve the view again (tiles restored before stay cached)."""
        if self.active and self._signature() != self.signature:
            self.stop()
            message = self.start()
            if message:
                self.widget.status.setText(f"Live mode stopped: {message}")

    # --- the view
    def current_view(self) -> tuple[View | None, str]:
        """The output-pixel box on screen of the current slice, or None and why nothing is restored."""
        layer, viewer = self.input, self.viewer
        data_ndim = layer.ndim
        if viewer.dims.ndisplay != 2 or tuple(viewer.dims.displayed)[-2:] != (viewer.dims.ndim - 2,
                                                                               viewer.dims.ndim - 1):
            return None, "Live: paused; it follows the 2D view of y and x."
        height, width = viewer.canvas.size
        cy, cx = camera(viewer).center[-2:]
        zoom = camera(viewer).zoom
        corners = []
        for dy, dx in ((-1, -1), (1, 1)):
            point = list(viewer.dims.point)
            point[-2], point[-1] = cy + dy * height / 2 / zoom, cx + dx * width / 2 / zoom
            corners.append(layer.world_to_data(point))
        corners = np.sort(np.asarray(corners), axis=0)
        plane = None
        if data_ndim == 3:
            plane = int(round(corners[0, 0]))
            if not 0 <= plane < layer.data[0].shape[0] if layer.multiscale else not 0 <= plane < layer.data.shape[0]:
                return None, "Live: the current slice is outside the image."
        box_in = (corners[0, -2] + 0.5, corners[0, -1] + 0.5, corners[1, -2] + 0.5, corners[1, -1] + 0.5)
        box, message = plan_view(box_in, self.restorer.source.in_shape, self.restorer.source.scale)
        return (None if box is None else View(plane, box)), message

    def _request_view_now(self, *_) -> None:
        if self.restorer is None:
            return
        view, message = self.current_view()
        self.widget.status.setText(message)
        self.restorer.request(view)

    # --- placing what the worker yields (GUI thread)
    def _place(self, event) -> None:
        if isinstance(event, Canvas):
            self._show_canvas(event)
        elif isinstance(event, Tile):
            if self.layer is None or event.plane != self.plane or not _inside(event.box, self.box):
                return  # the view has moved on
            y0, x0, y1, x1 = event.box
            at = slice(y0 - self.box[0], y1 - self.box[0]), slice(x0 - self.box[1], x1 - self.box[1])
            self.layer.data[at] = event.image
            self.layer.refresh()
            if self.map is not None and event.uncertainty is not None:
                self.map.data[at] = event.uncertainty
                # shown as flagged areas only, a map of none looks as the zeros it replaces: no redraw (each costs
                # the GUI thread 15-30 ms with software OpenGL)
                flagged = bool((event.uncertainty > self.restorer_threshold()).any())
                if (flagged or self.widget.show_buttons.mode == "Map") and not self._show_map(flagged):
                    self.map.refresh()
        elif isinstance(event, ViewDone):
            restored = f"{event.restored} new tiles" if event.restored else "all tiles from the cache"
            text = f"Live: view restored ({restored})."
            if event.score is not None:
                text += f" {verdict(event.score, self.restorer_threshold())} in this view."
            self.widget.status.setText(text)

    def restorer_threshold(self) -> float:
        return self.widget.threshold.value()

    def _show_canvas(self, canvas: Canvas) -> None:
        w, layer = self.widget, self.input
        scale, translate = w.output_grid(layer)
        scale, translate = tuple(scale[-2:]), tuple(translate[-2:])
        translate = tuple(t + s * b for t, s, b in zip(translate, scale, canvas.box[:2]))
        name = f"{layer.name}_{w.suffix} (live)"
        meta = {"source": layer.name, "task": w.task, "live": True}
        threshold = w.threshold.value()
        added = False
        # only what changes is set: each change redraws the canvas (tens of milliseconds with software OpenGL)
        if self.layer is None or self.layer not in self.viewer.layers:
            self.layer = self.viewer.add_image(canvas.image, name=name, scale=scale, translate=translate,
                                               contrast_limits=layer.contrast_limits, metadata=meta)
            added = True
        else:
            _move(self.layer, translate)
            self.layer.data = canvas.image
        if self.layer.name != name:
            self.layer.name = name
        if self.map is None or self.map not in self.viewer.layers:
            data, kwargs, _ = map_layer(canvas.uncertainty, "uncertainty", f"{name}_uncertainty", meta, threshold,
                                        scale=scale, translate=translate)
            self.map = self.viewer.add_image(data, **kwargs)
            added = True
        else:
            _move(self.map, translate)
            self.map.data = canvas.uncertainty
            if tuple(self.map.contrast_limits) != (0.0, 2 * threshold):
                self.map.contrast_limits = (0.0, 2 * threshold)
        self.box, self.plane = canvas.box, canvas.view.plane
        if added:
            w.show_layers(layer, self.layer, self.map)
        self._show_map(bool((canvas.uncertainty > threshold).any()))

    def _show_map(self, flagged: bool) -> bool:
        """The live map is on screen only when it shows something: whole (Map), or ``flagged`` areas over the result
        (an invisible layer still costs every redraw). Returns whether that changed (and so redrew it)."""
        mode = self.widget.show_buttons.mode
        shown = mode == "Map" or mode == "Result" and flagged
        if self.map.visible == shown:
            return False
        self.map.visible = shown
        return True

    def _failed(self, err: Exception) -> None:
        from napari.utils.notifications import show_error

        self.widget.live.setChecked(False)
        show_error(f"Live {self.widget.task} stopped: {err}")


def _move(layer, translate) -> None:
    if not np.allclose(layer.translate, translate):
        layer.translate = translate


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9 on)."""
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def _inside(box, outer) -> bool:
    return outer is not None and box[0] >= outer[0] and box[1] >= outer[1] and box[2] <= outer[2] and \
        box[3] <= outer[3]
