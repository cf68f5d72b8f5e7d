"""Live mode's core (Qt-free): the tile grid, the cache, and the worker's loop against whole-slice runs."""

import threading

import numpy as np
import pytest

from napari_emdiffuse.core.live import (
    LIVE_CONTEXT,
    Canvas,
    LiveRestorer,
    Source,
    Tile,
    TileCache,
    View,
    ViewDone,
    blocks,
    data_token,
    live_halo,
    plan_view,
    tile_geometry,
    view_tiles,
)
from napari_emdiffuse.core.tasks import BRIGHTNESS_SIGMA, Settings, denoise, drive, superres


@pytest.mark.parametrize("block", [2, 3])
def test_missing_tiles_are_restored_first_alone_then_in_rectangles_of_aligned_blocks(block):
    positions = view_tiles((0, 0, 6 * 256, 6 * 256), 256)
    groups = blocks(positions, block)
    assert groups[0] == [positions[0]]  # the centre, on screen soonest
    assert sorted(p for g in groups for p in g) == sorted(positions)  # each once
    for group in groups:
        ys, xs = {p[0] for p in group}, {p[1] for p in group}
        assert len(group) == len(ys) * len(xs)  # a rectangle: one window
        assert len({(y // block, x // block) for y, x in group}) == 1  # inside one aligned block
        assert group == sorted(group)  # first and last are the rectangle's corners
    assert sum(len(g) == block * block for g in groups) >= 3  # most in whole blocks
    # two diagonal tiles of a block missing (the others cached): two windows; two adjacent ones: one
    assert blocks([(5, 5), (0, 0), (1, 1)], block) == [[(5, 5)], [(0, 0)], [(1, 1)]]
    assert blocks([(5, 5), (0, 1), (0, 0), (1, 1)], block) == [[(5, 5)], [(0, 0), (0, 1)], [(1, 1)]]


def test_view_tiles_nearest_the_centre_first():
    tiles = view_tiles((100, 100, 700, 700), 256)
    assert set(tiles) == {(y, x) for y in range(3) for x in range(3)}
    assert tiles[0] == (1, 1)  # the centre tile
    assert view_tiles((0, 0, 256, 256), 256) == [(0, 0)]


def test_plan_view_clips_to_the_plane_and_waits_when_zoomed_far_out():
    box, message = plan_view((-10.4, 5.2, 99.6, 80.0), (64, 128), 2)
    assert box == (0, 10, 128, 160) and "restoring" in message
    assert plan_view((200, 200, 300, 300), (64, 64), 1)[0] is None  # off the image
    box, message = plan_view((0, 0, 5000, 5000), (5000, 5000), 1)
    assert box is None and "zoom in about 2.4×" in message


def test_the_live_halo_covers_the_context_and_the_brightness_correction():
    for scale in (1, 2, 4):
        halo = live_halo(scale)
        assert halo >= LIVE_CONTEXT + 2 * BRIGHTNESS_SIGMA * scale and halo % 4 == 0


def test_tile_windows_reach_the_halo_and_start_on_input_pixels():
    g = tile_geometry((1, 2), 256, 32, (1000, 600), 4)
    assert g.out == (256, 512, 512, 600) and g.window == (224, 480, 544, 600)
    assert g.window_in == (56, 120, 136, 150)
    assert g.crop == (slice(32, 288), slice(32, 120))


def test_tile_cache_drops_the_least_recently_used_within_its_memory():
    tile = (np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.float32))  # 500 bytes
    cache = TileCache(max_bytes=1200)
    cache.put("a", tile)
    cache.put("b", tile)
    cache.get("a")
    cache.put("c", tile)
    assert "a" in cache and "c" in cache and "b" not in cache and cache.nbytes == 1000
    cache.max_bytes = 600
    assert len(cache) == 1 and "c" in cache


def test_data_token_follows_the_object_not_its_id():
    a = np.zeros(3)
    assert data_token(a) == data_token(a) != data_token(np.zeros(3))


def serve(restorer, view):
    """Run the worker's loop on one view, as the widget places it: the canvas, then each tile."""
    restorer.request(view)
    canvas, events = None, []
    for event in restorer.run():
        events.append(event)
        if isinstance(event, Canvas):
            canvas = event
        elif isinstance(event, Tile):
            y0, x0, y1, x1 = event.box
            canvas.image[y0 - canvas.box[0]:y1 - canvas.box[0], x0 - canvas.box[1]:x1 - canvas.box[1]] = event.image
        elif isinstance(event, ViewDone):
            restorer.stop()
    return canvas, events


def border_steps(image, tile, axis):
    """Mean absolute step between neighbouring pixels across tile borders, and elsewhere."""
    steps = np.abs(np.diff(image.astype(np.float64), axis=axis))
    at = np.zeros(steps.shape[axis], bool)
    at[tile - 1::tile] = True
    across = steps[at] if axis == 0 else steps[:, at]
    inside = steps[~at] if axis == 0 else steps[:, ~at]
    return across.mean(), inside.mean()


@pytest.mark.parametrize("task", ["denoise", "superres"])
def test_live_tiles_join_without_seams_and_match_a_whole_slice_run(task, em_pair, tiny_model, tiny_superres_x2):
    noisy = em_pair[1]
    settings = Settings(samples=2, seed=5)
    if task == "denoise":
        model, scale = tiny_model, 1
        job = lambda window, s, norm: denoise(window, model, s, norm)  # noqa: E731
    else:
        model, scale = tiny_superres_x2, 2
        job = lambda window, s, norm: superres(window, model, s, 2, norm)  # noqa: E731
    whole = drive(job(noisy, settings, None)).image
    before = noisy.copy()
    restorer = LiveRestorer(Source(noisy, scale, model), job, settings, TileCache(), tile=64)  # the default halo
    h, w = whole.shape
    canvas, events = serve(restorer, View(None, (0, 0, h, w)))
    assert canvas.box == (0, 0, h, w)
    np.testing.assert_array_equal(noisy, before)  # tiles are pasted into the canvas, never into the input
    live = canvas.image
    diff = np.abs(live.astype(np.float64) - whole)
    # the halo covers the network's context and the brightness correction: the whole-slice run's pixels, up to
    # a grey level here and there (measured: mean 0.0006 denoising, 0.001 x2)
    assert diff.mean() < 0.05 and np.percentile(diff, 99) <= 1  # grey levels, of 255
    for axis in (0, 1):
        across, inside = border_steps(live, 64, axis)
        whole_across, _ = border_steps(whole, 64, axis)
        # no seam: steps across tile borders are those anywhere else (within 15 %, or half a grey level)
        assert across - max(inside, whole_across) < max(0.15 * inside, 0.5)
    # centre first and alone, then blocks of tiles; each tile once
    tiles = [e for e in events if isinstance(e, Tile)]
    first = view_tiles((0, 0, h, w), 64)[0]
    assert tiles[0].box == (first[0] * 64, first[1] * 64, (first[0] + 1) * 64, (first[1] + 1) * 64)
    assert sum((b[2] - b[0]) * (b[3] - b[1]) for b in (t.box for t in tiles)) == h * w
    assert restorer.restored_tiles == len(view_tiles((0, 0, h, w), 64)) == events[-1].restored > len(tiles)


def test_coming_back_costs_no_network_evaluation_and_a_pan_restores_only_new_tiles(em_pair, tiny_model):
    noisy = em_pair[1]  # 128 x 160
    job = lambda window, s, norm: denoise(window, tiny_model, s, norm)  # noqa: E731
    cache = TileCache()
    first = LiveRestorer(Source(noisy, 1, "tiny"), job, Settings(samples=1), cache, tile=32, halo=8)
    canvas, _ = serve(first, View(None, (0, 0, 64, 64)))
    assert first.restored_tiles == 4
    again = LiveRestorer(Source(noisy, 1, "tiny"), job, Settings(samples=1), cache, tile=32, halo=8)
    back, events = serve(again, View(None, (0, 0, 64, 64)))
    assert again.evaluations == 0 and isinstance(events[1], ViewDone) and events[1].restored == 0
    np.testing.assert_array_equal(back.image, canvas.image)
    panned = LiveRestorer(Source(noisy, 1, "tiny"), job, Settings(samples=1), cache, tile=32, halo=8)
    serve(panned, View(None, (0, 16, 64, 80)))  # a quarter of the width further: one new column of tiles
    assert panned.restored_tiles == 2
    other_seed = LiveRestorer(Source(noisy, 1, "tiny"), job, Settings(samples=1, seed=1), cache, tile=32, halo=8)
    serve(other_seed, View(None, (0, 0, 64, 64)))
    assert other_seed.restored_tiles == 4  # the seed decides the pixels: not the cached tiles


def test_a_newer_view_drops_the_tile_it_no_longer_shows_and_stop_ends_the_loop(em_pair, tiny_model):
    noisy = em_pair[1]
    started = threading.Event()

    def slow_job(window, settings, norm):
        inner = denoise(window, tiny_model, settings, norm)
        started.set()
        return (yield from inner)

    restorer = LiveRestorer(Source(noisy, 1, "tiny"), slow_job, Settings(samples=1), TileCache(), tile=32, halo=8)
    restorer.request(View(None, (0, 0, 32, 32)))
    loop = restorer.run()
    assert isinstance(next(loop), Canvas)
    restorer.request(View(None, (96, 128, 128, 160)))  # far away, before the first tile is done
    event = next(loop)  # the first tile is dropped; the new view's canvas comes
    assert isinstance(event, Canvas) and event.view.box == (96, 128, 128, 160)
    assert restorer.restored_tiles == 0 and restorer.evaluations <= 1
    restorer.stop()
    assert list(loop) == []
