"""The authors' EMDiffuse networks: our implementation against their code's outputs, safe checkpoint reading, and
their checkpoints through the whole pipeline (tasks, CLI, chunked runner, model registry)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_emdiffuse.core.diffusion import authors_ancestral
from napari_emdiffuse.core.guided_unet import (
    CheckpointError,
    GuidedConfig,
    GuidedUNet,
    authors_sigmas,
    infer_config,
    load_checkpoint,
    network_from_tensors,
    network_tensors,
    read_state_dict,
    trained_sigma_range,
)
from napari_emdiffuse.core.models import ModelFileError, import_model, list_models, load_model, read_metadata
from napari_emdiffuse.core.tasks import Settings, denoise, drive

DATA = Path(__file__).parent / "data"


def reference(kind: str) -> tuple[GuidedUNet, dict]:
    """Our network holding the fixture's weights (made by training/authors_fixtures.py with the authors' code)."""
    tensors = network_tensors(read_state_dict(DATA / f"authors_{kind}.pth"))
    config = infer_config(tensors)
    config.num_head_channels = 8  # the fixture's (not stored in checkpoints; the authors' configurations use 32)
    with np.load(DATA / f"authors_{kind}.npz") as f:
        return network_from_tensors(tensors, config), dict(f)


@pytest.mark.parametrize("kind, res_blocks", [("2d", 2), ("3d", 1)])
def test_our_network_computes_what_the_authors_code_computes(kind, res_blocks):
    net, data = reference(kind)
    assert net.config.res_blocks == res_blocks and net.config.slice_embedding == (kind == "3d")
    assert net.config.in_channel == (3 if kind == "3d" else 2) and net.config.attn_res == (2,)
    index = torch.from_numpy(data["slice_index"]) if kind == "3d" else None
    with torch.no_grad():
        eps = net(torch.from_numpy(data["x"]), torch.from_numpy(data["gammas"]), index)
    assert np.abs(data["eps"]).max() > 0.1  # random weights everywhere: a real signal to compare
    np.testing.assert_allclose(eps.numpy(), data["eps"], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_the_authors_sampler_steps_to_their_posterior(kind):
    """One step of our authors_ancestral (in sigma space) lands where their q_posterior puts it (in y space)."""
    _, data = reference(kind)
    sigmas = authors_sigmas({})
    assert len(sigmas) == 1000 and sigmas[0] > 1e9 and sigmas[-1] == pytest.approx(0.01, rel=1e-3)
    for row, t in enumerate(data["t"]):
        s_t, s_prev = sigmas[999 - t], sigmas[1000 - t]
        g_t, g_prev = 1 / (1 + s_t**2), 1 / (1 + s_prev**2)
        y_t = torch.from_numpy(data["y_t"][row:row + 1]).double()
        x0 = torch.from_numpy(data["y0_hat"][row:row + 1]).double()
        for noise, expected in ((0.0, data["posterior_mean"][row]),
                                (1.0, data["posterior_mean"][row] + np.exp(0.5 * data["posterior_log_var"][row]))):
            seen = []

            def denoiser(x, sigma):
                seen.append(x)
                return x0
                yield

            drive(authors_ancestral(denoiser, y_t / g_t**0.5, [s_t, s_prev], lambda: torch.full_like(y_t, noise)))
            np.testing.assert_allclose((seen[1] * g_prev**0.5).numpy()[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("slice_embedding", [False, True])
def test_the_full_configuration_is_read_back_from_its_tensors(tmp_path, slice_embedding):
    config = GuidedConfig(in_channel=3 if slice_embedding else 2, slice_embedding=slice_embedding)
    net = GuidedUNet(config)
    size = sum(p.numel() for p in net.parameters())
    assert (16.5e6 < size < 16.8e6) if slice_embedding else (15.6e6 < size < 15.8e6)  # the authors' 15.7 M
    state = {f"denoise_fn.{k}": v for k, v in net.state_dict().items()} | {"gammas": torch.rand(2000)}
    torch.save(state, tmp_path / "best_Network.pth")
    tensors = network_tensors(read_state_dict(tmp_path / "best_Network.pth"))
    inferred = infer_config(tensors)
    assert inferred.channel_mults == (1, 2, 4, 8) and inferred.res_blocks == 2 and inferred.inner_channel == 32
    assert inferred.slice_embedding == slice_embedding and inferred.attn_res == ()  # [16] is never reached
    assert network_from_tensors(tensors, inferred) is not None


def tiny_checkpoint(folder: Path, kind: str = "2d", name: str = "best_Network.pth", seed: int = 0) -> Path:
    """A small checkpoint in the authors' format (their prefixes and schedule buffers), random non-zero weights."""
    torch.manual_seed(seed)
    net = GuidedUNet(GuidedConfig(in_channel=3 if kind == "3d" else 2, inner_channel=32, channel_mults=(1, 1),
                                  res_blocks=1, slice_embedding=kind == "3d"))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = folder / name
    torch.save({f"denoise_fn.{k}": v for k, v in net.state_dict().items()} | {"gammas": torch.rand(2000)}, path)
    return path


