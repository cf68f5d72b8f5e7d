import dataclasses

import numpy as np
import pytest

from napari_emdiffuse.core.normalize import InputError
from napari_emdiffuse.core.tasks import (
    Progress,
    Settings,
    TimeLeft,
    denoise,
    drive,
    pick_precision,
    predictive_spread,
    time_left_text,
    uncertainty_score,
)


def run_denoise(image, model, **kwargs):
    progress = []
    result = drive(denoise(image, model, Settings(**kwargs)), progress.append)
    return result, progress


def test_denoise_returns_image_in_input_dtype_with_uncertainty_and_metadata(tiny_model, em_pair):
    _, noisy = em_pair
    result, progress = run_denoise(noisy, tiny_model, samples=2, seed=1, difficulty=True)
    assert result.image.shape == noisy.shape and result.image.dtype == np.uint8
    assert result.uncertainty.shape == noisy.shape and result.uncertainty.dtype == np.float32
    assert result.difficulty.shape == noisy.shape
    info = result.info
    assert info["uncertainty_score"] == pytest.approx(uncertainty_score(result.uncertainty))
    assert info["reliable"] == (info["uncertainty_score"] <= 0.12)
    assert info["flagged_fraction"] == pytest.approx((result.uncertainty > 0.12).mean())
    assert {"model", "samples", "steps", "seed", "threshold"} <= set(info)
    assert all(isinstance(p, Progress) for p in progress)
    dones = [p.done for p in progress]
    assert dones == sorted(dones) and progress[-1].done == progress[-1].total


def test_predictive_spread_adds_the_predicted_difficulty_to_the_spread_between_samples():
    samples = np.array([[[0.2, 0.5]], [[0.4, 0.5]]])  # (K = 2, 1, 2): one pixel differs, one does not
    assert np.allclose(predictive_spread(samples, None), [[0.1, 0.0]])  # population std
    phis = np.array([[[0.0, 0.3]], [[0.0, 0.4]]])
    assert np.allclose(predictive_spread(samples, phis), [[0.1, np.sqrt((0.09 + 0.16) / 2)]])
    assert predictive_spread(samples, phis).dtype == np.float32


def test_uncertainty_is_at_least_the_difficulty_and_the_spread_between_samples(tiny_model, em_pair):
    _, noisy = em_pair
    two = run_denoise(noisy, tiny_model, samples=2, seed=1, difficulty=True)[0]
    assert np.all(two.uncertainty >= two.difficulty - 1e-6)  # mean of phi^2 >= (mean phi)^2
    assert np.mean(two.uncertainty > two.difficulty + 1e-4) > 0.5  # and the samples differ


def test_one_sample_gives_the_predicted_spread_as_uncertainty_unless_the_model_has_no_difficulty_head(
        tiny_model, em_pair):
    from napari_emdiffuse.core.models import load_model
    from napari_emdiffuse.core.network import UNet

    _, noisy = em_pair
    one = run_denoise(noisy, tiny_model, samples=1, seed=1, difficulty=True)[0]
    assert np.allclose(one.uncertainty, one.difficulty, atol=1e-6) and one.info["reliable"] is not None
    model = load_model(tiny_model)
    headless = dataclasses.replace(model, net=UNet(dataclasses.replace(model.net.config, difficulty_head=False)))
    result = drive(denoise(noisy, headless, Settings(samples=1)))
    assert result.uncertainty is None and result.info["reliable"] is None


def test_same_seed_same_result_and_other_seed_other_sample(tiny_model, em_pair):
    _, noisy = em_pair
    a, _ = run_denoise(noisy, tiny_model, seed=5)
    b, _ = run_denoise(noisy, tiny_model, seed=5)
    c, _ = run_denoise(noisy, tiny_model, seed=6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.uncertainty, b.uncertainty)
    assert not np.array_equal(a.image, c.image)


def test_input_is_not_modified(tiny_model, em_pair):
    _, noisy = em_pair
    before = noisy.copy()
    run_denoise(noisy, tiny_model)
    assert np.array_equal(noisy, before)


