import numpy as np
import pytest
import torch

from napari_emdiffuse.core.isotropic import (
    LABELS,
    REGION_MARGIN,
    decimate,
    factor_from_voxel,
    flicker,
    interpolate,
    interpolation_batches,
    isotropic,
    label_of,
    lateral_truth,
    oriented,
    output_slices,
    plan_planes,
    sees_start,
    self_supervised,
    split_aside,
)
from napari_emdiffuse.core.normalize import InputError
from napari_emdiffuse.core.tasks import Settings, drive


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    return (rng.random((4, 24, 40)) * 200 + 20).astype(np.uint8)


def test_every_factor_and_slice_has_its_own_label():
    assert len(LABELS) == sum(r - 1 for r in range(2, 11)) == len(set(LABELS.values()))
    assert label_of(4, 1) in LABELS and label_of(10, 9) in LABELS and label_of(4, 4) not in LABELS


def test_linear_interpolation_keeps_acquired_slices_and_blends_between():
    kept = np.stack([np.full((2, 3), v, np.float32) for v in (0, 8, 4)])
    out = interpolate(kept, 4)
    assert out.shape == (9, 2, 3)
    assert out[:, 0, 0].tolist() == [0, 2, 4, 6, 8, 7, 6, 5, 4]
    assert np.array_equal(decimate(out, 4), kept)


def test_motion_interpolation_follows_structures_that_move_between_slices():
    from scipy.ndimage import gaussian_filter, shift

    rng = np.random.default_rng(0)
    texture = gaussian_filter(rng.random((256, 256)), 2).astype(np.float32)  # room for the widest window (flow.RADII)
    # a structure drifting 1.5 px in y and -1 px in x per slice: slices 0 and 4 are kept, 1-3 are the truth
    stack = np.stack([shift(texture, (1.5 * z, -1.0 * z), mode="wrap") for z in range(5)])
    inner = (slice(20, -20), slice(20, -20))
    for factor, start in ((4, "linear"), (4, "motion")):
        out = interpolate(stack[::4], factor, start)
        assert np.array_equal(out[::4], stack[::4])
        errors = [np.abs(out[z][inner] - stack[z][inner]).mean() for z in (1, 2, 3)]
        if start == "linear":
            linear_error = max(errors)
        else:  # following the motion recovers the moved texture; averaging across it only blurs it
            assert max(errors) < 0.1 * linear_error


def test_motion_interpolation_is_the_same_from_either_side():
    from napari_emdiffuse.core.flow import motion_interpolation

    rng = np.random.default_rng(2)
    below, above = rng.random((2, 48, 64)).astype(np.float32)
    fractions = np.array([0.25, 0.5, 0.75])
    np.testing.assert_allclose(motion_interpolation(below, above, fractions),
                               motion_interpolation(above, below, 1 - fractions), atol=1e-5)


def test_flicker_is_the_mean_step_between_slices():
    assert flicker(np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 3, 3))) == pytest.approx(1.0)


@pytest.mark.parametrize("factor", [2, 4])
def test_reconstruction_keeps_acquired_slices_and_fills_the_gaps(tiny_isotropic, volume, factor):
    result = drive(isotropic(volume, tiny_isotropic, Settings(steps=2), factor=factor))
    assert result.image.shape == ((4 - 1) * factor + 1, 24, 40) and result.image.dtype == np.uint8
    assert np.array_equal(result.image[::factor], volume)  # the acquisition is kept exactly
    unc = result.uncertainty
    assert unc.shape == result.image.shape and not unc[::factor].any() and (unc[1::factor] > 0).all()
    assert result.info["factor"] == factor and "uncertainty_score" in result.info


def test_same_seed_same_volume_and_noise_is_shared_along_z(tiny_isotropic, volume):
    run = lambda seed: drive(isotropic(volume, tiny_isotropic, Settings(steps=2, seed=seed), factor=3))  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)


def test_positions_a_model_does_not_serve_are_refused_with_a_sentence(tiny_isotropic, tiny_isotropic_labels,
                                                                      tiny_model, volume, models_dir):
    from napari_emdiffuse._tests.conftest import make_tiny_model

    with pytest.raises(InputError, match="whole z factors only \\(2 to 10\\), not a slice 0.09 of the way between "
                                         "sections 11 pixels apart"):
        drive(isotropic(volume, tiny_isotropic_labels, factor=11))
    with pytest.raises(InputError, match="whole z factors only"):
        drive(isotropic(volume, tiny_isotropic_labels, factor=2.5))
    with pytest.raises(InputError, match="between sections 1 to 32 pixels apart, not a slice 0.50 of the way between "
                                         "sections 40 pixels apart"):
        drive(isotropic(volume, tiny_isotropic, factor=2, gap=40))
    with pytest.raises(InputError, match="The z factor R must be a number from 1 to 32, not 33"):
        drive(isotropic(volume, tiny_isotropic, factor=33))
    with pytest.raises(InputError, match="nothing to generate"):
        drive(isotropic(volume, tiny_isotropic, factor=1))
    with pytest.raises(Exception, match="not a isotropic model|not an isotropic model"):
        drive(isotropic(volume, tiny_model, factor=4))
    only4 = make_tiny_model(models_dir, "isotropic", "only4", labels={f"4:{j}": LABELS[f"4:{j}"] for j in (1, 2, 3)})
    with pytest.raises(InputError, match="whole z factors only \\(4\\)"):
        drive(isotropic(volume, only4, factor=6))
    with pytest.raises(InputError, match="at least 2 slices"):
        drive(isotropic(volume[:1], tiny_isotropic, factor=4))


