import numpy as np
import pytest
import tifffile

from napari_emdiffuse.cli import main
from napari_emdiffuse.core.io import read_tiff
from napari_emdiffuse.core.normalize import InputError, Normalizer
from napari_emdiffuse.core.simulate import area_downsample
from napari_emdiffuse.core.tasks import Settings, drive, superres, upsample


@pytest.mark.parametrize("scale", [2, 4])
def test_superres_output_is_scale_times_larger_in_input_dtype(tiny_superres, em_pair, scale):
    _, noisy = em_pair
    lr = noisy[:50, :70]
    result = drive(superres(lr, tiny_superres, Settings(steps=2), scale=scale))
    assert result.image.shape == (50 * scale, 70 * scale) and result.image.dtype == np.uint8
    assert result.uncertainty.shape == result.image.shape
    assert result.info["scale"] == scale and "uncertainty_score" in result.info


def test_x4_with_a_x2_model_is_two_x2_steps_with_both_uncertainties(tiny_superres_x2, em_pair):
    _, noisy = em_pair
    lr = noisy[:24, :40]
    progress = []
    result = drive(superres(lr, tiny_superres_x2, Settings(steps=1), scale=4), progress.append)
    first = drive(superres(lr, tiny_superres_x2, Settings(steps=1), scale=2))
    second = drive(superres(first.image, tiny_superres_x2, Settings(steps=1), scale=2, norm=Normalizer.fit(lr)))
    assert np.array_equal(result.image, second.image) and result.image.shape == (96, 160)
    assert result.info["scale"] == 4 and result.info["passes"] == 2
    assert np.all(result.uncertainty >= second.uncertainty - 1e-6)  # the first step's adds in quadrature
    assert result.info["uncertainty_score"] > 0
    dones = [p.done for p in progress]
    assert dones == sorted(dones) and progress[-1].done == progress[-1].total == 100


def test_superres_of_a_stack_works_slice_by_slice(tiny_superres):
    stack = (np.random.default_rng(0).random((3, 20, 30)) * 4000).astype(np.uint16)
    result = drive(superres(stack, tiny_superres, Settings(steps=1, samples=1), scale=2))
    assert result.image.shape == (3, 40, 60) and result.image.dtype == np.uint16


def test_unsupported_scale_factors_are_refused(tiny_superres, tiny_model):
    with pytest.raises(InputError, match="2 or 4"):
        drive(superres(np.zeros((8, 8)), tiny_superres, scale=3))
    with pytest.raises(Exception, match="not a superres model"):
        drive(superres(np.zeros((8, 8)), tiny_model, scale=2))


def test_upsampling_keeps_the_mean_of_each_large_pixel():
    fine = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    coarse = area_downsample(fine, 2)
    assert area_downsample(upsample(coarse, 2), 2) == pytest.approx(coarse, abs=0.15)
    assert upsample(coarse, 4).shape == (128, 128)


def test_cli_superres_divides_the_pixel_size(tmp_path, tiny_superres):
    src, out = tmp_path / "lr.tif", tmp_path / "hr.tif"
    tifffile.imwrite(src, (np.random.default_rng(1).random((30, 40)) * 255).astype(np.uint8), imagej=True,
                     resolution=(1 / 6.6, 1 / 6.6), metadata={"unit": "nm"})
    assert main(["superres", str(src), "-o", str(out), "--scale", "2", "--model", tiny_superres, "--steps", "1"]) == 0
    hr = read_tiff(out)
    assert hr.data.shape == (60, 80) and hr.data.dtype == np.uint8
    assert hr.scale == pytest.approx((3.3, 3.3))


@pytest.mark.slow
def test_bundled_superres_model_beats_bicubic_on_synthetic_em():
    from napari_emdiffuse.core.simulate import SEMNoise, synthetic_em

    clean = synthetic_em((192, 192), seed=4)
    lr = SEMNoise(electrons=150, read=0.01)(area_downsample(clean, 2), np.random.default_rng(0))
    result = drive(superres(lr, None, Settings(), scale=2))
    bicubic = upsample(lr, 2)
    mse = lambda a: np.mean((a - clean) ** 2)  # noqa: E731
    assert mse(result.image) < mse(bicubic)
    lr4 = SEMNoise(electrons=150, read=0.01)(area_downsample(clean, 4), np.random.default_rng(0))
    assert mse(drive(superres(lr4, None, Settings(), scale=4)).image) < mse(upsample(lr4, 4))