@pytest.mark.parametrize("shape, dtype, low, high", [
    ((3, 40, 50), np.uint16, 0, 1000),
    ((1, 70), np.float32, 0, 1),  # a single line
    ((5, 5), np.int64, -(2**40), 2**40),  # smaller than the network's minimum, huge values
    ((33, 17), bool, 0, 2),
    ((20, 30), np.float64, -1e6, 1e6),  # negative values
    ((24, 24), np.uint8, 100, 100),  # constant
    ((40, 40), np.float16, 0, 1),
])
def test_stacks_small_and_odd_images_keep_shape_and_dtype(tiny_model, shape, dtype, low, high):
    rng = np.random.default_rng(0)
    image = (low + rng.random(shape) * (high - low)).astype(dtype)
    result, _ = run_denoise(image, tiny_model, samples=1, tile=64)
    assert result.image.shape == image.shape and result.image.dtype == image.dtype
    assert np.isfinite(result.image.astype(np.float64)).all()
    assert result.uncertainty.shape == image.shape  # one sample: the spread the model predicts (phi)


def test_tiles_smaller_than_the_image_give_a_seamless_result(tiny_model, em_pair):
    _, noisy = em_pair
    whole, _ = run_denoise(noisy, tiny_model, tile=256)
    tiled, _ = run_denoise(noisy, tiny_model, tile=64, overlap=16)
    diff = np.abs(whole.image.astype(float) - tiled.image.astype(float))
    assert diff.mean() < 2.0  # grey levels out of 255: tiles only change the far context


@pytest.mark.parametrize("bad", [np.zeros((0, 4)), np.zeros((10, 10, 3)), np.full((9, 9), np.nan),
                                 np.zeros((2, 2, 9, 9))])
def test_bad_inputs_fail_before_any_work(tiny_model, bad):
    with pytest.raises(InputError):
        run_denoise(bad, tiny_model)


def test_bad_settings_are_refused():
    with pytest.raises(InputError):
        Settings(samples=0)
    with pytest.raises(InputError):
        Settings(tile=64, overlap=64)
    with pytest.raises(InputError):
        Settings(precision="float16")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_only_on_cpus_that_compute_it_natively(monkeypatch, native):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert pick_precision("auto", torch.device("cpu")) == ("bfloat16" if native else "float32")
    assert pick_precision("float32", torch.device("cpu")) == "float32"
    assert pick_precision("bfloat16", torch.device("cpu")) == "bfloat16"  # emulated elsewhere: slow, not wrong


def test_bfloat16_evaluations_stay_within_a_grey_level_of_float32(tiny_model, em_pair):
    _, noisy = em_pair
    single, _ = run_denoise(noisy, tiny_model, samples=2, seed=2, precision="float32")
    half, _ = run_denoise(noisy, tiny_model, samples=2, seed=2, precision="bfloat16")
    assert (single.info["precision"], half.info["precision"]) == ("float32", "bfloat16")
    difference = np.abs(single.image.astype(int) - half.image.astype(int))
    assert 0 < difference.max() <= 1  # it did run in bfloat16, and the output did not move by more than rounding
    assert np.abs(single.uncertainty - half.uncertainty).max() < 0.01


def test_cancelling_the_generator_stops_the_work(tiny_model, em_pair):
    _, noisy = em_pair
    job = denoise(noisy, tiny_model, Settings(samples=2, steps=20))
    next(job), next(job)
    job.close()  # what napari's worker.quit() does between two yields
    with pytest.raises(StopIteration):
        next(job)


@pytest.mark.slow
def test_bundled_model_removes_noise_and_its_uncertainty_rises_with_the_noise(em_pair):
    from napari_emdiffuse.core.simulate import SEMNoise, synthetic_em

    clean, noisy = em_pair
    result, _ = run_denoise(noisy, None, samples=2, seed=0)
    mse = lambda a: np.mean((a.astype(float) - clean.astype(float)) ** 2)  # noqa: E731
    assert mse(result.image) < 0.5 * mse(noisy)  # at least 3 dB better than the input
    assert 0 < result.info["uncertainty_score"] < 0.12 and result.info["reliable"]
    truth = synthetic_em((128, 160), seed=3)
    to8 = lambda a: np.clip(a * 180 + 40, 0, 255).astype(np.uint8)  # noqa: E731
    scores = [run_denoise(to8(SEMNoise(electrons=e, read=0.02)(truth, np.random.default_rng(0))), None)[0]
              .info["uncertainty_score"] for e in (200, 30, 3)]
    assert scores[1] > scores[0] * 1.2  # far fewer electrons (the strong end of what it was trained on): less sure
    assert scores[2] > scores[0]  # 3 electrons, far outside its training: still less sure than at 200


