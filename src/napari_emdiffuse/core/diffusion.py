"""Noise schedule, training loss and samplers: one consistent formulation for training and sampling.

We use the continuous-noise-level formulation of Karras et al. (EDM, 2022): a training target ``x0`` is noised as
``x = x0 + sigma * n`` and the network, wrapped by :func:`precondition`, returns ``D(x, sigma) ~= E[x0 | x, cond]``.
Because the network only ever sees noise levels (not step indices), any sampler on any subset of levels is
consistent with training: this is what the reference's shortened DDPM schedules got wrong.

Sampling starts from the condition plus noise, ``x = cond + sigma_max * n`` (as ResShift starts from the degraded
image): with sigma_max well above the degradation the network cannot tell the difference, and the chain needs
far fewer steps than starting from pure noise at sigma = 80. "Well above" matters: the start carries the
condition's own noise, and at sigma = 1 the network sees the same noise pattern in the start and in the condition
and keeps it as structure (strong SEM noise came through almost untouched): denoising and super-resolution start
at 3 or more.
The last step returns ``D(x, sigma_end)``: the lower sigma_end, the more sampled fine texture each sample keeps.
For denoising, texture that the input does not determine is guessed, and it costs fidelity: on real SEM a
sigma_end near 1 (the estimate of what remains at that level) beats 0.15 on PSNR, SSIM and FSIM at once, while
the K samples still differ where the model is unsure.

Samplers are small generators over a *denoiser* ``denoiser(x, sigma)``, itself a generator that yields once
per unit of work (a batch of tiles) and returns the denoised estimate. ``x0 = yield from denoiser(x, sigma)`` passes
that progress through, so a GUI can report it and cancel between tiles.
Image values live in model space: normalised intensity mapped to [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator

import torch

SIGMA_DATA = 0.5
Denoiser = Callable[[torch.Tensor, float], Generator[int, None, torch.Tensor]]
Noise = Callable[[], torch.Tensor]


def scalings(sigma):
    """EDM's ``(c_skip, c_out, c_in)`` for noise level(s) ``sigma`` (a float or a tensor)."""
    total = (sigma**2 + SIGMA_DATA**2) ** 0.5
    return SIGMA_DATA**2 / total**2, sigma * SIGMA_DATA / total, 1 / total


