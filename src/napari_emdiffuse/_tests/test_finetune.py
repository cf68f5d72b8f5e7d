import numpy as np
import pytest

from napari_emdiffuse.cli import main
from napari_emdiffuse.core.finetune import finetune, prepare_pair
from napari_emdiffuse.core.models import ModelFileError, list_models, load_model, on_models_changed
from napari_emdiffuse.core.normalize import InputError
from napari_emdiffuse.core.register import register_pair, shift_image
from napari_emdiffuse.core.simulate import SEMNoise, area_downsample, synthetic_em
from napari_emdiffuse.core.tasks import drive
from napari_emdiffuse.core.train import TrainProgress


@pytest.fixture
def pair():
    clean = synthetic_em((192, 256), seed=5)
    noisy = SEMNoise(electrons=30)(clean, np.random.default_rng(0))
    return noisy, shift_image(clean, (2.3, -1.6))  # the slow acquisition is displaced


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path / "user"))
    return tmp_path / "user"


def test_registration_recovers_the_shift_and_reports_the_residual(pair):
    noisy, moved = pair
    reg = register_pair(noisy, moved)
    assert reg.shift == pytest.approx((-2.3, 1.6), abs=0.15)
    assert reg.residual < 0.5 and reg.correlation > 0.5


def test_superres_pairs_are_registered_on_the_low_resolution_grid():
    clean = synthetic_em((256, 256), seed=6)
    lr = area_downsample(clean, 2)
    image, target, reg = prepare_pair("superres", lr, shift_image(clean, (3.0, -2.0)), 2)
    assert reg.shift == pytest.approx((-1.5, 1.0), abs=0.15)
    assert target.shape == (image.shape[0] * 2, image.shape[1] * 2)


@pytest.mark.parametrize("target, message", [
    (np.zeros((100, 100)), "same shape"),
    (np.random.default_rng(1).random((192, 256)), "could not be registered"),
])
def test_bad_pairs_are_refused_with_a_sentence(pair, target, message):
    with pytest.raises(InputError, match=message):
        prepare_pair("denoise", pair[0], target, 2)


def test_finetune_saves_an_improved_model_into_the_registry(pair, tiny_model, user_dir):
    changed = []
    on_models_changed(lambda: changed.append(True))
    progress = []
    result = drive(finetune("denoise", *pair, base=tiny_model, name="liver", iterations=30, lr=2e-3,
                            validate_every_minutes=0.05), progress.append)
    assert any(isinstance(p, TrainProgress) for p in progress)
    assert result.val_psnr_before == pytest.approx(result.val_psnr_before)  # finite number
    if result.improved:  # the tiny random model improves almost surely; if not, nothing may be saved
        assert result.path == user_dir / "liver.npz" and changed
        assert result.val_psnr_after > result.val_psnr_before
        model = load_model("liver")
        assert model.meta["finetune"]["base"] == "tiny" and model.task == "denoise"
        assert "liver" in [e.name for e in list_models("denoise")]
    else:
        assert result.path is None and not user_dir.exists()


def test_a_taken_name_is_refused_before_any_training(pair, tiny_model, user_dir):
    user_dir.mkdir()
    (user_dir / "liver.npz").write_bytes(b"someone's model")
    progress = []
    with pytest.raises(ModelFileError, match="exists already"):
        drive(finetune("denoise", *pair, base=tiny_model, name="liver", iterations=30), progress.append)
    assert progress == [] and (user_dir / "liver.npz").read_bytes() == b"someone's model"


def test_a_x2_model_is_finetuned_for_x4_on_both_of_its_steps(tiny_superres_x2, tmp_path, monkeypatch):
    import napari_emdiffuse.core.finetune as ft

    seen = []
    original = ft.pair_batches
    monkeypatch.setattr(ft, "pair_batches", lambda pairs, *a: seen.append(pairs) or original(pairs, *a))
    clean = synthetic_em((640, 768), seed=8)
    lr = area_downsample(clean, 4) + np.random.default_rng(0).normal(0, 0.05, (160, 192))
    result = drive(finetune("superres", lr, clean, base=tiny_superres_x2, scale=4, iterations=4,
                            output=tmp_path / "x4.npz"))
    (first, middle), (middle_up, full) = seen[0]
    assert first.shape == middle.shape  # the input to the target's x2 average
    assert middle_up.shape == full.shape == (2 * middle.shape[0], 2 * middle.shape[1])  # and from it to the target
    assert np.isfinite(result.val_psnr_before)


def test_finetune_that_cannot_improve_keeps_the_base_model(pair, tiny_model, user_dir):
    result = drive(finetune("denoise", *pair, base=tiny_model, iterations=3, lr=0.0))
    assert not result.improved and result.path is None and result.model_name == "tiny"
    assert "did not help" in result.message and "kept" in result.message and not user_dir.exists()
    assert "seeds" in result.message and "residual misalignment" in result.message