class Marker:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    payload = {"input_blocks.0.0.weight": torch.zeros(1), "x": Marker(marker)}
    if legacy:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path, "denoise")
    with pytest.raises(ModelFileError):
        import_model(path, task="denoise")
    assert not marker.exists()


def test_bad_checkpoints_are_refused_with_one_clear_reason(tmp_path):
    good = tiny_checkpoint(tmp_path)
    state = torch.load(good, weights_only=True)

    def saved(name, value):
        path = tmp_path / name
        torch.save(value, path)
        return path

    cases = {
        saved("nan.pth", {**state, "denoise_fn.out.2.bias": torch.tensor([float("nan")])}): "NaN",
        saved("shape.pth", {**state, "denoise_fn.out.2.bias": torch.zeros(2)}): "shape",
        saved("missing.pth", {k: v for k, v in state.items() if "middle_block.0" not in k}): "match",
        saved("extra.pth", {**state, "denoise_fn.more.weight": torch.zeros(1)}): "match",
        saved("ints.pth", {**state, "denoise_fn.out.2.bias": torch.zeros(1, dtype=torch.int64)}): "floating",
        saved("list.pth", [1, 2, 3]): "state dict",
        saved("other.pth", {"conv.weight": torch.zeros(3)}): "not an EMDiffuse",
    }
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    cases[truncated] = "not a readable"
    cases[tmp_path / "absent.pth"] = "not found"
    for path, reason in cases.items():
        with pytest.raises(CheckpointError, match=reason):
            load_checkpoint(path, "denoise")
    with pytest.raises(CheckpointError, match="cannot do isotropic"):
        load_checkpoint(good, "isotropic")  # a 2D network: the task needs the 3D-2D kind
    with pytest.raises(CheckpointError, match="cannot do denoise"):
        load_checkpoint(tiny_checkpoint(tmp_path, "3d", "vem.pth"), "denoise")


def test_the_denoiser_maps_our_noise_levels_onto_their_epsilon_model():
    """D(x, sigma) = x - sigma eps(sqrt(g) x, g), g = 1 / (1 + sigma^2), clipped to [-1, 1]."""
    net, _ = reference("2d")
    torch.manual_seed(0)
    x, cond = torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    sigma = torch.tensor([0.5, 3.0])
    g = 1 / (1 + sigma**2)
    with torch.no_grad():
        eps = net(torch.cat([cond, x * g.sqrt().reshape(-1, 1, 1, 1)], 1), g)
        expected = (x - sigma.reshape(-1, 1, 1, 1) * eps).clamp(-1, 1)
        np.testing.assert_allclose(net.denoise(x, cond, sigma).numpy(), expected.numpy(), atol=1e-5)
    low, high = trained_sigma_range({})
    assert low == pytest.approx(1e-3, rel=0.01) and 100 < high < 200


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


