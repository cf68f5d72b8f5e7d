import numpy as np
import pytest

from napari_emdiffuse.core.simulate import SEMNoise, area_downsample, coarser_voxels, in_detector_range


@pytest.mark.parametrize("inverted", [False, True])
def test_shot_noise_is_largest_where_the_detector_collects_most_electrons(inverted):
    clean = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (256, 1))  # dark on the left, bright on the right
    noisy = SEMNoise(electrons=50, read=0.0, correlation_x=0.0, correlation_y=0.0, inverted=inverted)(
        clean, np.random.default_rng(0))
    residual = noisy - clean
    dark, bright = residual[:, :64].std(), residual[:, -64:].std()
    assert abs(residual.mean()) < 0.01  # noise, not a change of brightness
    assert (dark > 1.5 * bright) if inverted else (bright > 1.5 * dark)


def test_random_levels_cover_both_detector_conventions():
    rng = np.random.default_rng(0)
    draws = [SEMNoise.random(rng) for _ in range(200)]
    assert 60 < sum(d.inverted for d in draws) < 140
    assert min(d.electrons for d in draws) < 25 and max(d.electrons for d in draws) > 250


def test_area_downsampling_averages_blocks_and_crops_the_remainder():
    image = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    small = area_downsample(image, 2)
    assert small.shape == (2, 3)
    assert small[0, 0] == pytest.approx(image[:2, :2].mean())


def test_images_placed_in_part_of_the_detector_range_get_relatively_stronger_noise():
    rng = np.random.default_rng(1)
    clean = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (128, 1))
    placed = [in_detector_range(clean, rng) for _ in range(100)]
    contrasts = np.array([p.max() - p.min() for p in placed])
    assert all(p.min() >= 0 and p.max() <= 1 for p in placed)
    assert contrasts.min() < 0.4 and contrasts.max() > 0.9
    noise = SEMNoise(electrons=50, read=0.0, correlation_x=0.0, correlation_y=0.0)
    narrow = placed[int(np.argmin(contrasts))]
    relative = lambda image: (noise(image, rng) - image).std() / np.ptp(image)  # noqa: E731
    assert relative(narrow) > 1.5 * relative(clean)  # same dose, less contrast: the noise matters more


def test_coarser_voxels_average_the_fine_voxels_they_cover():
    rng = np.random.default_rng(0)
    volume = rng.random((10, 12, 16)).astype(np.float32)
    half = coarser_voxels(volume, 0.5)
    np.testing.assert_allclose(half, volume.reshape(5, 2, 6, 2, 8, 2).mean(axis=(1, 3, 5)), atol=1e-6)
    assert coarser_voxels(volume, 0.7).shape == (7, 8, 11)
    assert coarser_voxels(volume, 0.7).mean() == pytest.approx(volume.mean(), abs=0.02)