@pytest.mark.parametrize("before, after, improved", [
    ([20.0, 20.1, 19.9], [20.4, 20.5, 20.3], True),  # better with every seed, by 4 spreads
    ([20.0, 20.6, 19.4], [20.4, 21.0, 19.8], False),  # better by less than the seed-to-seed spread
    ([20.0, 20.1, 19.9], [21.5, 21.6, 19.8], False),  # much better on average, worse with one seed
    ([20.0, 20.1, 19.9], [19.0, 19.1, 18.9], False),
])
def test_a_candidate_must_beat_the_base_by_more_than_the_seed_spread(before, after, improved):
    from napari_emdiffuse.core.finetune import judge

    verdict = judge(before, after)
    assert verdict.improved is improved
    assert verdict.spread == pytest.approx(max(np.std(before, ddof=1), np.std(after, ddof=1)))


def test_a_margin_sets_the_least_gain_where_the_base_draws_no_noise():
    from napari_emdiffuse.core.finetune import judge

    start = [23.24] * 3  # the same with every seed: the spread comes from the candidate alone
    barely = [23.24002, 23.24003, 23.24001]  # a barely trained model: its start, give or take a rounding
    assert judge(start, barely).improved and not judge(start, barely, margin=0.05).improved
    assert judge(start, [23.41, 23.42, 23.40], margin=0.05).improved


def test_tuned_and_base_models_are_validated_with_the_same_seeds(pair, tiny_model, user_dir, monkeypatch):
    import napari_emdiffuse.core.finetune as ft

    seen = []
    original = ft.pair_tuning

    def recording(*args, **kwargs):
        tuning = original(*args, **kwargs)
        validate = tuning.validate
        tuning.validate = lambda model, settings: seen.append((id(model.net), settings.seed)) or validate(model, settings)
        return tuning

    monkeypatch.setattr(ft, "pair_tuning", recording)
    result = drive(finetune("denoise", *pair, base=tiny_model, iterations=6, lr=2e-3, seed=4))
    base_seeds = [s for net, s in seen if net == seen[0][0]]
    assert base_seeds == [4, 5, 6]
    candidate_seeds = {s for net, s in seen if net != seen[0][0]}
    assert 4 in candidate_seeds and candidate_seeds <= {4, 5, 6}  # checkpoints are ranked with the first seed
    assert result.improved == (candidate_seeds == {4, 5, 6}) or not result.improved  # saved: judged with all three


def test_cancelled_finetune_leaves_nothing_half_written(pair, tiny_model, user_dir):
    job = finetune("denoise", *pair, base=tiny_model, iterations=10_000)
    for _ in range(5):
        next(job)
    job.close()
    assert not user_dir.exists() or not list(user_dir.glob("*.part"))


def test_cli_finetune_then_use_export_import_remove(tmp_path, pair, tiny_model, user_dir, capsys):
    import tifffile

    to8 = lambda a: np.clip(a * 255, 0, 255).astype(np.uint8)  # noqa: E731
    tifffile.imwrite(tmp_path / "in.tif", to8(pair[0]))
    tifffile.imwrite(tmp_path / "tg.tif", to8(pair[1]))
    model = tmp_path / "tuned.npz"
    code = main(["finetune", "--task", "denoise", "--input", str(tmp_path / "in.tif"), "--target",
                 str(tmp_path / "tg.tif"), "-o", str(model), "--base", tiny_model, "--iterations", "20", "--json"])
    assert code == 0
    import json

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"val_psnr_before", "val_psnr_after", "val_psnr_spread", "improved", "shift", "rotation_deg", "scale",
            "residual_px", "residual_p95_px"} <= set(summary)
    source = model if model.exists() else tiny_model
    assert main(["denoise", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--model", str(source),
                 "--steps", "1"]) == 0
    assert main(["models", "--import", str(source)]) == 0
    name = capsys.readouterr().out.split()[-1]
    assert main(["models", "--export", name, str(tmp_path / "copy.npz")]) == 0
    assert load_model(tmp_path / "copy.npz").task == "denoise"
    assert main(["models", "--remove", name]) == 0
    assert name not in [e.name for e in list_models()]
    assert main(["models", "--remove", "denoise-sem"]) == 2  # bundled models stay


def test_an_isotropic_model_is_finetuned_on_one_isotropic_volume(learnt_isotropic, tmp_path):
    from napari_emdiffuse.core.isotropic import isotropic
    from napari_emdiffuse.core.simulate import synthetic_volume
    from napari_emdiffuse.core.tasks import Settings

    volume = (synthetic_volume((40, 48, 48), seed=2) * 200 + 20).astype(np.uint8)
    progress = []
    result = drive(finetune("isotropic", volume, base=learnt_isotropic, factor=4, iterations=12, lr=2e-3,
                            batch=2, output=tmp_path / "tuned.npz", validate_every_minutes=0.01), progress.append)
    assert result.registration is None and np.isfinite(result.val_psnr_before)
    assert sum(isinstance(p, TrainProgress) for p in progress) >= 2
    assert any(getattr(p, "message", "").startswith("validating: isotropic") for p in progress)  # reconstructs
    if result.improved:  # an untrained model improves almost surely; if not, the base is kept
        tuned = load_model(tmp_path / "tuned.npz")
        assert tuned.meta["finetune"]["factor"] == 4 and tuned.meta["finetune"]["validation_slices"] == 9
        assert "isotropic volume for R = 4" in tuned.meta["description"] and "Registration" not in result.message
        out = drive(isotropic(volume[::4], tuned, Settings(samples=1), factor=4))
        assert out.image.shape == (37, 48, 48)
    else:
        assert result.path is None and result.model_name == "learnt-iso"


