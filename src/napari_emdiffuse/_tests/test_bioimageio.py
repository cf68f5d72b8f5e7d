"""BioImage.io model packages: the exported forward is our sampler, `bioimageio test` passes offline on a bundled
and a fine-tuned model, and a package is added back, checked as strictly as a model file, with the same results."""

import hashlib
import os
import socket
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("bioimageio.spec")

from napari_emdiffuse.core.bioimageio import (  # noqa: E402
    MODEL_FILE,
    BioImageIOError,
    export_package,
    import_package,
    linear_plan,
    read_package,
    restorer,
    synthetic_input,
)
from napari_emdiffuse.core.diffusion import SAMPLERS, karras_sigmas  # noqa: E402
from napari_emdiffuse.core.models import ModelFileError, export_model, import_model, load_model  # noqa: E402
from napari_emdiffuse.core.tasks import Settings, denoise, drive  # noqa: E402


@pytest.fixture
def offline(monkeypatch):
    """No network: any connection attempt fails the test (CI has no network; a package must not need one)."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert not attempts, f"tried to connect to {attempts}"


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.mark.parametrize("sampler, eta", [("euler_ancestral", 1.0), ("euler_ancestral", 0.0), ("dpmpp_2m_sde", 1.0)])
def test_the_packaged_plan_is_the_samplers_own_arithmetic(sampler, eta):
    sigmas = karras_sigmas(4, 0.1, 3.0)
    rng = np.random.default_rng(0)
    start = torch.from_numpy(rng.normal(size=(2, 5))).double()
    noises = [torch.from_numpy(rng.normal(size=(2, 5))).double() for _ in sigmas]
    nonlinear = lambda x: torch.tanh(x) * 0.7 + 0.1  # noqa: E731  (any denoiser)

    def denoiser(x, sigma):
        return nonlinear(x)
        yield

    drawn = iter(noises[1:])
    expected = drive(SAMPLERS[sampler](denoiser, start, sigmas, lambda: next(drawn), eta=eta))
    inputs, result = linear_plan(sampler, sigmas, eta)
    basis = [start] + [torch.zeros_like(start)] * len(sigmas) + noises[1:]
    for i in range(len(sigmas)):
        x = sum(float(c) * b for c, b in zip(inputs[i], basis))
        basis[1 + i] = nonlinear(x)
    replayed = sum(float(c) * b for c, b in zip(result, basis))
    assert torch.allclose(replayed, expected, atol=1e-5)


def test_another_seed_gives_other_samples(tiny_model):
    raw = torch.from_numpy(synthetic_input())[None, None]
    model = load_model(tiny_model)
    first, second = (restorer(model, samples=2, seed=seed)(raw)[0] for seed in (0, 1))
    assert not torch.equal(first, second) and torch.allclose(first, second, atol=0.2 * float(raw.std()))


def test_the_packaged_forward_restores_as_the_plugin_does():
    """Same network, normalisation, sampler, orientations and uncertainty; only the noise generator differs, so the
    two results differ by the sampling spread, not more; the same seed gives the same output, another seed not."""
    model = load_model("denoise-sem")
    module = restorer(model, samples=2, seed=0)
    raw = synthetic_input()
    image, spread = (t[0, 0].numpy() for t in module(torch.from_numpy(raw)[None, None]))
    plugin = drive(denoise(raw, model, Settings(samples=2, seed=0, precision="float32")))
    scale = np.percentile(raw, 99.5) - np.percentile(raw, 0.5)
    assert np.abs(image - plugin.image).mean() / scale < 0.5 * plugin.uncertainty.mean()
    assert spread.mean() == pytest.approx(plugin.uncertainty.mean(), rel=0.1)
    assert np.corrcoef(image.ravel(), plugin.image.ravel())[0, 1] > 0.99
    again, _ = module(torch.from_numpy(raw)[None, None])
    assert np.array_equal(again[0, 0].numpy(), image)
    odd = raw[:50, :37]  # any size: padded inside, cropped back
    assert module(torch.from_numpy(odd)[None, None])[0].shape == (1, 1, 50, 37)


def run_bioimageio_test(package) -> None:
    from bioimageio.core import test_description

    summary = test_description(package, runtime_env="currently-active")
    assert summary.status == "passed", summary.format()


@pytest.mark.slow
def test_bioimageio_test_passes_offline_on_a_bundled_and_a_fine_tuned_model(tmp_path, user_models, offline,
                                                                            tiny_superres, monkeypatch):
    from napari_emdiffuse.core import finetune as tuning
    from napari_emdiffuse.core.finetune import Verdict, finetune
    from napari_emdiffuse.core.simulate import synthetic_em

    # two steps rarely beat the base by more than the seed spread: keep the tuned model whatever validation says
    monkeypatch.setattr(tuning, "judge", lambda before, after: Verdict(True, before[0], after[0], 0.0, 0.0))

    bundled = export_package("denoise-sem", tmp_path / "denoise-sem.zip")
    run_bioimageio_test(bundled)
    clean = synthetic_em((384, 256), seed=1)
    low = clean.reshape(192, 2, 128, 2).mean(axis=(1, 3)) + np.random.default_rng(1).normal(0, 0.05, (192, 128))
    drive(finetune("superres", low.astype(np.float32), clean.astype(np.float32), base=tiny_superres, name="tuned",
                   iterations=2, scale=2, device="cpu"))
    tuned = export_model("tuned", tmp_path / "tuned.zip")  # a .zip: a package
    run_bioimageio_test(tuned)
    with zipfile.ZipFile(tuned) as z:
        names = set(z.namelist())
        assert {"rdf.yaml", "README.md", "cover.png", "restorer.pt", MODEL_FILE} <= names
        docs = z.read("README.md").decode()
    assert "stochastic" in docs and "law of total" in docs and "10.1038/s41467-024-49125-z" in docs
    assert read_package(tuned)[0]["model"] == "tuned"


def test_a_package_is_added_back_and_restores_exactly_as_its_model(tmp_path, user_models, offline, em_pair,
                                                                    tiny_model):
    from napari_emdiffuse.cli import main

    assert main(["models", "--export", tiny_model, str(tmp_path / "shared"), "--format", "bioimageio"]) == 2
    package = tmp_path / "shared.zip"  # written exactly where asked, or refused
    assert not (tmp_path / "shared").exists() and not package.exists()
    assert main(["models", "--export", tiny_model, str(package), "--format", "bioimageio"]) == 0
    assert main(["models", "--import", str(package)]) == 0
    added = load_model("shared", task="denoise")
    settings = Settings(samples=2, seed=5, tile=64, overlap=16)
    original = drive(denoise(em_pair[1], tiny_model, settings))
    again = drive(denoise(em_pair[1], added, settings))
    assert np.array_equal(again.image, original.image) and np.array_equal(again.uncertainty, original.uncertainty)
    assert main(["models", "--import", str(package)]) == 2  # the name is taken: refused, nothing replaced
    with pytest.raises(BioImageIOError, match="exists"):
        export_package(tiny_model, package)


class Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["EMDIFFUSE_PWNED_DIR"],))


def repacked(package, path, member: str, data: bytes, rehash: bool = True):
    """``package`` with ``member`` replaced by ``data`` (and its checksum in rdf.yaml updated if ``rehash``)."""
    with zipfile.ZipFile(package) as z:
        files = {n: z.read(n) for n in z.namelist()}
    if rehash:
        old, new = (hashlib.sha256(b).hexdigest().encode() for b in (files[member], data))
        files["rdf.yaml"] = files["rdf.yaml"].replace(old, new)
    files[member] = data
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return path


def test_packages_are_checked_as_strictly_as_model_files(tmp_path, user_models, offline, tiny_model, monkeypatch):
    package = export_package(tiny_model, tmp_path / "tiny.zip", samples=2)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("EMDIFFUSE_PWNED_DIR", str(marker))
    evil = tmp_path / "evil.npz"
    np.savez(evil, __meta__=np.array([Payload()], dtype=object), weight=np.zeros(3))
    with pytest.raises(ModelFileError, match="pickled objects"):  # a pickle inside a valid package: refused
        import_package(repacked(package, tmp_path / "pickled.zip", MODEL_FILE, evil.read_bytes()))
    assert not marker.exists()
    with pytest.raises(BioImageIOError, match="SHA256 mismatch"):  # changed after export
        import_model(repacked(package, tmp_path / "tampered.zip", MODEL_FILE, evil.read_bytes(), rehash=False))
    rdf = zipfile.ZipFile(package).read("rdf.yaml").replace(b"\n  napari-emdiffuse:\n", b"\n  other-tool:\n")
    with pytest.raises(BioImageIOError, match="not one of napari-emdiffuse"):  # someone else's model
        import_model(repacked(package, tmp_path / "other.zip", "rdf.yaml", rdf, rehash=False))
    (tmp_path / "broken.zip").write_bytes(package.read_bytes()[:5000])
    with pytest.raises(ModelFileError):
        import_model(tmp_path / "broken.zip")
    assert not list(user_models.glob("*")) if user_models.exists() else True  # nothing was added
    with pytest.raises(BioImageIOError, match="whole z factor"):  # a package's output size is a whole multiple
        export_package("isotropic-fibsem", tmp_path / "iso.zip", factor=12.5)
    assert not (tmp_path / "iso.zip").exists()


def test_the_model_menu_saves_and_adds_a_package(make_napari_viewer, tmp_path, user_models, offline, tiny_model,
                                                 monkeypatch):
    said = []
    monkeypatch.setattr("napari.utils.notifications.show_info", said.append)
    monkeypatch.setattr("napari.utils.notifications.show_error", said.append)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Denoise")
    picker = widget.model_picker
    picker.add_file(tiny_model)
    picker.save_current(str(tmp_path / "tiny-package.zip"))
    assert said[-1].startswith("Saved") and zipfile.is_zipfile(tmp_path / "tiny-package.zip")
    picker.add_file(str(tmp_path / "tiny-package.zip"))
    assert picker.currentText() == "tiny-package" and "Added" in said[-1]

    _, isotropic = viewer.window.add_plugin_dock_widget("napari-emdiffuse", "Isotropic reconstruction")
    isotropic.factor.setValue(12.5)  # a package is made for the widget's factor: a whole one
    isotropic.model_picker.save_current(str(tmp_path / "iso.zip"))
    assert "whole z factor" in said[-1] and not (tmp_path / "iso.zip").exists()
    isotropic.factor.setValue(6)
    isotropic.model_picker.save_current(str(tmp_path / "iso.zip"))
    assert said[-1].startswith("Saved") and read_package(tmp_path / "iso.zip")[0]["factor"] == 6


def test_an_isotropic_model_is_packaged_for_a_whole_factor_and_comes_back(tmp_path, user_models, offline):
    """The package's forward is the plugin's pipeline (motion estimation, then sampling) at the factor fixed at
    export: `bioimageio test` passes offline, the sections are kept, and the model added back gives the same."""
    import io

    from napari_emdiffuse.cli import main
    from napari_emdiffuse.core.isotropic import isotropic

    package = tmp_path / "iso.zip"
    for factor in ("2.5", "20", "nan", "inf", "1"):  # not whole; beyond the gaps served; no number: refused
        assert main(["models", "--export", "isotropic-fibsem", str(package), "--factor", factor]) == 2
    assert main(["models", "--export", "isotropic-fibsem", str(tmp_path / "iso.npz"), "--factor", "3"]) == 2
    assert main(["models", "--export", "denoise-sem", str(tmp_path / "d.zip"), "--factor", "3"]) == 2  # not isotropic
    assert not (tmp_path / "d.zip").exists()
    assert not package.exists()
    assert main(["models", "--export", "isotropic-fibsem", str(package), "--factor", "3"]) == 0
    run_bioimageio_test(package)
    with zipfile.ZipFile(package) as z:
        raw, restored, spread = (np.load(io.BytesIO(z.read(f"test_{t}.npy"))) for t in ("input", "restored",
                                                                                         "uncertainty"))
        docs = z.read("README.md").decode()
    assert "stochastic" in docs and "law of total" in docs and "z factor 3" in docs
    assert raw.shape == (1, 1, 4, 64, 64) and restored.shape == spread.shape == (1, 1, 10, 64, 64)
    np.testing.assert_array_equal(restored[0, 0, ::3], raw[0, 0])  # the acquired sections, exactly
    assert (spread[0, 0, ::3] == 0).all() and (spread[0, 0, 1::3] > 0).all()
    assert read_package(package)[0]["factor"] == 3

    assert main(["models", "--import", str(package), "--name", "iso_back"]) == 0
    settings = Settings(samples=2, seed=0, device="cpu", precision="float32")
    again = drive(isotropic(raw[0, 0], load_model("iso_back"), settings, 3, check_alignment=False))
    np.testing.assert_allclose(again.image, restored[0, 0], rtol=2e-5, atol=5e-4)
    np.testing.assert_allclose(again.uncertainty, spread[0, 0], rtol=2e-5, atol=1.2e-6)