def test_planes_lie_at_their_positions_and_sections_stay_where_they_were():
    planes = plan_planes(4, 2.5)  # sections at 0, 2.5, 5, 7.5 output planes
    assert len(planes) == output_slices(4, 2.5) == 8
    assert [(p.index, p.below) for p in planes if p.acquired] == [(0, 0), (5, 2)]
    fractions = {p.index: (p.below, p.above, round(p.fraction, 6)) for p in planes if not p.acquired}
    assert fractions[1] == (0, 1, 0.4) and fractions[3] == (1, 2, 0.2) and fractions[7] == (2, 3, 0.8)
    # bad sections are never used: planes at or near them come from the nearest good ones
    repaired = plan_planes(6, 1, bad=(2, 3))
    assert [(p.below, p.above, round(p.fraction, 6), p.section) for p in repaired if not p.acquired] == [
        (1, 4, round(1 / 3, 6), 2), (1, 4, round(2 / 3, 6), 3)]
    assert [p.section for p in plan_planes(4, 2.5) if not p.acquired] == [None] * 6


@pytest.mark.parametrize(("factor", "gap"), [(2.5, None), (12.5, None), (6.25, 12.5)])
def test_a_factor_that_is_not_whole_keeps_the_sections_on_the_grid_exactly(tiny_isotropic, volume, factor, gap):
    result = drive(isotropic(volume, tiny_isotropic, Settings(steps=1, samples=2), factor=factor, gap=gap))
    assert len(result.image) == int(3 * factor + 1e-6) + 1
    for z in range(4):  # every section that falls on the output grid is copied, with no uncertainty
        k = z * factor
        if k == int(k):
            assert np.array_equal(result.image[int(k)], volume[z]) and not result.uncertainty[int(k)].any()
    assert result.info["factor"] == factor and result.info["section_gap"] == (gap or factor)
    assert np.isfinite(result.info["uncertainty_score"])


def test_bad_sections_are_regenerated_from_their_good_neighbours(tiny_isotropic, models_dir):
    rng = np.random.default_rng(5)
    volume = (rng.random((6, 32, 32)) * 200 + 20).astype(np.uint8)
    result = drive(isotropic(volume, tiny_isotropic, Settings(steps=1, samples=2), factor=1, gap=3, bad=[2, 3]))
    assert result.image.shape == volume.shape and result.info["regenerated"] == "2-3"
    kept = [0, 1, 4, 5]
    assert np.array_equal(result.image[kept], volume[kept]) and not result.uncertainty[kept].any()
    assert all(not np.array_equal(result.image[z], volume[z]) and result.uncertainty[z].all() for z in (2, 3))
    # with a factor too: the planes around a bad section are generated across it, 2 gaps wide
    twice = drive(isotropic(volume, tiny_isotropic, Settings(steps=1, samples=2), factor=2, gap=3, bad=[2]))
    assert len(twice.image) == 11 and not np.array_equal(twice.image[4], volume[2])
    assert np.array_equal(twice.image[[0, 2, 6, 8, 10]], volume[[0, 1, 3, 4, 5]])


def test_damaged_regions_are_replaced_and_the_rest_of_the_section_is_kept(tiny_isotropic):
    rng = np.random.default_rng(6)
    volume = (rng.random((5, 64, 64)) * 200 + 20).astype(np.uint8)
    damaged = np.zeros(volume.shape, np.uint8)
    damaged[2, 20:30, 10:40] = 1  # a fold in section 2
    result = drive(isotropic(volume, tiny_isotropic, Settings(steps=1, samples=2), factor=1, gap=4, bad=damaged))
    far = np.ones((64, 64), bool)
    far[20 - 2 * REGION_MARGIN:30 + 2 * REGION_MARGIN, 10 - 2 * REGION_MARGIN:40 + 2 * REGION_MARGIN] = False
    assert np.array_equal(result.image[2][far], volume[2][far]) and not result.uncertainty[2][far].any()
    assert (result.image[2][20:30, 10:40] != volume[2][20:30, 10:40]).mean() > 0.9
    assert result.uncertainty[2][20:30, 10:40].all() and result.info["regenerated"] == "2"
    assert np.array_equal(result.image[[0, 1, 3, 4]], volume[[0, 1, 3, 4]])
    with pytest.raises(InputError, match="cover the volume"):
        drive(isotropic(volume, tiny_isotropic, factor=1, gap=4, bad=damaged[:, :10]))


