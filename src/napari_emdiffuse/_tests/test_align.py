import math

import numpy as np
import pytest

from napari_emdiffuse.core.align import (
    WARN_JUMP,
    _distance,
    _matrix,
    _params,
    align_sections,
    misalignment,
)
from napari_emdiffuse.core.normalize import InputError
from napari_emdiffuse.core.register import _affine_field, warp_image
from napari_emdiffuse.core.tasks import Progress, drive


def sections(n=14, side=128, factor=3, seed=0, slant=0.25):
    """An anisotropic stack (float32, 0-1): a smooth random texture made isotropic in 3D, its structures running
    obliquely (``slant`` px per slice in y and x, as tissue's do), every ``factor``-th slice kept."""
    from scipy.ndimage import gaussian_filter, shift

    rng = np.random.default_rng(seed)
    depth = (n - 1) * factor + 1
    pad = int(abs(slant) * depth) + 8
    field = gaussian_filter(rng.normal(size=(depth, side + 2 * pad, side + 2 * pad)), 4.0)
    field = np.tanh(field / field.std() * 1.5)  # sharper edges, like membranes
    planes = [shift(field[z], (slant * z, -slant * z), order=1)[pad:pad + side, pad:pad + side]
              for z in range(0, depth, factor)]
    v = np.stack(planes)
    return ((v - v.min()) / (v.max() - v.min())).astype(np.float32)


def shaken(volume, seed=1, shift=10.0, rotation=1.0):
    """Each section moved by a random rigid transform: the stack and the truth (z, 3, 3), section(T p)."""
    rng = np.random.default_rng(seed)
    truth = np.array([_matrix((math.radians(rng.uniform(-rotation, rotation)), *rng.uniform(-shift, shift, 2)))
                      for _ in volume])
    moved = np.stack([warp_image(s, _affine_field(t[:2] - np.eye(3)[:2], s.shape)) for s, t in zip(volume, truth)])
    return moved.astype(volume.dtype), truth


def detrended(values, degree):
    """``values`` (z, ...) less their least-squares polynomial of ``degree`` along z."""
    z = np.vander(np.linspace(-1, 1, len(values)), degree + 1)
    return values - z @ np.linalg.lstsq(z, values, rcond=None)[0]


def residuals(truth, found, shape, trend=False):
    """Per section, the RMS distance (px) between the found and the true transform over the section's pixels,
    after the one rigid transform that best maps the aligned stack onto the truth's frame (and, with ``trend``, a
    smooth trend along z too, a cubic: no measurement on the stack can tell it from structures' own course), as
    ``benchmarks/section_alignment.py`` measures it."""
    composed = np.array([t @ m for t, m in zip(truth, found)])
    common = _matrix(np.mean([_params(c) for c in composed], axis=0))
    left = np.array([_params(np.linalg.inv(common) @ c) for c in composed])
    return _distance(detrended(left, 3) if trend else left, shape)


@pytest.fixture(scope="module")
def volume():
    return sections()


@pytest.fixture(scope="module")
def shaken_volume(volume):
    # crop the middle: the moved sections' repeated edges are not part of the truth
    moved, truth = shaken(np.pad(volume, ((0, 0), (16, 16), (16, 16)), mode="reflect"))
    return moved[:, 16:-16, 16:-16], truth


@pytest.fixture(scope="module")
def aligned(shaken_volume):
    progress = []
    result = drive(align_sections(shaken_volume[0]), progress.append)
    return result, progress


def test_shifted_and_rotated_sections_are_realigned_within_half_a_pixel(shaken_volume, aligned):
    moved, truth = shaken_volume
    result, progress = aligned
    r = residuals(truth, result.transforms, moved.shape[1:], trend=True)
    assert np.median(r) < 0.5 and r.max() < 1.0, r
    assert result.volume.shape == moved.shape and result.volume.dtype == moved.dtype
    assert all(isinstance(p, Progress) for p in progress) and progress[-1].done == progress[-1].total


def test_the_stack_as_a_whole_does_not_move_and_what_moved_is_reported(shaken_volume, aligned):
    moved, _ = shaken_volume
    result, _ = aligned
    assert np.abs(np.mean([_params(m) for m in result.transforms], axis=0)).max() < 1e-6
    summary = result.summary()
    assert summary["moved"] == len(moved) and summary["shift_max_px"] > 5
    assert result.report().startswith(f"moved {len(moved)} of {len(moved)} sections: median ")
    (y0, y1), (x0, x1) = summary["valid"]
    assert 0 < y0 < y1 < moved.shape[1] and 0 < x0 < x1 < moved.shape[2]


