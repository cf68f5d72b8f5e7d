"""Samplers are checked against a denoiser whose answer is known exactly: Gaussian data."""

import numpy as np
import pytest
import torch

from napari_emdiffuse.core.diffusion import (
    SAMPLERS,
    karras_sigmas,
    sample_training_sigmas,
    training_log_sigma,
    training_loss,
)
from napari_emdiffuse.core.network import UNet, UNetConfig
from napari_emdiffuse.core.tasks import drive

MU, S = 0.3, 0.2  # data: every pixel ~ N(MU, S^2)


def gaussian_denoiser(x, sigma):
    yield 1
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)  # the exact E[x0 | x]


def test_karras_sigmas_descend_from_max_to_end():
    sigmas = karras_sigmas(6, 0.02, 1.0)
    assert len(sigmas) == 6
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(0.02)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert karras_sigmas(1, 0.02, 1.0) == [1.0]


def test_training_noise_levels_concentrate_on_the_samplers_range():
    gen = torch.Generator().manual_seed(0)
    default = sample_training_sigmas(20000, gen)
    focused = sample_training_sigmas(20000, gen, *training_log_sigma(0.5, 1.0))
    share = lambda s: ((s >= 0.5) & (s <= 1.0)).float().mean().item()  # noqa: E731
    assert share(focused) > 0.65 and share(default) < 0.25


@pytest.mark.parametrize("name, eta", [("euler_ancestral", 1.0), ("euler_ancestral", 0.0), ("dpmpp_2m_sde", 1.0),
                                       ("dpmpp_2m_sde", 0.0)])
def test_samplers_draw_from_the_data_distribution(name, eta):
    gen = torch.Generator().manual_seed(0)
    noise = lambda: torch.randn(20000, generator=gen)  # noqa: E731
    sigmas = karras_sigmas(200, 0.002, 10.0)
    x = MU + (S**2 + sigmas[0] ** 2) ** 0.5 * noise()
    job = SAMPLERS[name](gaussian_denoiser, x, sigmas, noise, eta=eta)
    ticks = []
    samples = drive(job, ticks.append)
    assert len(ticks) == 200  # one denoiser call per step
    assert samples.mean().item() == pytest.approx(MU, abs=0.01)
    assert samples.std().item() == pytest.approx(S, rel=0.04)


def test_second_order_sampler_is_accurate_in_few_steps():
    gen = torch.Generator().manual_seed(1)
    noise = lambda: torch.randn(20000, generator=gen)  # noqa: E731
    sigmas = karras_sigmas(6, 0.002, 10.0)
    x = MU + (S**2 + 100) ** 0.5 * noise()
    samples = drive(SAMPLERS["dpmpp_2m_sde"](gaussian_denoiser, x, sigmas, noise))
    assert samples.mean().item() == pytest.approx(MU, abs=0.01)
    assert samples.std().item() == pytest.approx(S, rel=0.1)


def test_network_shapes_and_difficulty_head():
    net = UNet(UNetConfig(base=8, mults=(1, 2, 2), num_labels=5))
    x = torch.randn(2, 1, 32, 48)
    f, log_phi = net(x, x, torch.zeros(2), torch.tensor([1, 4]))
    assert f.shape == x.shape and log_phi.shape == x.shape
    with pytest.raises(ValueError, match="label"):
        net(x, x, torch.zeros(2))


@pytest.mark.slow
def test_training_reduces_the_difficulty_aware_loss():
    torch.manual_seed(0)
    net = UNet(UNetConfig(base=8, mults=(1, 2), patch=2))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x0 = torch.sin(4 * xx + 3 * yy)[None, None].repeat(8, 1, 1, 1) * 0.8
    cond = x0 + 0.3 * torch.randn(x0.shape, generator=gen)

    def mean_loss():
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return np.mean([training_loss(net, x0, cond, generator=g).item() for _ in range(20)])

    before = mean_loss()
    for _ in range(150):
        loss = training_loss(net, x0, cond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mean_loss() < before - 0.3


def test_examples_that_do_not_learn_difficulty_still_train_the_estimate_but_not_phi():
    class Outputs(torch.nn.Module):  # returns its parameters: the loss's gradient with respect to F and log phi
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Parameter(torch.zeros(4, 1, 8, 8))
            self.log_phi = torch.nn.Parameter(torch.zeros(4, 1, 8, 8))

        def forward(self, x, cond, noise_level, label):
            return self.f, self.log_phi

    net = Outputs()
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    learns = torch.tensor([True, False, True, False])
    training_loss(net, x0, x0, generator=torch.Generator().manual_seed(1), learns_difficulty=learns).backward()
    f_moves = net.f.grad.abs().flatten(1).sum(1)
    phi_moves = net.log_phi.grad.abs().flatten(1).sum(1)
    assert bool((f_moves > 0).all())
    assert bool((phi_moves[learns] > 0).all()) and bool((phi_moves[~learns] == 0).all())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_training_loop_learns_in_either_precision_and_keeps_float32_weights(precision):
    from napari_emdiffuse.core.train import train

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x0 = torch.sin(4 * xx + 3 * yy)[None, None].repeat(8, 1, 1, 1) * 0.8
    cond = x0 + 0.3 * torch.randn(x0.shape, generator=gen)
    net = UNet(UNetConfig(base=8, mults=(1, 2), patch=2))

    def mean_loss(model):
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return np.mean([training_loss(model, x0, cond, generator=g).item() for _ in range(20)])

    before = mean_loss(net)
    batches = iter(lambda: (x0, cond, None), None)
    trained = drive(train(net, batches, iterations=150, lr=2e-3, warmup=10, ema_decay=0.9, precision=precision))
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    assert mean_loss(trained) < before - 0.3