@pytest.mark.parametrize(("voxel", "factor"), [((40, 10, 10), 4), ((30, 8, 8), 3.75), ((60, 10, 10), 6),
                                               ((50, 4, 4), 12.5), ((20, 9.8, 10.2), 2), ((10, 10, 10), None),
                                               ((1, 1, 1), None), ((50, 4.17, 4.17), 11.99), ((12, 10, 10), 1.2)])
def test_the_factor_follows_from_the_voxel_size(voxel, factor):
    assert factor_from_voxel(voxel) == factor  # any ratio: whether a model serves it is decided later


def test_training_examples_are_a_slice_between_its_two_conditions():
    ramp = np.broadcast_to(np.arange(30, dtype=np.float32)[:, None, None] / 30, (30, 40, 40)).copy()
    x0, cond, label = next(interpolation_batches([ramp], [4, 6], batch=16, patch=32, seed=0))
    assert x0.shape == (16, 1, 32, 32) and cond.shape == (16, 2, 32, 32)
    names = {v: k for k, v in LABELS.items()}
    for i in range(16):
        factor, j = map(int, names[int(label[i])].split(":"))
        below, above, target = (t.mean().item() for t in (cond[i, 0], cond[i, 1], x0[i, 0]))
        assert target == pytest.approx(below + (above - below) * j / factor, abs=1e-5)
        assert abs(above - below) == pytest.approx(2 * factor / 30, abs=1e-5)  # model space is twice [0, 1]
    for start in ("linear", "motion"):  # a ramp along z is all interpolation (and has no motion): nothing left
        residual, _, _ = next(interpolation_batches([ramp], [4, 6], batch=4, patch=32, seed=0, residual=start))
        assert np.abs(residual.numpy()).max() < 1e-4, start


def test_training_starts_kept_over_whole_planes_match_those_of_the_patches():
    rng = np.random.default_rng(3)
    volume = np.cumsum(rng.normal(0, 0.05, (24, 40, 40)), axis=0).astype(np.float32)  # varies along the axis
    patches = interpolation_batches([volume], [4], batch=6, patch=40, seed=5, residual="linear")
    whole = interpolation_batches([volume], [4], batch=6, patch=40, seed=5, residual="linear", cache=True)
    for _ in range(3):  # same examples (same seed), same residual: the cache changes only where it is computed
        (a, cond_a, label_a), (b, cond_b, label_b) = next(patches), next(whole)
        assert torch.equal(cond_a, cond_b) and torch.equal(label_a, label_b)
        assert np.abs(a.numpy()).max() > 0.01
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-3)  # kept in float16


def test_volume_shares_set_how_often_each_volume_is_drawn():
    small, large = np.zeros((12, 32, 32), np.float32), np.ones((12, 64, 64), np.float32)

    def drawn_from_small(shares):
        x0 = next(interpolation_batches([small, large], [4], batch=64, patch=32, seed=0, volume_shares=shares))[0]
        return int((x0.mean(dim=(1, 2, 3)) < 0).sum())  # the small volume is 0: -1 in model space

    assert drawn_from_small(None) < 64 * 0.35  # by size: a fifth of the voxels
    assert drawn_from_small([3, 1]) > 64 * 0.6


@pytest.mark.parametrize("cache", [False, True])
def test_the_start_can_be_a_third_condition_channel(cache):
    rng = np.random.default_rng(4)
    volume = np.cumsum(rng.normal(0, 0.05, (24, 40, 40)), axis=0).astype(np.float32)
    plain = interpolation_batches([volume], [4], batch=6, patch=40, seed=2)
    seen = interpolation_batches([volume], [4], batch=6, patch=40, seed=2, residual="linear", cache=cache,
                                 start_condition=True)
    (target, cond, _), (residual, cond3, _) = next(plain), next(seen)
    assert cond3.shape == (6, 3, 48, 48) and torch.equal(cond3[:, :2], cond)
    # the third channel is the interpolation the model corrects (padded to the network's multiple of 16):
    # it and the residual add up to the slice
    np.testing.assert_allclose((residual + cond3[:, 2:]).numpy(), target.numpy(), atol=2e-3)


