"""Training and fine-tuning loop as a generator: yields progress, returns the averaged (EMA) network."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .diffusion import training_loss
from .triton_guard import keep_triton_out

# (target x0, condition, label or None) and optionally a fourth item: which examples teach the difficulty head,
# one bool each (see training_loss)
Batch = tuple[torch.Tensor | None, ...]


def augment(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    """The same random rotation by 90° steps and mirror for every array (condition and target stay aligned)."""
    k, flip = rng.integers(4), rng.random() < 0.5
    out = [np.rot90(a, k, axes=(-2, -1)) for a in arrays]
    return [np.ascontiguousarray(a[..., ::-1] if flip else a) for a in out]


def to_model_space(arrays: list[np.ndarray]) -> torch.Tensor:
    """Normalised (H, W) or (C, H, W) patches -> a float batch (N, C, H, W) in [-1, 1] units."""
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[:, None]
    return torch.from_numpy(stacked * 2 - 1).float()


@dataclass
class TrainProgress:
    step: int
    total: int | None  # None when training runs to a time budget
    loss: float
    seconds: float
    fraction: float  # of the iteration or time budget used
    checkpoint: torch.nn.Module | None = None  # the averaged weights, every ``checkpoint_minutes``: save or validate


def train(net: torch.nn.Module, batches: Iterator[Batch], *, iterations: int | None = None,
          minutes: float | None = None, lr: float = 2e-4, ema_decay: float = 0.999, seed: int = 0,
          device: str | torch.device = "cpu", report_every: int = 10, warmup: int = 200,
          checkpoint_minutes: float = 10.0, log_sigma: tuple[float, float] = (-1.2, 1.2),
          precision: str = "float32") -> Generator[TrainProgress, None, torch.nn.Module]:
    """Train ``net`` on ``(x0, cond, label)`` batches in model space until ``iterations`` or ``minutes`` run out.

    AdamW with a short warm-up and cosine decay over the budget, gradient clipping, and an exponential moving
    average of the weights (what is returned and checkpointed: it samples much better than the raw weights).
    ``log_sigma``: the training noise levels, see :func:`training_loss`. ``precision`` ``"bfloat16"`` runs the
    network under autocast (weights, optimiser and averages stay float32): 1.6-1.7x the steps per minute on a
    CPU with native bfloat16 (see :func:`~.tasks.pick_precision`).
    """
    if iterations is None and minutes is None:
        raise ValueError("give iterations or minutes")
    keep_triton_out()  # before the optimiser imports torch._dynamo (see core/triton_guard.py)
    device = torch.device(device)
    net = net.to(device).to(memory_format=torch.channels_last).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    start = last_checkpoint = time.perf_counter()
    running, step = None, 0

    def used() -> float:
        parts = []
        if iterations:
            parts.append(step / iterations)
        if minutes:
            parts.append((time.perf_counter() - start) / (60 * minutes))
        return max(parts)

    while used() < 1.0:
        x0, cond, label, *learns_difficulty = next(batches)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(used(), 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * cosine
        x0, cond = (t.to(device).contiguous(memory_format=torch.channels_last) for t in (x0, cond))
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bfloat16"):
            loss = training_loss(net, x0, cond, None if label is None else label.to(device), gen, log_sigma=log_sigma,
                                 learns_difficulty=learns_difficulty[0] if learns_difficulty else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # a step whose gradient overflowed (an example the network was confidently wrong on, in bfloat16) is
        # skipped: clipping an infinite norm would write NaN into every weight
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)):
            opt.step()
        step += 1
        decay = min(ema_decay, (1 + step) / (10 + step))  # average over fewer steps early on
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if math.isfinite(loss.item()):
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        due = time.perf_counter() - last_checkpoint > 60 * checkpoint_minutes
        if due or step % report_every == 0 or step == 1:
            yield TrainProgress(step, iterations, running, time.perf_counter() - start, min(used(), 1.0),
                                ema if due else None)
            if due:  # after the consumer's use of it: validation time does not count as a training interval
                last_checkpoint = time.perf_counter()
    net.eval()
    yield TrainProgress(step, iterations, running or float("nan"), time.perf_counter() - start, 1.0)
    return ema
