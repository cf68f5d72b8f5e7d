import numpy as np
import pytest

from napari_emdiffuse.core.simulate import SEMNoise, synthetic_em


def make_tiny_model(folder, task: str, name: str, **meta) -> str:
    """A small, untrained model file: exercises every code path in milliseconds."""
    import torch

    from napari_emdiffuse.core.models import save_model
    from napari_emdiffuse.core.network import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(base=8, mults=(1, 2), patch=2, num_labels=len(meta.get("labels", {})),
                          positions=32 if "gaps" in meta else 0, cond_channels=2 if task == "isotropic" else 1))
    for p in net.parameters():  # untrained zero-initialised branches would make the net the identity
        torch.nn.init.normal_(p, std=0.05)
    return str(save_model(net, {"task": task, "name": name, "sampling": {"steps": 3}, **meta}, folder / f"{name}.npz"))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir):
    return make_tiny_model(models_dir, "denoise", "tiny")


@pytest.fixture(scope="session")
def tiny_superres(models_dir):
    return make_tiny_model(models_dir, "superres", "tiny-sr", labels={"2": 0, "4": 1}, scales=[2, 4])


@pytest.fixture(scope="session")
def tiny_superres_x2(models_dir):
    """A x2-only super-resolution model, like the bundled one: x4 runs as two x2 steps."""
    return make_tiny_model(models_dir, "superres", "tiny-sr-x2", labels={"2": 0}, scales=[2])


@pytest.fixture(scope="session")
def tiny_isotropic(models_dir):
    """Told the position (gap, fraction) of each slice, as the bundled model is: any factor, sections 1-32 px apart."""
    return make_tiny_model(models_dir, "isotropic", "tiny-iso", gaps=[1, 32])


@pytest.fixture(scope="session")
def tiny_isotropic_labels(models_dir):
    """A model of whole factors only (labels "R:j"), as the earlier bundled ones and the authors' are."""
    from napari_emdiffuse.core.isotropic import LABELS

    return make_tiny_model(models_dir, "isotropic", "tiny-iso-labels", labels=LABELS)


@pytest.fixture(scope="session")
def learnt_isotropic(models_dir):
    """A small residual model that sees its motion-compensated start, as the bundled one does (R = 4 only)."""
    from napari_emdiffuse.core.isotropic import self_supervised
    from napari_emdiffuse.core.models import save_model
    from napari_emdiffuse.core.tasks import drive

    vol = np.random.default_rng(1).random((6, 48, 48)).astype(np.float32)
    model = drive(self_supervised(vol, 4, minutes=0.02, batch=2, patch=32))
    return str(save_model(model.net, {**model.meta, "name": "learnt-iso"}, models_dir / "learnt-iso.npz"))


@pytest.fixture
def em_pair():
    """A clean synthetic EM image (uint8) and a short-dwell-like noisy version of it."""
    clean = synthetic_em((128, 160), seed=3)
    noisy = SEMNoise(electrons=40, read=0.02)(clean, np.random.default_rng(0))
    to8 = lambda a: np.clip(a * 180 + 40, 0, 255).astype(np.uint8)  # noqa: E731
    return to8(clean), to8(noisy)