@pytest.mark.parametrize("cache", [False, True])
def test_inverted_examples_are_the_same_examples_in_the_other_contrast(cache):
    rng = np.random.default_rng(6)
    volume = 0.5 + np.cumsum(rng.normal(0, 0.05, (24, 40, 40)), axis=0).astype(np.float32)
    plain, inverted = (interpolation_batches([volume], [4], batch=6, patch=40, seed=1, residual="motion",
                                             cache=cache, start_condition=True, invert=p) for p in (0.0, 1.0))
    for _ in range(2):  # model space is symmetric about mid-grey: 1 - v there is -v, the motion start included
        (x0, cond, label), (x0_inv, cond_inv, label_inv) = next(plain), next(inverted)
        assert torch.equal(label, label_inv) and np.abs(x0.numpy()).max() > 0.01
        np.testing.assert_allclose(cond_inv.numpy(), -cond.numpy(), atol=1e-5)
        np.testing.assert_allclose(x0_inv.numpy(), -x0.numpy(), atol=2e-3 if not cache else 1e-5)


def test_self_supervised_learns_from_lateral_planes_of_the_volume_alone(volume):
    vol = np.random.default_rng(1).random((6, 48, 48)).astype(np.float32)
    assert [v.shape for v in oriented(vol, axes=(1, 2))] == [(48, 6, 48), (48, 6, 48)]
    model = drive(self_supervised(vol, 4, minutes=0.03, batch=2, patch=32))
    assert model.meta["gaps"] == [4, 4] and model.net.config.positions > 0
    assert sees_start(model.net)  # reconstruction below hands it the start as its third channel
    result = drive(isotropic(vol, model, Settings(samples=2, steps=1), factor=4))
    assert result.image.shape == (21, 48, 48) and np.array_equal(result.image[::4], vol)
    with pytest.raises(InputError, match="more than 4 planes"):
        drive(self_supervised(vol[:, :4, :4], 4, minutes=0.01))


@pytest.fixture
def short_budgets(monkeypatch):
    """Self-supervised runs of seconds: these tests check what happens to a learnt model, not what it learns."""
    monkeypatch.setattr("napari_emdiffuse.core.isotropic.SELF_SUPERVISED_MIN_MINUTES", 0.01)


def sections_moving_along_y(seed: int = 1) -> np.ndarray:
    """A volume whose x-z planes change slowly along y: the start interpolates them almost exactly, which a few
    seconds of learning cannot beat."""
    rng = np.random.default_rng(seed)
    return (rng.random((6, 1, 96)) * 200 + 20 + 0.2 * np.arange(12)[None, :, None]).astype(np.float32)


def test_columns_kept_aside_pose_the_learnt_task_on_planes_never_learnt_from():
    vol = np.arange(6 * 40 * 100, dtype=np.float32).reshape(6, 40, 100)
    learn, aside = split_aside(vol, 4)
    assert learn.shape == (6, 40, 52) and aside.shape == (6, 40, 48)  # at least 48 columns, the last ones
    assert np.array_equal(np.concatenate([learn, aside], axis=2), vol)
    truth = lateral_truth(aside, 4)  # y first: planes z-x; whole gaps of R from the middle of y
    assert truth.shape == (37, 6, 48) and np.array_equal(truth, np.moveaxis(aside, 1, 0)[1:38])
    assert split_aside(np.zeros((6, 40, 500)), 4)[1].shape[2] == 100  # a fifth of wide volumes
    big = lateral_truth(np.zeros((400, 900, 300), np.uint8), 4)  # a few hundred thousand pixels, quick
    assert big.shape == (9, 256, 128) and big.size <= 2 ** 18 + 256 * 128
    with pytest.raises(InputError, match="96 along x"):
        split_aside(vol[:, :, :95], 4)


def test_a_model_that_does_not_beat_its_start_is_neither_used_nor_saved(tmp_path, monkeypatch, short_budgets):
    from napari_emdiffuse.core.isotropic import isotropic_self_supervised, motion_reconstruction
    from napari_emdiffuse.core.normalize import Normalizer

    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path))
    vol = sections_moving_along_y()
    progress = []
    result = drive(isotropic_self_supervised(vol, 4, minutes=0.01, settings=Settings(samples=2), save_as="m"),
                   progress.append)
    assert not (tmp_path / "m.npz").exists()
    start = drive(motion_reconstruction(vol, 4, Normalizer.fit(vol)))
    assert np.array_equal(result.image, start) and result.uncertainty is None and result.difficulty is None
    info = result.info
    assert info["model"] == "motion-compensated interpolation" and info["samples"] == 0 and info["reliable"] is None
    check = info["validation"]
    assert check["psnr_model"] <= check["psnr_motion_interpolation"] + check["spread"] and check["seeds"] == 3
    [note] = info["notes"]
    assert note.startswith("the model learnt in 0.01 minutes (") and "did not beat motion-compensated" in note
    assert f"{check['psnr_model']:.2f} dB against {check['psnr_motion_interpolation']:.2f} dB" in note
    assert "neither used nor saved" in note and any("planes kept aside, seed 3/3" in p.message for p in progress)