def test_a_checkpoint_denoises_directly_and_once_imported_with_the_same_result(tmp_path, user_dir):
    path = tiny_checkpoint(tmp_path)
    image = (np.random.default_rng(0).random((40, 56)) * 50000).astype(np.uint16)
    settings = Settings(samples=2, steps=3, tile=32, overlap=8, precision="float32")
    direct = drive(denoise(image, str(path), settings))
    assert direct.image.dtype == np.uint16 and direct.image.shape == image.shape
    assert direct.uncertainty.shape == image.shape and direct.uncertainty.max() > 0
    assert direct.info["steps"] == 3 and direct.info["reliable"] in (True, False)
    installed = import_model(path, name="authors-n", task="denoise")
    meta = read_metadata(installed)
    assert meta["architecture"] == "emdiffuse-guided" and meta["task"] == "denoise"
    assert meta["schedule"]["test"]["n_timestep"] == 1000
    assert [e.name for e in list_models("denoise") if not e.bundled] == ["authors-n"]
    again = drive(denoise(image, "authors-n", settings))  # weights stored as float32: the very same numbers
    np.testing.assert_array_equal(again.image, direct.image)
    with pytest.raises(ModelFileError, match="does not say its task"):
        import_model(path)
    with pytest.raises(ModelFileError, match="say which task"):
        load_model(path)


@pytest.mark.slow
def test_the_authors_sampler_runs_their_whole_schedule(tmp_path, user_dir):
    path = tiny_checkpoint(tmp_path)
    image = (np.random.default_rng(1).random((32, 32)) * 255).astype(np.uint8)
    result = drive(denoise(image, str(path), Settings(samples=1, tile=32, overlap=8, sampler="authors")))
    assert result.info["steps"] == 1000 and result.info["sampler"] == "authors"
    assert np.isfinite(result.image.astype(float)).all() and result.image.std() > 0


def test_the_authors_sampler_needs_an_authors_model(tiny_model):
    from napari_emdiffuse.core.normalize import InputError

    image = np.zeros((32, 32), np.uint8)
    with pytest.raises(InputError, match="authors' models"):
        drive(denoise(image, tiny_model, Settings(samples=1, tile=32, overlap=8, sampler="authors")))


def test_a_superres_checkpoint_makes_x2_and_x4_as_two_x2_steps(tmp_path, user_dir):
    from napari_emdiffuse.core.tasks import superres

    path = tiny_checkpoint(tmp_path)
    image = (np.random.default_rng(6).random((16, 12)) * 255).astype(np.uint8)
    x4 = drive(superres(image, str(path), Settings(samples=2, steps=1, tile=64, overlap=8), scale=4))
    assert x4.image.shape == (64, 48) and x4.info["passes"] == 2 and x4.uncertainty.max() > 0


def test_a_vem_checkpoint_reconstructs_a_volume(tmp_path, user_dir):
    from napari_emdiffuse.core.isotropic import isotropic

    path = tiny_checkpoint(tmp_path, "3d", "best_Network.pth")
    volume = (np.random.default_rng(2).random((3, 32, 40)) * 255).astype(np.uint8)
    result = drive(isotropic(volume, str(path), Settings(samples=2, steps=2, tile=32, overlap=8), factor=3))
    assert result.image.shape == (7, 32, 40)
    np.testing.assert_array_equal(result.image[::3], volume)
    assert result.uncertainty[1].max() > 0 and result.uncertainty[0].max() == 0


def test_the_cli_imports_a_checkpoint_and_runs_it_by_name_or_by_file(tmp_path, user_dir, capsys):
    from napari_emdiffuse.cli import main

    path = tiny_checkpoint(tmp_path)
    src = tmp_path / "noisy.tif"
    tifffile.imwrite(src, (np.random.default_rng(3).random((48, 48)) * 255).astype(np.uint8))
    assert main(["models", "--import", str(path)]) == 2
    assert "does not say its task" in capsys.readouterr().err
    assert main(["models", "--task", "denoise"]) == 2
    assert "go with --import" in capsys.readouterr().err
    assert main(["models", "--import", str(path)]) == 2
    assert "does not say its task" in capsys.readouterr().err
    assert main(["models", "--import", str(path), "--task", "isotropic"]) == 2
    assert "cannot do isotropic" in capsys.readouterr().err
    assert main(["models", "--import", str(path), "--task", "denoise", "--name", "theirs"]) == 0
    assert "imported as theirs" in capsys.readouterr().out
    for model in ("theirs", str(path)):
        out = tmp_path / f"out-{Path(model).stem}.tif"
        assert main(["denoise", str(src), "-o", str(out), "--model", model, "--steps", "2", "--tile", "64"]) == 0
        assert tifffile.imread(out).shape == (48, 48)
    evil = tmp_path / "evil.pth"
    torch.save({"x": Marker(tmp_path / "ran")}, evil)
    assert main(["denoise", str(src), "-o", str(tmp_path / "e.tif"), "--model", str(evil)]) == 2
    assert "refused" in capsys.readouterr().err and not (tmp_path / "ran").exists()
    assert not (tmp_path / "e.tif").exists()


