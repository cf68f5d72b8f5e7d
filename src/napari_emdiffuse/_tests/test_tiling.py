import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_emdiffuse.core.tasks import drive
from napari_emdiffuse.core.tiling import NoiseField, TiledDenoiser, pad_to, tile_plan, tile_starts


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 700), st.integers(1, 700), st.sampled_from([32, 64, 128, 256]), st.integers(0, 15))
def test_tiles_cover_everything_with_weights_summing_to_one(h, w, tile, overlap):
    corners, window = tile_plan(h, w, tile, overlap)
    th, tw = window.shape
    total = np.zeros((h, w))
    for y, x in corners:
        assert 0 <= y <= h - th and 0 <= x <= w - tw
        total[y:y + th, x:x + tw] += window
    assert total.min() > 0
    normalised = sum(np.pad(window, ((y, h - th - y), (x, w - tw - x))) for y, x in corners) / total
    np.testing.assert_allclose(normalised, 1.0, rtol=1e-5)


def test_tile_starts_keep_the_overlap():
    starts = tile_starts(1000, 256, 32)
    assert starts[0] == 0 and starts[-1] == 1000 - 256
    assert all(b - a <= 256 - 32 for a, b in zip(starts, starts[1:]))


def test_padding_handles_tiny_images():
    assert pad_to(torch.ones(1, 1, 1, 5), 16, 16).shape == (1, 1, 16, 16)
    assert pad_to(torch.ones(1, 1, 20, 20), 32, 32).shape == (1, 1, 32, 32)


class Blur(torch.nn.Module):
    """A network with a wide receptive field: tiles see different context, so fusion must hide their borders."""

    def forward(self, x, cond, c_noise, label=None):
        k = torch.ones(1, 1, 9, 9) / 81
        return torch.nn.functional.conv2d(cond, k, padding=4), None


def test_fused_tiles_leave_no_seams():
    torch.manual_seed(0)
    cond = torch.randn(1, 1, 200, 300).cumsum(-1) / 20
    x = torch.randn(2, 1, 200, 300)
    whole = drive(TiledDenoiser(Blur(), cond, 512, 0, 4, torch.device("cpu"))(x, 0.5))
    tiled = drive(TiledDenoiser(Blur(), cond, 64, 16, 4, torch.device("cpu"))(x, 0.5))
    # away from the image border, tiles with 16 px of blended overlap match the untiled result
    interior = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert (tiled - whole)[interior].abs().max() < 0.05 * whole.abs().max()


def test_samples_come_in_antithetic_pairs_and_one_sample_keeps_its_noise():
    three = NoiseField(3, 3, 40, 50)()
    assert torch.equal(three[1], -three[0])  # the pair's mean cancels the noise's first-order effect
    assert not torch.equal(three[2], three[0]) and not torch.equal(three[2], -three[0])
    assert torch.equal(NoiseField(3, 1, 40, 50)()[0], three[0])
    assert abs(float(three[2].std()) - 1) < 0.05
