"""Registration of real pairs: shift, rotation, scale and smooth distortion, judged against the known truth."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates

from napari_emdiffuse.core.finetune import prepare_pair
from napari_emdiffuse.core.normalize import InputError
from napari_emdiffuse.core.register import register_pair
from napari_emdiffuse.core.simulate import SEMNoise, area_downsample, synthetic_em

SHAPE, MARGIN = (384, 512), 24


def displacement(shape, shift=(0.0, 0.0), angle=0.0, scale=1.0, elastic=0.0, seed=0):
    """t(p): the slow acquisition shows at p what the fast one shows at p + t(p) (any points (2, ...))."""
    h, w = shape
    centre = np.array([(h - 1) / 2, (w - 1) / 2]).reshape(2, 1)
    turn = np.radians(angle)
    linear = scale * np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]) - np.eye(2)
    field = np.zeros((2, h, w))
    if elastic:
        rng = np.random.default_rng(seed)
        field = np.stack([gaussian_filter(rng.normal(size=(h, w)), 80, mode="wrap") for _ in range(2)])
        field *= elastic / np.hypot(*field).max()

    def at(points):
        flat = points.reshape(2, -1)
        moved = linear @ (flat - centre) + np.reshape(shift, (2, 1))
        moved += np.stack([map_coordinates(f, flat, order=1, mode="nearest") for f in field])
        return moved.reshape(points.shape)

    return at


def misaligned_pair(electrons=30.0, seed=0, **transform):
    big = synthetic_em((SHAPE[0] + 2 * MARGIN, SHAPE[1] + 2 * MARGIN), seed=seed)
    truth = displacement(SHAPE, seed=seed, **transform)
    grid = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(float)
    slow = map_coordinates(big, grid + truth(grid) + MARGIN, order=3, mode="nearest")
    fast = SEMNoise(electrons=electrons)(big[MARGIN:-MARGIN, MARGIN:-MARGIN], np.random.default_rng(seed + 1))
    return fast, slow, truth


def true_residual(reg, truth, block=64):
    """Median and 95th percentile over 64-px blocks of the crop of how far the aligned target still is from the
    input, by the known displacement (not by the registration's own measurement)."""
    field = reg.field.astype(float)
    grid = np.mgrid[0:field.shape[1], 0:field.shape[2]].astype(float)
    error = np.hypot(*(field + truth(grid + field)))[reg.crop]
    rows, cols = error.shape[0] // block, error.shape[1] // block
    blocks = error[:rows * block, :cols * block].reshape(rows, block, cols, block).mean(axis=(1, 3))
    return np.median(blocks), np.percentile(blocks, 95)


@pytest.mark.parametrize("transform", [
    {"shift": (3.0, -2.0)}, {"angle": 0.5}, {"angle": 1.0}, {"scale": 1.005}, {"elastic": 2.0},
    {"shift": (3.0, -2.0), "angle": 0.5, "elastic": 2.0},
], ids=["shift", "rotation 0.5", "rotation 1", "scale", "elastic", "all"])
@pytest.mark.parametrize("electrons", [30.0, 8.0])
def test_real_pairs_are_aligned_to_a_fraction_of_a_pixel(transform, electrons):
    fast, slow, truth = misaligned_pair(electrons, **transform)
    reg = register_pair(fast, slow)
    median, p95 = true_residual(reg, truth)
    assert median <= 0.3 and p95 <= 0.6
    ys, xs = reg.crop
    assert reg.residual_map.shape == ((ys.stop - ys.start) // 64, (xs.stop - xs.start) // 64)
    assert 0 <= reg.residual <= reg.residual_p95 < 1.5 and reg.warning is None
    if "angle" in transform and "elastic" not in transform:
        assert reg.rotation == pytest.approx(-transform["angle"], abs=0.05)  # the target turned back
    assert reg.summary()["residual_px"] == pytest.approx(reg.residual, abs=1e-3)


def test_a_rotated_superres_target_is_aligned_on_its_finer_grid():
    clean = synthetic_em((2 * SHAPE[0] + 4 * MARGIN, 2 * SHAPE[1] + 4 * MARGIN), seed=4)
    fine_shape = (2 * SHAPE[0], 2 * SHAPE[1])
    truth = displacement(fine_shape, shift=(2.0, -3.0), angle=0.5)
    grid = np.mgrid[0:fine_shape[0], 0:fine_shape[1]].astype(float)
    slow = map_coordinates(clean, grid + truth(grid) + 2 * MARGIN, order=3, mode="nearest")
    fine = clean[2 * MARGIN:-2 * MARGIN, 2 * MARGIN:-2 * MARGIN]
    fast = area_downsample(fine, 2) + np.random.default_rng(0).normal(0, 0.03, SHAPE)
    image, aligned, reg = prepare_pair("superres", fast, slow, 2)
    assert aligned.shape == (2 * image.shape[0], 2 * image.shape[1])
    ys, xs = reg.crop
    expected = fine[2 * ys.start:2 * ys.stop, 2 * xs.start:2 * xs.stop]
    # the aligned target is the fine truth, to well within the blur of one fine pixel of misalignment
    one_pixel_off = np.sqrt(np.mean((np.roll(expected, 1, axis=1) - expected)[:, 1:] ** 2))
    assert np.sqrt(np.mean((aligned - expected) ** 2)) < 0.25 * one_pixel_off


def test_a_pair_of_different_fields_is_refused_with_one_sentence():
    fast, _, _ = misaligned_pair(30.0, shift=(3.0, -2.0))
    other = synthetic_em(SHAPE, seed=99)
    with pytest.raises(InputError, match=r"^The two images could not be registered .*same field of view\?$"):
        register_pair(fast, other)


def test_a_pair_that_stays_misaligned_is_reported_and_warned_about():
    fast, slow, _ = misaligned_pair(30.0)
    rng = np.random.default_rng(5)  # a distortion far too local for any smooth field: blocks moved 3 px apart
    jumps = np.kron(rng.integers(-3, 4, size=(SHAPE[0] // 64, SHAPE[1] // 64, 2)), np.ones((64, 64, 1)))
    grid = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(float)
    torn = map_coordinates(slow, grid + jumps.transpose(2, 0, 1), order=1, mode="nearest")
    reg = register_pair(fast, torn)
    assert reg.residual > 1.0 and "still misaligned" in reg.warning