def test_a_model_that_beats_its_start_is_kept_and_reconstructs_more_of_the_acquisition(tmp_path, monkeypatch,
                                                                                        short_budgets):
    from napari_emdiffuse.core import finetune
    from napari_emdiffuse.core.isotropic import SELF_SUPERVISED_MIN_GAIN, isotropic_self_supervised
    from napari_emdiffuse.core.models import ModelFileError, list_models, load_model

    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path))
    judged = []

    def beaten(before, after, margin):  # learning that beats the start takes minutes: the verdict is given here
        judged.append((before, after))
        assert margin == SELF_SUPERVISED_MIN_GAIN
        return finetune.Verdict(True, before[0], before[0] + 0.5, 0.5, 0.1)

    monkeypatch.setattr(finetune, "judge", beaten)
    vol = (np.random.default_rng(1).random((6, 16, 96)) * 255).astype(np.uint8)
    settings = Settings(samples=2, steps=1, precision="float32")
    learnt = drive(isotropic_self_supervised(vol, 4, minutes=0.01, settings=settings, save_as="block7-R4"))
    [(before, after)] = judged  # the start scores alike with every seed; the model with each of the three
    assert len(before) == len(after) == 3 and len(set(before)) == 1
    assert learnt.uncertainty is not None and learnt.info["model"] == "block7-R4"
    assert any("beat motion-compensated interpolation on planes kept aside" in n and "saved as 'block7-R4'" in n
               for n in learnt.info["notes"])
    assert "block7-R4" in [e.name for e in list_models("isotropic")]
    assert load_model("block7-R4").meta["validation"]["psnr_model"] == pytest.approx(before[0] + 0.5, abs=1e-3)
    again = drive(isotropic(vol, "block7-R4", settings, factor=4))  # e.g. on other chunks of the volume
    assert np.abs(again.image.astype(int) - learnt.image).max() <= 1  # the same model (stored in float16)
    progress = []
    with pytest.raises(ModelFileError, match="exists already"):  # refused before ten minutes of learning
        drive(isotropic_self_supervised(vol, 4, minutes=10, save_as="block7-R4"), progress.append)
    assert progress == []


@pytest.mark.parametrize("minutes, refusal", [(1.0, "too short for the learnt model to beat motion-compensated"),
                                              (0.0, "must be a number above 0"), (-3.0, "must be a number above 0"),
                                              (float("nan"), "must be a number above 0 .*, not nan"),
                                              (float("inf"), "must be a number above 0 .*, not inf")])
def test_a_budget_too_short_to_beat_the_start_is_refused_before_any_work(minutes, refusal):
    from napari_emdiffuse.core.isotropic import SELF_SUPERVISED_MIN_MINUTES, isotropic_self_supervised

    assert minutes < SELF_SUPERVISED_MIN_MINUTES or not np.isfinite(minutes)
    with pytest.raises(InputError, match=refusal):
        isotropic_self_supervised(np.zeros((6, 24, 96), np.uint8), 4, minutes)  # raised by the call, not a step


def test_cli_writes_the_reconstruction_with_z_pixel_size_divided(tmp_path, tiny_isotropic, volume, capsys):
    import json

    import tifffile

    from napari_emdiffuse.cli import main
    from napari_emdiffuse.core.io import read_tiff

    src, out, unc = tmp_path / "sections.tif", tmp_path / "iso.tif", tmp_path / "unc.tif"
    tifffile.imwrite(src, volume, imagej=True, resolution=(1 / 8.0, 1 / 8.0),
                     metadata={"unit": "nm", "spacing": 40.0, "axes": "ZYX"})
    code = main(["isotropic", str(src), "-o", str(out), "--factor", "5", "--model", tiny_isotropic,
                 "--uncertainty", str(unc), "--steps", "1", "--json"])
    assert code == 0 and "uncertainty_score" in json.loads(capsys.readouterr().out)
    result = read_tiff(out)
    assert result.data.shape == (16, 24, 40) and result.data.dtype == np.uint8
    assert result.scale == pytest.approx((8.0, 8.0, 8.0))
    assert tifffile.imread(unc).shape == (16, 24, 40)
    # without --factor: the voxel size's (40 nm sections of 8 nm pixels), said on stderr
    assert main(["isotropic", str(src), "-o", str(out), "--model", tiny_isotropic, "--steps", "1", "--overwrite"]) == 0
    assert "R = 5: output z spacing 8 nm, sections 5 pixels apart (voxel size 40 x 8 x 8 nm)" in capsys.readouterr().err
    assert read_tiff(out).data.shape == (16, 24, 40) and read_tiff(out).scale == pytest.approx((8.0, 8.0, 8.0))
    unknown = tmp_path / "plain.tif"
    tifffile.imwrite(unknown, volume, photometric="minisblack")
    assert main(["isotropic", str(unknown), "-o", str(tmp_path / "y.tif"), "--model", tiny_isotropic]) == 2
    assert "give the z factor with --factor R" in capsys.readouterr().err and not (tmp_path / "y.tif").exists()
    assert main(["isotropic", str(src), "-o", str(tmp_path / "x.tif"), "--factor", "4", "--self-supervised",
                 "--model", tiny_isotropic]) == 2
    assert "leave out --model" in capsys.readouterr().err
    assert main(["isotropic", str(src), "-o", str(tmp_path / "x.tif"), "--factor", "4", "--save-model", "m"]) == 2
    assert "add that option" in capsys.readouterr().err


