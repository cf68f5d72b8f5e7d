import numpy as np
import pytest

from napari_emdiffuse.core.simulate import SEMNoise, synthetic_em


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small, untrained model file: exercises every code path in milliseconds."""
    import torch

    from napari_emdiffuse.core.models import save_model
    from napari_emdiffuse.core.network import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(base=8, mults=(1, 2), patch=2))
    for p in net.parameters():  # untrained zero-initialised branches would make the net the identity
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("models") / "tiny.npz"
    save_model(net, {"task": "denoise", "name": "tiny", "sampling": {"steps": 3}}, path)
    return str(path)


@pytest.fixture
def em_pair():
    """A clean synthetic EM image (uint8) and a short-dwell-like noisy version of it."""
    clean = synthetic_em((128, 160), seed=3)
    noisy = SEMNoise(electrons=40, read=0.02)(clean, np.random.default_rng(0))
    to8 = lambda a: np.clip(a * 180 + 40, 0, 255).astype(np.uint8)  # noqa: E731
    return to8(clean), to8(noisy)