@pytest.mark.parametrize("volume, kwargs, message", [
    (np.zeros((40, 48, 48), np.uint8), {"factor": 6}, "makes slices between sections 4 pixels apart, not a slice 0.17 of the way between sections 6"),
    (np.zeros((16, 48, 48), np.uint8), {}, "at least 18 slices"),
    (np.zeros((48, 48), np.uint8), {}, "2 dimensions"),
    (np.zeros((40, 48, 48), np.uint8), {"target": np.zeros((40, 48, 48))}, "takes no target"),
])
def test_unusable_isotropic_training_volumes_are_refused_with_a_sentence(learnt_isotropic, volume, kwargs, message):
    with pytest.raises(InputError, match=message):
        drive(finetune("isotropic", volume, base=learnt_isotropic, iterations=2, **kwargs))


def test_a_volume_too_big_to_learn_from_in_memory_is_refused_before_training(learnt_isotropic, monkeypatch):
    monkeypatch.setattr("napari_emdiffuse.core.memory.available_bytes", lambda device=None: 2**20)
    with pytest.raises(InputError, match="crop a smaller block"):
        drive(finetune("isotropic", np.zeros((40, 48, 48), np.uint8), base=learnt_isotropic, iterations=2))


def test_an_anisotropic_volume_is_refused_as_isotropic_training_data():
    from napari_emdiffuse.core.isotropic import check_isotropic

    check_isotropic((10, 10, 10.5))
    with pytest.raises(InputError, match="40 x 10 x 10"):
        check_isotropic((40, 10, 10))


def test_cli_finetunes_an_isotropic_model_and_refuses_an_anisotropic_file(tmp_path, learnt_isotropic, capsys,
                                                                          monkeypatch):
    import json

    from napari_emdiffuse import cli

    monkeypatch.setattr(cli, "PRINT_SECONDS", 1e9)  # however slow the machine: one line for the first report
    from napari_emdiffuse.core.io import write_tiff
    from napari_emdiffuse.core.simulate import synthetic_volume

    volume = (synthetic_volume((20, 32, 32), seed=3) * 200 + 20).astype(np.uint8)
    write_tiff(tmp_path / "iso.tif", volume, (10.0, 10.0, 10.0), "nm")
    write_tiff(tmp_path / "aniso.tif", volume, (40.0, 10.0, 10.0), "nm")
    args = ["finetune", "--task", "isotropic", "--base", learnt_isotropic, "--iterations", "3", "--json"]
    assert main([*args, "--input", str(tmp_path / "iso.tif"), "-o", str(tmp_path / "m.npz")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"val_psnr_before", "improved", "steps"} <= set(summary) and "shift" not in summary
    assert main([*args[:-1], "--input", str(tmp_path / "iso.tif"), "-o", str(tmp_path / "m.npz"), "--overwrite"]) == 0
    out, err = capsys.readouterr()  # progress: a line every PRINT_SECONDS, not one per step, and the last step
    assert [line.split()[:2] for line in err.splitlines() if line.startswith("step")] == [["step", "3"]]
    assert "Validation PSNR" in out or "kept" in out
    assert main([*args, "--input", str(tmp_path / "aniso.tif"), "-o", str(tmp_path / "n.npz")]) == 2
    assert "isotropic volume" in capsys.readouterr().err
    assert main(["finetune", "--task", "denoise", "--input", str(tmp_path / "iso.tif"), "-o",
                 str(tmp_path / "d.npz")]) == 2  # a pair's task without its target


@pytest.mark.parametrize("adopt", [False, True])
def test_a_tuned_model_keeps_the_input_brightness_unless_asked_to_adopt_the_targets(pair, tiny_model, tmp_path,
                                                                                     adopt):
    from napari_emdiffuse.core.finetune import pair_tuning
    from napari_emdiffuse.core.models import load_model

    noisy, clean = pair
    brighter = 1.3 * clean + 0.2  # another detector setting: more gain, more offset
    tuning = pair_tuning("denoise", noisy, brighter, load_model(tiny_model), 1, 64, target_brightness=adopt)
    x0, cond, _ = next(tuning.batches(0))  # model space: targets and conditions of 64 random patches
    offset = float((x0.mean(dim=(1, 2, 3)) - cond.mean(dim=(1, 2, 3))).abs().mean())
    assert (offset > 0.3) if adopt else (offset < 0.02)  # brightness learnt only when asked for
    if adopt:  # and the tuned model says so: its results are not brought back to the input's brightness
        result = drive(finetune("denoise", noisy, brighter, base=tiny_model, iterations=30, lr=2e-3,
                                output=tmp_path / "tuned.npz", target_brightness=True))
        if result.improved:
            assert load_model(result.path).meta["brightness"] == "target"
