import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_emdiffuse.core.normalize import InputError, Normalizer, check_image


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_round_trip_restores_dtype_and_values(dtype):
    rng = np.random.default_rng(0)
    image = (rng.random((40, 50)) * 200).astype(dtype)
    norm = Normalizer.fit(image)
    back = norm.inverse(norm(image))
    assert back.dtype == image.dtype
    np.testing.assert_allclose(back.astype(float), image.astype(float), atol=1e-3 if image.dtype.kind == "f" else 0)


def test_percentiles_map_to_zero_and_one_and_ignore_outliers():
    image = np.full((100, 100), 100, np.uint16)
    image[:50] = 200
    image[0, 0] = 65535  # a hot pixel must not squash the range
    n = Normalizer.fit(image)(image)
    assert n[60, 0] == pytest.approx(0.0) and n[10, 10] == pytest.approx(1.0)


def test_constant_image_is_accepted():
    image = np.full((8, 8), 7, np.uint8)
    norm = Normalizer.fit(image)
    assert np.array_equal(norm.inverse(norm(image)), image)


@st.composite
def images(draw):
    dtype = np.dtype(draw(st.sampled_from([np.uint8, np.uint16, np.float32])))
    elements = st.floats(width=32, allow_nan=False, allow_infinity=False) if dtype.kind == "f" else None
    return draw(arrays(dtype, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=elements))


@settings(max_examples=80, deadline=None)
@given(images())
def test_round_trip_never_overflows(image):
    norm = Normalizer.fit(image)
    back = norm.inverse(norm(image) * 3 - 1)  # even far outside [0, 1]
    assert back.dtype == image.dtype
    assert np.isfinite(back.astype(np.float64)).all()
    exact = norm.inverse(norm(image))
    if image.dtype.kind == "u":
        np.testing.assert_array_equal(exact, image)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 5)), "empty"),
    (np.zeros((20, 20, 3)), "RGB"),
    (np.zeros((2, 3, 20, 20)), "2D image or a 3D stack"),
    (np.array([[1.0, np.nan]]), "NaN"),
    (np.array([[1.0, np.inf]]), "NaN or infinite"),
    (np.array([["a", "b"]]), "not supported"),
])
def test_bad_images_are_refused_with_a_sentence(bad, message):
    with pytest.raises(InputError, match=message):
        check_image(bad)