def test_the_chunked_runner_takes_a_checkpoint(tmp_path, user_dir):
    import zarr

    from napari_emdiffuse.core.chunked import ChunkedTask, restore_volume

    path = tiny_checkpoint(tmp_path)
    data = (np.random.default_rng(4).random((2, 48, 48)) * 255).astype(np.uint8)
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=data.shape, chunks=(1, 48, 48),
                             dtype=np.uint8)
    source[:] = data
    drive(restore_volume(str(tmp_path / "in.zarr"), tmp_path / "out.zarr", ChunkedTask("denoise", 1),
                         model=str(path), settings=Settings(samples=2, steps=2, tile=32, overlap=8), chunk=(1, 32, 32)))
    assert (tmp_path / "out.zarr").exists()


def test_the_denoise_widget_adds_a_checkpoint_after_asking_its_task_and_runs_it(make_napari_viewer, qtbot, tmp_path,
                                                                                user_dir, monkeypatch):
    said = []
    monkeypatch.setattr("napari.utils.notifications.show_info", said.append)
    monkeypatch.setattr("napari.utils.notifications.show_error", said.append)
    viewer = make_napari_viewer()
    noisy = (np.random.default_rng(5).random((64, 64)) * 255).astype(np.uint8)
    viewer.add_image(noisy, name="noisy")
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Denoise")
    picker = widget.model_picker
    path = tiny_checkpoint(tmp_path)
    asked = []
    monkeypatch.setattr(type(picker), "ask_task", lambda self, p: asked.append(p) or None)  # the user cancels
    picker.add_file(str(path))
    assert asked == [str(path)] and picker.findText("best_Network") < 0 and not said
    monkeypatch.setattr(type(picker), "ask_task", lambda self, p: "isotropic")  # the wrong kind of network
    picker.add_file(str(path))
    assert said[-1].startswith("The model was not added") and "cannot do isotropic" in said[-1]
    monkeypatch.setattr(type(picker), "ask_task", lambda self, p: "denoise")
    picker.add_file(str(path))
    assert picker.currentText() == "best_Network" and said[-1].startswith("Added")
    widget.steps.setValue(2)
    widget.findChild(type(widget.run_button), "run_button").click()
    qtbot.waitUntil(lambda: "noisy_denoised_uncertainty" in viewer.layers and widget.worker is None, timeout=60_000)
    assert viewer.layers["noisy_denoised"].data.shape == noisy.shape


def test_a_model_file_describing_a_giant_authors_network_is_refused_before_building_it(tmp_path):
    import json

    meta = {"format": "napari-emdiffuse-model", "task": "denoise", "architecture": "emdiffuse-guided",
            "network": {**GuidedConfig().to_dict(), "inner_channel": 1_000_000}}
    path = tmp_path / "giant.npz"
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with pytest.raises(ModelFileError, match="not a configuration of the authors' networks"):
        load_model(path)


def test_a_network_without_a_difficulty_head_adds_no_difficulty_to_the_uncertainty(tmp_path):
    """The uncertainty of the authors' networks is the spread between the samples alone."""
    from napari_emdiffuse.core.tiling import TiledDenoiser

    model = load_model(tiny_checkpoint(tmp_path), task="denoise")
    denoiser = TiledDenoiser(model.net, torch.zeros(1, 1, 32, 32), 32, 8, 2, torch.device("cpu"))
    drive(denoiser(torch.randn(2, 1, 32, 32), 20.0))
    assert denoiser.first_log_phi is None


def test_fine_tuning_refuses_an_authors_network_with_one_clear_sentence(tmp_path, user_dir):
    from napari_emdiffuse.core.finetune import finetune
    from napari_emdiffuse.core.normalize import InputError

    installed = import_model(tiny_checkpoint(tmp_path), name="theirs", task="denoise")
    image = np.zeros((64, 64), np.uint8)
    with pytest.raises(InputError, match="authors' networks"):
        drive(finetune("denoise", image, image, base=str(installed), iterations=1, device="cpu"))