def test_cli_refuses_a_short_budget_at_once_and_writes_the_start_when_the_model_does_not_beat_it(
        tmp_path, capsys, monkeypatch):
    import tifffile

    from napari_emdiffuse.cli import main

    out, unc = tmp_path / "iso.tif", tmp_path / "unc.tif"
    assert main(["isotropic", str(tmp_path / "not-read.tif"), "-o", str(out), "--factor", "4", "--self-supervised",
                 "--train-minutes", "0.5"]) == 2  # refused before the volume is even read
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too short for the learnt model to beat motion-compensated interpolation" in err
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr("napari_emdiffuse.core.isotropic.SELF_SUPERVISED_MIN_MINUTES", 0.01)
    src = tmp_path / "smooth.tif"
    tifffile.imwrite(src, sections_moving_along_y())
    assert main(["isotropic", str(src), "-o", str(out), "--factor", "4", "--self-supervised", "--train-minutes",
                 "0.01", "--save-model", "m", "--uncertainty", str(unc), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "note: the model learnt in 0.01 minutes" in captured.err and "neither used nor saved" in captured.err
    assert "(motion-compensated interpolation: no uncertainty)" in captured.out
    assert tifffile.imread(out).shape == (21, 12, 96) and not unc.exists() and not (tmp_path / "models").exists()


def test_widget_reconstructs_a_volume_that_overlays_the_input(make_napari_viewer, qtbot, tiny_isotropic, volume,
                                                              monkeypatch, tmp_path):
    import shutil

    from napari_emdiffuse._widgets.isotropic import SELF_SUPERVISED, WITH_MODEL, IsotropicWidget
    from napari_emdiffuse.core.finetune import Verdict

    shutil.copy(tiny_isotropic, tmp_path)  # a models folder of this test's own: the learnt model goes there too
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path))
    viewer = make_napari_viewer()
    sections = viewer.add_image(volume, name="sections", scale=(50.0, 4.0, 4.0), translate=(100.0, 0.0, 8.0))
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Isotropic reconstruction")
    assert isinstance(widget, IsotropicWidget)
    assert widget.factor.value() == 12.5  # from the layer's scale: 50 nm over 4 nm, whole or not
    assert widget.grid.text() == "z 4, gaps 12.5 px"
    viewer.add_image(volume, name="other", scale=(60.0, 10.0, 10.0))  # selected: the picker and R follow it
    qtbot.waitUntil(lambda: widget.layer_picker.currentText() == "other", timeout=2_000)  # once the loop runs
    assert widget.factor.value() == 6
    viewer.layers.selection.active = sections
    qtbot.waitUntil(lambda: widget.layer_picker.currentText() == "sections", timeout=2_000)
    assert widget.factor.value() == 12.5  # ... until R is set by hand: then it stays (the second run below)
    widget.model_picker.setCurrentText("tiny-iso")
    widget.factor.setValue(5)
    widget.steps.setValue(1)
    widget.run_button.click()
    qtbot.waitUntil(lambda: "sections_isotropic" in viewer.layers and widget.worker is None, timeout=60_000)
    iso = viewer.layers["sections_isotropic"]
    assert iso.data.shape == (16, 24, 40) and tuple(iso.scale) == pytest.approx((10.0, 4.0, 4.0))
    np.testing.assert_allclose(iso.extent.world, sections.extent.world)  # first and last slice centres coincide
    assert viewer.layers["sections_isotropic_uncertainty"].metadata["reliable"] is not None

    widget.mode.setCurrentIndex(widget.mode.findData(SELF_SUPERVISED))  # vEMDiffuse-a needs no model
    assert not widget.model_picker.isEnabled() and widget.minutes.isVisibleTo(widget)  # its row shows
    assert not widget.model_picker.menu_button.isEnabled()
    wide = viewer.add_image(np.tile(volume, (2, 1, 3)), name="wide", scale=(20.0, 4.0, 4.0))  # 48 columns aside
    qtbot.waitUntil(lambda: widget.layer_picker.currentText() == "wide", timeout=2_000)
    widget.minutes.setValue(1.0)  # too short to beat the start: refused before any work, in one sentence
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    widget.run_button.click()
    assert widget.worker is None and len(shown) == 1 and "too short for the learnt model to beat" in shown[0]
    monkeypatch.setattr("napari_emdiffuse.core.isotropic.SELF_SUPERVISED_MIN_MINUTES", 0.1)  # seconds, not minutes
    monkeypatch.setattr("napari_emdiffuse.core.finetune.judge",  # learning that beats its start takes minutes
                        lambda before, after, margin: Verdict(True, before[0], before[0] + 0.5, 0.5, 0.1))
    widget.minutes.setValue(0.1)
    statuses = []
    widget.run_button.click()
    widget.worker.yielded.connect(lambda _: statuses.append(widget.status.text()))  # after the widget's own slot
    qtbot.waitUntil(lambda: "wide_isotropic" in viewer.layers and widget.worker is None, timeout=90_000)
    # progress shows the learning, the check on columns kept aside, then the reconstruction, under what runs
    assert any("Running isotropic on wide" in s and "learning from this volume: step" in s for s in statuses)
    assert any("planes kept aside, seed 1/3" in s for s in statuses) and any("(7/7)" in s for s in statuses)
    assert viewer.layers["wide_isotropic"].data.shape == (36, 24, 120) and "wide_isotropic_uncertainty" in viewer.layers
    # the learnt model joins the picker, to process more of the acquisition (e.g. all of it into a Zarr file)
    learnt = [widget.model_picker.itemText(i) for i in range(widget.model_picker.count())
              if widget.model_picker.itemText(i).startswith("self-supervised-R5-")]
    assert len(learnt) == 1 and f"saved as '{learnt[0]}'" in widget.status.text()
    assert "beat motion-compensated interpolation on planes kept aside" in widget.status.text()

    monkeypatch.undo()  # a model that does not beat its start: the start reconstructs the volume, nothing is saved
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path))
    monkeypatch.setattr("napari_emdiffuse.core.isotropic.SELF_SUPERVISED_MIN_MINUTES", 0.1)
    viewer.layers.remove(wide)
    viewer.add_image(sections_moving_along_y(), name="smooth", scale=(20.0, 4.0, 4.0))
    qtbot.waitUntil(lambda: widget.layer_picker.currentText() == "smooth", timeout=2_000)
    widget.run_button.click()
    qtbot.waitUntil(lambda: "smooth_isotropic" in viewer.layers and widget.worker is None, timeout=90_000)
    assert "smooth_isotropic_uncertainty" not in viewer.layers and len(list(tmp_path.glob("self-supervised-R5-*"))) == 1
    assert "motion-compensated interpolation: no uncertainty. Note: the model learnt in 0.1 minutes (" \
        in widget.status.text() and "did not beat" in widget.status.text()
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    widget.layer_picker.setCurrentText("smooth")
    widget.scope.setCurrentIndex(widget.scope.findData("zarr"))  # learning needs the volume in memory: refused
    widget.zarr_path.setText(str(tmp_path / "out.zarr"))
    widget.run_button.click()
    assert widget.worker is None and "in memory" in shown[0] and not (tmp_path / "out.zarr").exists()
    widget.mode.setCurrentIndex(widget.mode.findData(WITH_MODEL))  # bad sections need it too: refused
    widget.bad_sections.setText("2")
    widget.run_button.click()
    assert widget.worker is None and "not chunk by chunk" in shown[-1] and not (tmp_path / "out.zarr").exists()


