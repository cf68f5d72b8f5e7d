"""Live restoration of what is on screen: tiles on a global grid, restored nearest the centre first, cached.

The view is cut into tiles of ``tile`` output pixels on a grid anchored at the plane's first pixel. Each tile is
restored on its own, as a window reaching ``halo`` pixels beyond it on every side, sampled with ``Settings.origin``
at the window's place in the plane: the noise field (:class:`~.tiling.NoiseField`) is a function of position in
the plane, so the tile equals the same region of a whole-plane run with the same seed up to what the network sees
beyond the halo (and the input's local brightness, which the halo also covers: :func:`live_halo`), and neighbouring
tiles restored at different times join without seams. The halo is cropped.

Restored tiles are kept in a :class:`TileCache` keyed by everything that determines them (the layer's data, the
plane, the tile's place on the grid, the model, the settings, the seed): coming back to a view costs no network
evaluation, and a pan restores only the tiles it uncovers. :class:`LiveRestorer` is the worker's job: it serves the
latest requested view, drops a tile in progress as soon as a newer view no longer shows it, and stops on request.
No Qt here: the widget runs :meth:`LiveRestorer.run` in a thread worker and places what it yields.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass

import numpy as np

from .normalize import Normalizer
from .tasks import BRIGHTNESS_SIGMA, Restoration, Settings, uncertainty_score

LIVE_TILE = 256  # output pixels: one network tile with its halo is cheap enough to show within half a second
LIVE_CONTEXT = 16  # output pixels each side that the network sees beyond a tile; 32 matched a whole-slice run less
# well (bundled denoiser, 512 x 512, K = 2: mean difference 2.1 grey levels against 0.4)


def live_halo(scale: int) -> int:
    """Output pixels restored beyond a tile on each side: the network's context plus two brightness sigmas (the
    result keeps the input's local brightness, a Gaussian average of BRIGHTNESS_SIGMA input pixels, see
    :func:`~.tasks.keep_brightness`; computed on the window alone it differs from the whole plane's near the
    window's edges). Two sigmas matched a whole-slice run as well as four (bundled denoiser, 512 x 512, K = 2: mean
    difference 0.40 against 0.41 grey levels, 99th percentile 2 against 3) and cut a fresh view's time by a tenth
    (2.9 to 2.7 s). A multiple of 4, so that x2 and x4 windows start on input pixels."""
    halo = LIVE_CONTEXT + int(np.ceil(2 * BRIGHTNESS_SIGMA * scale))
    return -(-halo // 4) * 4


MAX_VIEW_PIXELS = 2048 * 2048  # output pixels on screen that live mode restores; further out it waits
CACHE_MB = 512  # default memory for restored tiles


@dataclass(frozen=True)
class View:
    """What is on screen: ``box`` = (y0, x0, y1, x1) in output pixels of plane ``plane`` (None for a 2D layer)."""

    plane: int | None
    box: tuple[int, int, int, int]


def plan_view(box_in: tuple[float, float, float, float], in_shape: tuple[int, int], scale: int,
              max_pixels: int = MAX_VIEW_PIXELS) -> tuple[tuple[int, int, int, int] | None, str]:
    """The output-pixel box live mode restores for the input-pixel box on screen ``box_in`` (y0, x0, y1, x1, may
    reach beyond the plane), and a sentence for the user. None when nothing of the plane is on screen, or when the
    view shows more than ``max_pixels`` output pixels (zoomed far out, where a screen pixel covers several
    full-resolution pixels): then live mode restores nothing and says how far to zoom in."""
    h, w = in_shape[0] * scale, in_shape[1] * scale
    y0, x0 = max(0, int(np.floor(box_in[0] * scale))), max(0, int(np.floor(box_in[1] * scale)))
    y1, x1 = min(h, int(np.ceil(box_in[2] * scale))), min(w, int(np.ceil(box_in[3] * scale)))
    if y1 <= y0 or x1 <= x0:
        return None, "Live: the image is not on screen."
    shown = (y1 - y0) * (x1 - x0)
    if shown > max_pixels:
        zoom = np.sqrt(shown / max_pixels)
        return None, (f"Live: paused, the view shows {x1 - x0} × {y1 - y0} full-resolution output pixels; live mode "
                      f"restores at most {max_pixels / 1e6:.1f} million: zoom in about {zoom:.1f}×.")
    return (y0, x0, y1, x1), f"Live: restoring the {x1 - x0} × {y1 - y0} output pixels on screen."


# missing tiles after the first are restored in aligned blocks of up to BLOCK x BLOCK, one window each: in the real
# viewer (benchmarks/live_latency.py, 2 cores, K = 1) a fresh view took 5.5 s tile by tile, 3.6 s in blocks of 2,
# 2.9 s of 3, 3.6 s of 4 (fewer whole blocks fit a view)
BLOCK = 3


def blocks(positions: list[tuple[int, int]], block: int = BLOCK) -> list[list[tuple[int, int]]]:
    """``positions`` (nearest the centre first) grouped for restoration: the first alone (on screen soonest), the
    rest in aligned ``block`` x ``block`` blocks, each cut into the rectangles its missing tiles fill (a whole
    block, else its rows where their tiles are adjacent, else single tiles), in the order of their nearest tile.
    One window per rectangle restores fewer halo pixels than one per tile (3 x 3 tiles of 256 with a halo of 32:
    0.75 of the pixels) and redraws the canvas once."""
    if not positions:
        return []
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for p in positions[1:]:
        groups.setdefault((p[0] // block, p[1] // block), []).append(p)
    order = {p: i for i, p in enumerate(positions)}
    rectangles = [[positions[0]]]
    for members in groups.values():
        ys, xs = sorted({p[0] for p in members}), sorted({p[1] for p in members})
        if len(members) == len(ys) * len(xs):  # they fill a rectangle
            rectangles.append(sorted(members))
            continue
        for y in ys:  # the block's rows: one window for a row of adjacent tiles
            row = sorted(p for p in members if p[0] == y)
            rectangles.extend([row] if row[-1][1] - row[0][1] == len(row) - 1 else [[p] for p in row])
    return [rectangles[0]] + sorted(rectangles[1:], key=lambda r: min(order[p] for p in r))


def view_tiles(box: tuple[int, int, int, int], tile: int) -> list[tuple[int, int]]:
    """Grid positions (row, column) of the tiles that meet ``box``, nearest the box's centre first."""
    y0, x0, y1, x1 = box
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    tiles = [(ty, tx) for ty in range(y0 // tile, -(-y1 // tile)) for tx in range(x0 // tile, -(-x1 // tile))]
    return sorted(tiles, key=lambda t: ((t[0] + 0.5) * tile - cy) ** 2 + ((t[1] + 0.5) * tile - cx) ** 2)


@dataclass(frozen=True)
class TileGeometry:
    """Where a tile lies in the output plane, the window (with its halo) restored for it, in output and input
    pixels, and the tile's place inside the window."""

    out: tuple[int, int, int, int]  # the tile: y0, x0, y1, x1
    window: tuple[int, int, int, int]  # the window, output pixels
    window_in: tuple[int, int, int, int]  # the window, input pixels

    @property
    def crop(self) -> tuple[slice, slice]:
        (y0, x0, y1, x1), (wy, wx, _, _) = self.out, self.window
        return slice(y0 - wy, y1 - wy), slice(x0 - wx, x1 - wx)


def tile_geometry(position: tuple[int, int], tile: int, halo: int, out_shape: tuple[int, int],
                  scale: int, last: tuple[int, int] | None = None) -> TileGeometry:
    """The geometry of the tile at grid ``position``, or of the block of tiles from ``position`` to ``last``."""
    ty, tx = position
    ly, lx = last or position
    h, w = out_shape
    out = (ty * tile, tx * tile, min(h, (ly + 1) * tile), min(w, (lx + 1) * tile))
    window = (max(0, out[0] - halo), max(0, out[1] - halo), min(h, out[2] + halo), min(w, out[3] + halo))
    return TileGeometry(out, window, tuple(-(-v // scale) if i >= 2 else v // scale for i, v in enumerate(window)))


class TileCache:
    """Restored tiles, least recently used dropped first, within ``max_bytes`` (settable at any time)."""

    def __init__(self, max_bytes: int = CACHE_MB * 2**20):
        self._tiles: OrderedDict[Hashable, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self._max_bytes = max(0, int(value))
        with self._lock:
            self._evict()

    def __len__(self) -> int:
        return len(self._tiles)

    def __contains__(self, key) -> bool:
        return key in self._tiles

    def get(self, key):
        with self._lock:
            value = self._tiles.get(key)
            if value is not None:
                self._tiles.move_to_end(key)
            return value

    def put(self, key, value: tuple) -> None:
        with self._lock:
            if key in self._tiles:
                self.nbytes -= _nbytes(self._tiles.pop(key))
            self._tiles[key] = value
            self.nbytes += _nbytes(value)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()
            self.nbytes = 0

    def _evict(self) -> None:
        while self._tiles and self.nbytes > self._max_bytes:
            self.nbytes -= _nbytes(self._tiles.popitem(last=False)[1])


def _nbytes(value: tuple) -> int:
    return sum(a.nbytes for a in value if a is not None)


_tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_strong_tokens: dict[int, tuple[int, object]] = {}
_counter = itertools.count()


def data_token(data) -> int:
    """A number that stands for this data object as long as it lives (ids of freed objects are reused; these
    numbers are not). Objects without weak references are kept alive by the token."""
    try:
        if data not in _tokens:
            _tokens[data] = next(_counter)
        return _tokens[data]
    except TypeError:
        token, _ = _strong_tokens.setdefault(id(data), (next(_counter), data))
        return token


def settings_key(settings: Settings) -> tuple:
    """What in ``settings`` decides a tile's pixels (not the threshold, nor the tile size of whole-image runs)."""
    return tuple((f.name, getattr(settings, f.name)) for f in dataclasses.fields(settings)
                 if f.name not in ("threshold", "tile", "overlap", "origin"))


@dataclass
class Source:
    """The layer being restored: its full-resolution ``data`` (2D, or 3D with planes along the first axis), the
    task's ``scale`` (1 for denoising), and ``key``: what else decides the result (model, task options)."""

    data: object
    scale: int
    key: Hashable

    def plane(self, index: int | None):
        return self.data if index is None else self.data[index]

    @property
    def in_shape(self) -> tuple[int, int]:
        return tuple(self.data.shape[-2:])


@dataclass
class Canvas:
    """A new view: the output-pixel ``box`` covered by its tiles, filled with the cached tiles and, elsewhere, the
    input brought to the output grid (so the result layer never hides the image); ``missing`` tiles follow."""

    view: View
    box: tuple[int, int, int, int]
    image: np.ndarray
    uncertainty: np.ndarray  # zero where no tile with a map is restored yet
    missing: int


@dataclass
class Tile:
    """Restored tiles (one, or a rectangle of them restored in one window), at ``box`` (output pixels) of
    ``plane``."""

    plane: int | None
    box: tuple[int, int, int, int]
    image: np.ndarray
    uncertainty: np.ndarray | None


@dataclass
class ViewDone:
    """Every tile of ``view`` is on screen; the uncertainty score of what it shows (None without a map)."""

    view: View
    score: float | None
    flagged_fraction: float | None
    restored: int  # tiles that needed the network (the rest came from the cache)


RestoreWindow = Callable[[np.ndarray, Settings, Normalizer], Generator]  # (window, settings, norm) -> a job


class LiveRestorer:
    """Serves the latest view of ``source`` with ``restore_window`` (a core job on one window) and ``settings``.

    ``request(view)`` (any thread) replaces the view to serve; ``request(None)`` pauses; ``stop()`` ends
    :meth:`run`, the worker's generator, within one network evaluation. ``evaluations`` counts the network
    evaluations, for tests and benchmarks.
    """

    def __init__(self, source: Source, restore_window: RestoreWindow, settings: Settings, cache: TileCache,
                 tile: int = LIVE_TILE, halo: int | None = None):
        self.source, self.restore_window, self.settings, self.cache = source, restore_window, settings, cache
        self.tile, self.halo = tile, live_halo(source.scale) if halo is None else halo
        self._key = (data_token(source.data), source.scale, source.key, settings_key(settings), tile, self.halo)
        self._norms: dict[int | None, Normalizer] = {}
        self._changed = threading.Condition()
        self._view: View | None = None
        self._pending = False
        self._stopped = False
        self.evaluations = 0
        self.restored_tiles = 0
        self.gives_uncertainty = False  # known from the first tile

    # --- any thread
    def request(self, view: View | None) -> None:
        with self._changed:
            self._view, self._pending = view, True
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    # --- the worker
    def run(self) -> Generator[Canvas | Tile | ViewDone, None, None]:
        while True:
            with self._changed:
                while not self._pending and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    return
                view, self._pending = self._view, False
            if view is not None:
                yield from self._serve(view)

    def tile_key(self, plane: int | None, position: tuple[int, int]) -> tuple:
        return (*self._key, plane, position)

    def _out_shape(self) -> tuple[int, int]:
        h, w = self.source.in_shape
        return h * self.source.scale, w * self.source.scale

    def _serve(self, view: View) -> Generator:
        positions = view_tiles(view.box, self.tile)
        out_shape = self._out_shape()
        geometries = {p: tile_geometry(p, self.tile, self.halo, out_shape, self.source.scale) for p in positions}
        box = (min(g.out[0] for g in geometries.values()), min(g.out[1] for g in geometries.values()),
               max(g.out[2] for g in geometries.values()), max(g.out[3] for g in geometries.values()))
        image, uncertainty = self._fill(view.plane, box)
        missing = []
        for p in positions:
            cached = self.cache.get(self.tile_key(view.plane, p))
            if cached is None:
                missing.append(p)
            else:
                self.gives_uncertainty = cached[1] is not None
                _paste(image, uncertainty, box, geometries[p].out, *cached)
        yield Canvas(view, box, image.copy(), uncertainty.copy(), len(missing))  # the worker goes on pasting
        restored = 0
        for group in blocks(missing):
            if self._interrupted(view, group):
                return
            tile = self._restore(view.plane, group, view)
            if tile is None:
                return  # a newer view shows none of it, or stopped
            restored += len(group)
            _paste(image, uncertainty, box, tile.box, tile.image, tile.uncertainty)
            yield tile
        if not self.gives_uncertainty:
            yield ViewDone(view, None, None, restored)
            return
        y0, x0, y1, x1 = view.box
        shown = uncertainty[y0 - box[0]:y1 - box[0], x0 - box[1]:x1 - box[1]]
        yield ViewDone(view, uncertainty_score(shown), float((shown > self.settings.threshold).mean()), restored)

    def _interrupted(self, view: View, group: list[tuple[int, int]]) -> bool:
        """Stopped, or a newer view is waiting that shows none of these tiles (one it shows is finished first)."""
        with self._changed:
            if self._stopped:
                return True
            if not self._pending:
                return False
            newer = self._view
        if newer is None or newer.plane != view.plane:
            return True
        return not set(group) & set(view_tiles(newer.box, self.tile))

    def _restore(self, plane: int | None, group: list[tuple[int, int]], view: View) -> Tile | None:
        """Restore a rectangle of tiles in one window; each is cached on its own. None when interrupted (the view
        moved away from them, or live mode stopped)."""
        geometry = tile_geometry(group[0], self.tile, self.halo, self._out_shape(), self.source.scale, group[-1])
        y0, x0, y1, x1 = geometry.window_in
        window = np.asarray(self.source.plane(plane)[y0:y1, x0:x1])
        wy, wx, wy1, wx1 = geometry.window
        settings = dataclasses.replace(self.settings, origin=(wy, wx), tile=max(wy1 - wy, wx1 - wx))
        job = self.restore_window(window, settings, self._norm(plane))
        counted = 0
        try:
            while True:
                try:
                    progress = next(job)
                except StopIteration as stop:
                    result: Restoration = stop.value
                    break
                self.evaluations += max(0, progress.done - counted)  # the job counts evaluations (batches) done
                counted = max(counted, progress.done)
                if self._interrupted(view, group):
                    return None
        finally:
            job.close()
        crop = geometry.crop
        self.gives_uncertainty = result.uncertainty is not None
        image = np.ascontiguousarray(result.image[crop])
        uncertainty = None if result.uncertainty is None else np.ascontiguousarray(result.uncertainty[crop])
        (oy, ox, _, _), out_shape = geometry.out, self._out_shape()
        for position in group:
            ty, tx, ty1, tx1 = tile_geometry(position, self.tile, 0, out_shape, self.source.scale).out
            at = slice(ty - oy, ty1 - oy), slice(tx - ox, tx1 - ox)
            self.cache.put(self.tile_key(plane, position),
                           (image[at].copy(), None if uncertainty is None else uncertainty[at].copy()))
        self.restored_tiles += len(group)
        return Tile(plane, geometry.out, image, uncertainty)

    def _norm(self, plane: int | None) -> Normalizer:
        """The intensity mapping of the plane, as a run on the current slice fits it: every tile shares it."""
        if plane not in self._norms:
            self._norms[plane] = Normalizer.fit(np.asarray(self.source.plane(plane)))
        return self._norms[plane]

    def _fill(self, plane: int | None, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The input under ``box``, repeated onto the output grid, and a zero map."""
        s = self.source.scale
        y0, x0, y1, x1 = box
        region = np.asarray(self.source.plane(plane)[y0 // s:-(-y1 // s), x0 // s:-(-x1 // s)])
        if s > 1:
            region = region.repeat(s, axis=0).repeat(s, axis=1)
        # a copy, always: restored tiles are pasted into it (a view of the plane would write them into the input)
        image = np.array(region[y0 - y0 // s * s:, x0 - x0 // s * s:][:y1 - y0, :x1 - x0], copy=True)
        return image, np.zeros(image.shape, np.float32)


def _paste(image, uncertainty, box, at, tile_image, tile_uncertainty) -> None:
    y0, x0, y1, x1 = at
    where = slice(y0 - box[0], y1 - box[0]), slice(x0 - box[1], x1 - box[1])
    image[where] = tile_image
    if uncertainty is not None and tile_uncertainty is not None:
        uncertainty[where] = tile_uncertainty