def precondition(net, x: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor,
                 label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """EDM preconditioning: returns ``(D, F, log_phi)`` with ``D = c_skip x + c_out F``.

    ``sigma`` has one value per batch element. ``log_phi`` (the difficulty head) is in units of ``F``.
    """
    if hasattr(net, "denoise"):  # a network that is its own denoiser (the authors' epsilon models)
        return net.denoise(x, cond, sigma, label), None, None
    c_skip, c_out, c_in = scalings(sigma.reshape(-1, 1, 1, 1))
    f, log_phi = net(c_in * x, cond, sigma.log().flatten() / 4, label)
    return c_skip * x + c_out * f, f, log_phi


def difficulty_in_image_units(log_phi: torch.Tensor, sigma: float) -> torch.Tensor:
    """phi expressed as an expected error of D, in normalised [0, 1] intensity units."""
    return log_phi.exp() * scalings(sigma)[1] / 2


def sample_training_sigmas(n: int, generator: torch.Generator | None = None,
                           p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    return (torch.randn(n, generator=generator) * p_std + p_mean).exp()


def training_log_sigma(sigma_end: float, sigma_max: float) -> tuple[float, float]:
    """``(mean, std)`` of log sigma covering a sampler's range [sigma_end, sigma_max] (for :func:`training_loss`)."""
    low, high = math.log(sigma_end), math.log(sigma_max)
    return (low + high) / 2, max((high - low) / 2, 0.25)


def training_loss(net, x0: torch.Tensor, cond: torch.Tensor, label: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, beta: float = 0.5,
                  log_sigma: tuple[float, float] = (-1.2, 1.2),
                  learns_difficulty: torch.Tensor | None = None) -> torch.Tensor:
    """Difficulty-aware denoising loss.

    With ``e = F - F_target`` (the EDM-weighted error), the per-pixel loss is the Gaussian negative log-likelihood
    ``e^2 / (2 phi^2) + log phi``: pixels the network finds hard get a large phi and stop dominating the gradient,
    and phi learns the expected error. Plain NLL lets the network give up on hard pixels; the beta-NLL weighting
    (Seitzer et al., 2022) multiplies by ``phi^(2 beta)`` (no gradient through it) to keep fitting them.
    Without a difficulty head this is the plain EDM loss. ``log_sigma`` (mean, std of log sigma) says which noise
    levels training spends its steps on: a model whose sampler only visits sigma in [0.15, 1] learns faster there.
    ``learns_difficulty`` (one bool per example, default all): where False, the example trains the estimate (weighted
    by phi as usual) but not phi. For targets that are themselves noisy acquisitions (a long-dwell image), whose
    error is mostly the target's own noise: no model can predict it, and phi fitted to it stops predicting errors.
    """
    sigma = sample_training_sigmas(x0.shape[0], generator, *log_sigma).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * noise
    _, f, log_phi = precondition(net, x, cond, sigma, label)
    c_skip, c_out, _ = scalings(s)
    err2 = (f - (x0 - c_skip * x) / c_out) ** 2
    if log_phi is None:
        return err2.mean()
    log_phi = log_phi.clamp(-7.0, 3.0)
    if learns_difficulty is not None:
        log_phi = torch.where(learns_difficulty.to(log_phi.device).reshape(-1, 1, 1, 1), log_phi, log_phi.detach())
    nll = 0.5 * err2 * torch.exp(-2 * log_phi) + log_phi
    return (nll * torch.exp(2 * beta * log_phi).detach()).mean()


def karras_sigmas(steps: int, sigma_end: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """``steps`` noise levels from sigma_max down to sigma_end, denser at low noise (Karras et al.)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if steps == 1:
        return [sigma_max]
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_end ** (1 / rho), sigma_max ** (1 / rho)
    return [float(s) for s in (hi + ramp * (lo - hi)) ** rho]


def euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, eta: float = 1.0):
    """DDIM-style ancestral sampler; ``eta = 0`` is the deterministic probability-flow (DDIM) solver."""
    for i, sigma in enumerate(sigmas):
        x0 = yield from denoiser(x, sigma)
        if i == len(sigmas) - 1:
            return x0
        nxt = sigmas[i + 1]
        sigma_up = min(nxt, eta * math.sqrt(max(nxt**2 * (sigma**2 - nxt**2) / sigma**2, 0.0)))
        sigma_down = math.sqrt(nxt**2 - sigma_up**2)
        x = x0 + (x - x0) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + noise() * sigma_up
    return x


def dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, eta: float = 1.0):
    """Second-order multistep DPM-Solver++ (SDE variant, midpoint correction), in log-sigma time."""
    previous, h_previous = None, None
    for i, sigma in enumerate(sigmas):
        x0 = yield from denoiser(x, sigma)
        if i == len(sigmas) - 1:
            return x0
        nxt = sigmas[i + 1]
        h = math.log(sigma) - math.log(nxt)
        eta_h = eta * h
        x = (nxt / sigma) * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * x0
        if previous is not None:
            r = h_previous / h
            x = x + 0.5 * (-math.expm1(-h - eta_h)) / r * (x0 - previous)
        if eta > 0:
            x = x + noise() * nxt * math.sqrt(-math.expm1(-2 * eta_h))
        previous, h_previous = x0, h
    return x


def authors_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, eta: float = 1.0):
    """The EMDiffuse authors' sampler: ancestral DDPM, each step drawing from the posterior q(y_{t-1} | y_t, y0) at
    the denoiser's estimate of y0, over ``sigmas`` (their test schedule, see ``guided_unet.authors_sigmas``).

    Written in their variables ``y = x sqrt(g)``, ``g = 1 / (1 + sigma^2)``; ``eta`` is not used (the posterior
    fixes the noise).
    """
    gammas = [1 / (1 + s * s) for s in sigmas] + [1.0]
    for i, sigma in enumerate(sigmas):
        x0 = yield from denoiser(x, sigma)
        g, g_prev = gammas[i], gammas[i + 1]
        if i == len(sigmas) - 1:
            return x0
        alpha = g / g_prev
        beta = 1 - alpha
        y = x * math.sqrt(g)
        mean = (beta * math.sqrt(g_prev) / (1 - g)) * x0 + ((1 - g_prev) * math.sqrt(alpha) / (1 - g)) * y
        std = math.exp(0.5 * math.log(max(beta * (1 - g_prev) / (1 - g), 1e-20)))
        x = (mean + noise() * std) / math.sqrt(g_prev)
    return x


# eta = 0: deterministic (DDIM); "authors" runs only on the authors' schedule (tasks.sampling_sigmas)
SAMPLERS = {"euler_ancestral": euler_ancestral, "dpmpp_2m_sde": dpmpp_2m_sde, "authors": authors_ancestral}