def test_reported_moves_are_how_each_section_moved(volume):
    """Copies of one section, each moved: the structures have no course, so the moves are known exactly (up to a
    steady drift, which the alignment keeps as a course: both are compared without their straight trend)."""
    copies = np.stack([np.pad(volume[0], 16, mode="reflect")] * 8)
    moved, truth = shaken(copies, seed=5)
    result = drive(align_sections(moved[:, 16:-16, 16:-16]))
    # the shake read section(T p): its content moved by T^-1, so the alignment moves it by T
    expected = np.array([_params(t) for t in truth])
    expected = np.column_stack([expected[:, 1], expected[:, 2], np.degrees(expected[:, 0])])
    error = detrended(result.moves, 1) - detrended(expected, 1)
    assert np.abs(error[:, :2]).max() < 0.1 and np.abs(error[:, 2]).max() < 0.03, error


def test_no_drift_along_a_slanted_stack(volume):
    """Oblique structures move between aligned sections: the alignment must not shear the stack after them."""
    result = drive(align_sections(volume))
    assert np.abs(result.moves[:, :2]).max() < 1.0, result.moves
    assert np.median(np.hypot(result.moves[:, 0], result.moves[:, 1])) < 0.3


def test_elastic_correction_improves_a_warped_section(volume):
    warped = volume.copy()
    yy, xx = np.mgrid[0:volume.shape[1], 0:volume.shape[2]]
    bend = np.stack([2.5 * np.sin(2 * np.pi * xx / volume.shape[2]), 2.0 * np.cos(2 * np.pi * yy / volume.shape[1])])
    k = len(volume) // 2
    warped[k] = warp_image(volume[k], bend)
    rigid = drive(align_sections(warped)).volume
    elastic = drive(align_sections(warped, elastic=True))
    inner = (slice(16, -16), slice(16, -16))
    error = lambda v: np.abs(v[k][inner] - volume[k][inner]).mean()  # noqa: E731
    assert error(elastic.volume) < 0.85 * error(rigid)  # measured: about 0.75 (the neighbours' content differs)
    # the bend is up to 2.5 px: about half is found (the end sections, with neighbours on one side only, get up to
    # 2.3 px they should not: a known shortfall); the bent section stands out from the typical one
    assert elastic.elastic is not None and elastic.elastic[k] > max(1.0, 2 * np.median(elastic.elastic))
    assert "elastic correction" in elastic.report()


def test_misalignment_warns_on_a_shifted_stack_not_on_an_aligned_one(volume, shaken_volume):
    calm = misalignment(volume)
    assert calm.warning is None and calm.typical < WARN_JUMP / 2
    few = misalignment(shaken(volume, seed=3, shift=3.0, rotation=0.3)[0])
    assert few.warning is not None and "misaligned" in few.warning
    assert misalignment(shaken_volume[0]).typical > 3
    assert few.motions.shape == (len(volume) - 1, 3)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float64])
def test_integer_and_float_stacks_keep_their_type(volume, dtype):
    top = {np.uint8: 255, np.uint16: 65535, np.float64: 1.0}[dtype]
    stack = volume[:4] * top
    stack = (np.rint(stack) if dtype != np.float64 else stack).astype(dtype)
    moved = shaken(stack.astype(np.float64), shift=3, rotation=0.2)[0]
    moved = np.clip(np.rint(moved), 0, top).astype(dtype) if dtype != np.float64 else moved
    result = drive(align_sections(moved))
    assert result.volume.dtype == dtype and result.volume.shape == moved.shape
    if dtype != np.float64:  # integers are rounded and clipped; floats keep the cubic's small overshoot
        assert result.volume.max() <= top and result.volume.min() >= 0


def test_an_aligned_stack_of_identical_sections_is_left_as_it_is(volume):
    stack = np.stack([volume[0]] * 5)
    result = drive(align_sections(stack))
    assert np.array_equal(result.volume, stack)
    assert result.report().startswith("moved 0 of 5 sections")


@pytest.mark.parametrize("bad, sentence", [
    (np.zeros((64, 64)), "needs a volume"),
    (np.zeros((1, 64, 64)), "at least 2 sections"),
    (np.full((3, 64, 64), np.nan), "NaN"),
    (np.zeros((3, 20, 200)), "too small"),
    (np.zeros((3, 64, 64, 2)), "needs a volume"),
])
def test_bad_stacks_are_refused_with_one_sentence(bad, sentence):
    with pytest.raises(InputError, match=sentence):
        drive(align_sections(bad))
    with pytest.raises(InputError, match=sentence):
        misalignment(bad)

