"""Train the authors' EMDiffuse-n network briefly, the authors' way, and save it in the authors' checkpoint format.

    python training/train_authors_denoise.py ../shared/data/em -o runs/authors-n/best_Network.pth --minutes 20

The network is the authors' configuration (``GuidedConfig()``: 32 channels, mults 1-2-4-8, two residual blocks
per level, attention in the middle, dropout 0.2; 15.7 M parameters; ``--width 16``: their 16-channel variant, 3.9 M,
about four times cheaper) trained as their ``Network.forward`` does: a
step ``t`` of the 2000-step linear schedule (1e-6 -> 1e-2), the noise level drawn uniformly between the cumulative
alphas of ``t - 1`` and ``t``, epsilon prediction, mean squared error. Data: the top half of the real SEM pair
(short-dwell input, long-dwell target), normalised as our pipeline normalises the input (its percentiles, then
[-1, 1]), random 128 x 128 crops with flips and rotations. The file is what their ``save_network`` writes:
``denoise_fn.``-prefixed weights plus the schedule's buffers. It is only a stand-in for the authors' weights
(minutes on two CPU cores instead of days on GPUs): it exists to measure samplers and step counts
(``benchmarks/authors_steps.py``), not to be good. Over 60 MB: it stays in the git-ignored ``runs/``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_emdiffuse.core.guided_unet import (
    SCHEDULE_BUFFERS,
    TRAIN_SCHEDULE,
    GuidedConfig,
    GuidedUNet,
    infer_config,
    linear_gammas,
    network_from_tensors,
    network_tensors,
    read_state_dict,
)
from napari_emdiffuse.core.normalize import Normalizer


def authors_state_dict(net: GuidedUNet) -> dict[str, torch.Tensor]:
    gammas = linear_gammas(TRAIN_SCHEDULE)
    state = {f"denoise_fn.{k}": v.detach().cpu().float() for k, v in net.state_dict().items()}
    for name in SCHEDULE_BUFFERS:  # only gammas matters to anyone; the others are saved as their module saves them
        state[name] = torch.tensor(gammas, dtype=torch.float32)
    return state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="continue from this checkpoint (authors' format)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids thrashing a busy CPU)")
    parser.add_argument("--width", type=int, default=32, help="inner_channel (the authors' 32; 16 is their small one)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    noisy = tifffile.imread(args.data / "sem_pair22_noisy.tif")
    clean = tifffile.imread(args.data / "sem_pair22_clean.tif")
    half = noisy.shape[0] // 2  # the bottom half is held out for the benchmark
    norm = Normalizer.fit(noisy[:half])
    cond_all = torch.from_numpy(norm(noisy[:half]) * 2 - 1).float()
    target_all = torch.from_numpy(norm(clean[:half]) * 2 - 1).float()

    net = GuidedUNet(GuidedConfig(inner_channel=args.width))
    for module in net.modules():  # residual branches and the output start at zero, as in the authors' code
        if hasattr(module, "out_layers"):
            torch.nn.init.zeros_(module.out_layers[3].weight)
            torch.nn.init.zeros_(module.out_layers[3].bias)
    torch.nn.init.zeros_(net.out[2].weight)
    torch.nn.init.zeros_(net.out[2].bias)
    if args.init:  # read as any user's checkpoint is: tensors only, checked against the network
        tensors = network_tensors(read_state_dict(args.init))
        net = network_from_tensors(tensors, infer_config(tensors))
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    gammas = torch.tensor(linear_gammas(TRAIN_SCHEDULE), dtype=torch.float32)
    args.output.parent.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    last_save, step, losses = started, 0, []
    while time.perf_counter() - started < args.minutes * 60:
        h, w = cond_all.shape
        crops_c, crops_t = [], []
        for _ in range(args.batch):
            y, x = rng.integers(0, h - args.patch), rng.integers(0, w - args.patch)
            c = cond_all[y:y + args.patch, x:x + args.patch]
            t = target_all[y:y + args.patch, x:x + args.patch]
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            c, t = torch.rot90(c, k), torch.rot90(t, k)
            if flip:
                c, t = c.flip(-1), t.flip(-1)
            crops_c.append(c)
            crops_t.append(t)
        cond = torch.stack(crops_c)[:, None]
        y0 = torch.stack(crops_t)[:, None]
        t = torch.randint(1, len(gammas), (args.batch,))
        g = gammas[t - 1] + (gammas[t] - gammas[t - 1]) * torch.rand(args.batch)
        noise = torch.randn_like(y0)
        gv = g.reshape(-1, 1, 1, 1)
        y_t = gv.sqrt() * y0 + (1 - gv).sqrt() * noise
        with torch.autocast("cpu", torch.bfloat16):
            eps = net(torch.cat([cond, y_t], dim=1), g)
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 20 == 0:
            print(f"step {step} loss {np.mean(losses[-20:]):.4f} {time.perf_counter() - started:.0f} s", flush=True)
        if time.perf_counter() - last_save > 300:
            torch.save(authors_state_dict(net), args.output)
            last_save = time.perf_counter()
    torch.save(authors_state_dict(net), args.output)
    print(f"saved {args.output} after {step} steps", flush=True)


if __name__ == "__main__":
    main()