@pytest.mark.slow
def test_sample_volume_is_a_fair_demo_the_bundled_model_beats_linear_interpolation_on_it():
    from napari_emdiffuse._sample_data import anisotropic_volume

    (truth, truth_kw, _), (acquired, acquired_kw, _) = anisotropic_volume()
    assert np.array_equal(acquired, truth[::4]) and acquired_kw["scale"] == (40.0, 10.0, 10.0)
    kept, fine = acquired[:3], truth[:9]  # two gaps keep the test short
    result = drive(isotropic(kept, None, Settings(), factor=4)).image
    generated = [z for z in range(len(fine)) if z % 4]

    def error(v):
        return np.mean((v[generated].astype(np.float32) - fine[generated]) ** 2)

    assert error(result) < 0.8 * error(interpolate(kept, 4))


def test_sample_volume_opens_over_its_truth_and_is_what_the_widget_starts_on(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-emdiffuse", "anisotropic_volume")
    truth, acquired = viewer.layers["isotropic_truth"], viewer.layers["anisotropic_volume"]
    assert not truth.visible and viewer.layers.selection.active is acquired
    np.testing.assert_allclose(acquired.extent.world[:, 0], truth.extent.world[:, 0])  # same z range
    assert {str(u) for u in acquired.units + truth.units} == {"nanometer"}
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Isotropic reconstruction")
    assert widget.layer_picker.currentText() == "anisotropic_volume"


def test_widget_marks_bad_sections_and_damaged_regions_at_a_factor_from_the_layer_scale(make_napari_viewer, qtbot,
                                                                                         tiny_isotropic, monkeypatch,
                                                                                         tmp_path):
    import shutil

    from scipy.ndimage import gaussian_filter

    from napari_emdiffuse._widgets.isotropic import IsotropicWidget

    shutil.copy(tiny_isotropic, tmp_path)
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path))
    rng = np.random.default_rng(2)
    smooth = gaussian_filter(rng.random((6, 64, 64)), (1.5, 3, 3))
    volume = (20 + 200 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)
    volume[3] = 0  # a lost section: blank
    viewer = make_napari_viewer()
    sections = viewer.add_image(volume, name="sstem", scale=(50.0, 4.0, 4.0), translate=(10.0, 0.0, 0.0))
    widget = IsotropicWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.factor.value() == 12.5 and "gaps 12.5 px" in widget.grid.text()
    widget.model_picker.setCurrentText("tiny-iso")
    widget.steps.setValue(1)
    widget.find_button.click()  # the detector proposes the blank section, for the user to confirm
    assert widget.bad_sections.text() == "3" and "3: 100% blank" in widget.status.text()
    assert widget.regions.currentText() == "none"  # whole sections only: no labels layer of local damage
    assert widget.sections.text() == "Sections: bad"  # folded, the section says it holds a setting
    widget.run_button.click()
    qtbot.waitUntil(lambda: "sstem_isotropic" in viewer.layers and widget.worker is None, timeout=60_000)
    iso = viewer.layers["sstem_isotropic"]
    assert iso.data.shape == (63, 64, 64) and tuple(iso.scale) == pytest.approx((4.0, 4.0, 4.0))
    assert iso.extent.world[0][0] == sections.extent.world[0][0]  # the first section where it was
    assert np.array_equal(iso.data[50], volume[4]) and np.array_equal(iso.data[25], volume[2])  # on the grid: kept
    assert iso.metadata["factor"] == 12.5 and iso.metadata["regenerated"] == "3"
    assert "Regenerated sections 3." in widget.status.text()
    planes_at_3 = iso.data[int(np.ceil(3 * 12.5))]  # lies between 2 and 4 now: generated, not the blank section
    assert planes_at_3.mean() > 20

    # a damaged region painted in a labels layer: only it is regenerated (R = 1: nothing else is made)
    widget.bad_sections.setText("")
    damage = np.zeros(volume.shape, np.uint8)
    damage[2, 10:30, 20:40] = 1
    viewer.add_labels(damage, name="damage", scale=(50.0, 4.0, 4.0), translate=(10.0, 0.0, 0.0))
    viewer.layers.selection.active = sections
    qtbot.waitUntil(lambda: widget.regions.findText("damage") >= 0, timeout=2_000)
    widget.regions.setCurrentText("damage")
    assert widget.sections.text() == "Sections: regions"
    widget.factor.setValue(1)
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.worker is None and viewer.layers["sstem_isotropic"].data.shape == volume.shape
                    if "sstem_isotropic" in viewer.layers else False, timeout=60_000)
    repaired = [layer for layer in viewer.layers if layer.name.startswith("sstem_isotropic")
                and layer.data.shape == volume.shape and "map" not in layer.metadata][-1].data
    assert np.array_equal(repaired[[0, 1, 3, 4, 5]], volume[[0, 1, 3, 4, 5]])
    assert np.array_equal(repaired[2, 50:, :], volume[2, 50:, :])  # far from the region: kept
    assert (repaired[2, 10:30, 20:40] != volume[2, 10:30, 20:40]).mean() > 0.5


    # local damage the detector finds goes into a labels layer chosen as the damaged regions, to look at first
    from napari_emdiffuse.core.sections import Suspect

    fold = np.zeros((64, 64), bool)
    fold[5:15, 5:50] = True
    monkeypatch.setattr("napari_emdiffuse.core.sections.suspect_sections",
                        lambda v: [Suspect(2, "fold or crack: dark streak", 2.0, fold)])
    widget.find_button.click()
    assert widget.regions.currentText() == "sstem_suspect_damage" and widget.bad_sections.text() == ""
    assert np.array_equal(viewer.layers["sstem_suspect_damage"].data[2] != 0, fold)
    assert "2: fold or crack: dark streak" in widget.status.text()

def test_bad_sections_from_a_script_follow_the_typed_lists_rules(tiny_isotropic, volume):
    with pytest.raises(InputError, match="whole numbers counted from 0"):
        drive(isotropic(volume, tiny_isotropic, factor=2, bad=[1.5]))
    with pytest.raises(InputError, match="Section 0 cannot be regenerated"):
        drive(isotropic(volume, tiny_isotropic, factor=2, bad=[0]))
    with pytest.raises(InputError, match="outside the stack"):
        drive(isotropic(volume, tiny_isotropic, factor=2, bad=[7]))