def test_a_job_cancelled_from_its_progress_callback_is_cleaned_up_before_the_caller_sees_the_exception():
    cleaned = []

    def job():
        try:
            for i in range(10):
                yield i
        finally:
            cleaned.append(True)

    def cancel_at_3(i):
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        try:
            drive(job(), cancel_at_3)
        finally:
            assert cleaned == [True]


def test_time_left_extrapolates_each_phase_and_waits_for_enough_progress():
    now = [0.0]
    time_left = TimeLeft(clock=lambda: now[0])
    reports = [(0.0, 0, 100, None), (1.0, 10, 100, None),  # too early: warm-up
               (5.0, 10, 100, 45.0), (10.0, 50, 100, 10.0),
               (11.0, 0, 20, None), (15.0, 10, 20, 4.0)]  # a new total: a new phase (learning, then reconstructing)
    for t, done, total, expected in reports:
        now[0] = t
        left = time_left(done, total)
        assert left == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("seconds, text", [(None, ""), (4, "a few seconds left"), (42, "about 40 s left"),
                                           (200, "about 3 min left"), (6000, "about 1 h 40 min left")])
def test_time_left_reads_as_a_person_would_say_it(seconds, text):
    assert time_left_text(seconds) == text


def test_keeping_the_brightness_removes_a_learnt_gain_and_offset_and_keeps_the_detail():
    from scipy.ndimage import gaussian_filter, uniform_filter

    from napari_emdiffuse.core.simulate import SEMNoise, synthetic_em
    from napari_emdiffuse.core.tasks import BRIGHTNESS_SIGMA, keep_brightness

    truth = synthetic_em((256, 256), seed=5)  # a short-dwell acquisition of about the real pair's noise
    clean, noisy = truth * 180 + 40, SEMNoise(electrons=200, read=0.01)(truth, np.random.default_rng(1)) * 180 + 40
    darkened = 1.013 * clean - 4  # what the bundled denoiser had learnt from its training pair
    kept = keep_brightness(darkened, noisy, BRIGHTNESS_SIGMA)
    local = lambda a: uniform_filter(a, 31)[16:-16, 16:-16]  # noqa: E731  31-px local means
    assert np.abs(local(darkened) - local(noisy)).mean() > 2
    assert np.abs(local(kept) - local(noisy)).mean() < 0.5
    detail = lambda a: a - gaussian_filter(a, BRIGHTNESS_SIGMA)  # noqa: E731
    assert np.abs(detail(kept) - detail(darkened)).mean() < 0.3  # grey levels: the model's detail stays


def test_results_keep_the_input_brightness_unless_the_model_adopts_its_targets(tiny_model, tiny_superres_x2,
                                                                              models_dir, em_pair):
    from scipy.ndimage import gaussian_filter, zoom

    from napari_emdiffuse._tests.conftest import make_tiny_model
    from napari_emdiffuse.core.tasks import BRIGHTNESS_SIGMA, superres

    adopting = make_tiny_model(models_dir, "denoise", "tiny-adopting", brightness="target")  # the same network
    noisy = em_pair[1]

    def offset(result, reference, sigma=2 * BRIGHTNESS_SIGMA):  # of local means, grey levels, away from the edges
        local = lambda a: gaussian_filter(a.astype(float), sigma)[24:-24, 24:-24]  # noqa: E731
        return np.abs(local(result) - local(reference)).mean()

    # an untrained network shifts and flattens everything (which no correction of the brightness undoes)
    kept, adopted = run_denoise(noisy, tiny_model)[0], run_denoise(noisy, adopting)[0]
    assert offset(kept.image, noisy) < 0.3 * offset(adopted.image, noisy)
    np.testing.assert_allclose(kept.uncertainty, adopted.uncertainty)  # the spread is the model's either way
    larger = drive(superres(noisy, tiny_superres_x2, Settings(), scale=2)).image
    assert offset(larger, zoom(noisy.astype(float), 2, order=1), 4 * BRIGHTNESS_SIGMA) < 0.3 * offset(adopted.image, noisy)
