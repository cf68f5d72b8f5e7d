"""Make the test fixtures of the authors' networks by running THEIR code (not ours) on seeded random weights.

Needs the reference code (github Luchixiang/EMDiffuse, MIT), which is not part of this project. Put its
``models/guided_diffusion_modules/{unet,unet_3d,nn}.py``, ``models/{EMDiffuse,vEMDiffuse}_network.py`` and
``core/base_network.py`` (with empty ``__init__.py`` files) in a folder and run, from this repository's root:

    PYTHONPATH=/tmp/refenv/ref python training/authors_fixtures.py

It writes ``src/napari_emdiffuse/_tests/data/authors_<kind>.pth`` (the state dict, as their training saves it:
``denoise_fn.`` names plus the schedule buffers) and ``authors_<kind>.npz`` (inputs, noise levels, slice indices and
their network's outputs; one posterior step of their sampler). Reduced width (16 channels, two levels of 16 channels, attention at
the second level as well as in the middle, two heads) keeps each file small; the layout is the full network's
(two residual blocks per level in the 2D network, one in the 3D one: both ways of reading the layout are tested).
"""

from pathlib import Path

import numpy as np
import torch
from models.EMDiffuse_network import Network as Network2D  # the reference code
from models.vEMDiffuse_network import Network as Network3D

OUT = Path(__file__).resolve().parent.parent / "src" / "napari_emdiffuse" / "_tests" / "data"
UNET = {"out_channel": 1, "inner_channel": 16, "channel_mults": [1, 1], "attn_res": [2], "num_head_channels": 8,
        "res_blocks": 2, "dropout": 0.2, "image_size": 32}
SCHEDULE = {"train": {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 0.01},
            "test": {"schedule": "linear", "n_timestep": 1000, "linear_start": 1e-4, "linear_end": 0.09}}


def make(kind: str, network_cls, in_channel: int, seed: int, res_blocks: int) -> None:
    torch.manual_seed(seed)
    net = network_cls(unet={**UNET, "in_channel": in_channel, "res_blocks": res_blocks}, beta_schedule=SCHEDULE, init_type="kaiming")
    with torch.no_grad():  # every tensor random (theirs starts some at zero, which would hide errors)
        for p in net.denoise_fn.parameters():
            p.normal_(0.0, 0.15)
    net.set_new_noise_schedule(phase="train")
    net.eval()
    torch.save(net.state_dict(), OUT / f"authors_{kind}.pth")

    x = torch.randn(3, in_channel, 32, 32)
    gammas = torch.tensor([0.9995, 0.3, 1e-4])
    args = (torch.tensor([0, 1, 4]),) if in_channel == 3 else ()
    with torch.no_grad():
        eps = net.denoise_fn(x, gammas, *args)

    # one step of their sampler on the test schedule: the posterior mean and log variance for given y_t and y0_hat
    net.set_new_noise_schedule(phase="test")
    t = torch.tensor([999, 500, 1])
    y_t, y0_hat = torch.randn(3, 1, 32, 32), torch.rand(3, 1, 32, 32) * 2 - 1
    mean, log_var = net.q_posterior(y_0_hat=y0_hat, y_t=y_t, t=t)
    arrays = {"x": x, "gammas": gammas, "eps": eps, "t": t, "y_t": y_t, "y0_hat": y0_hat, "posterior_mean": mean,
              "posterior_log_var": log_var.expand_as(mean)}
    if args:
        arrays["slice_index"] = args[0]
    np.savez_compressed(OUT / f"authors_{kind}.npz", **{k: v.numpy() for k, v in arrays.items()})
    print(kind, sum(p.numel() for p in net.denoise_fn.parameters()), "parameters")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    make("2d", Network2D, 2, seed=1, res_blocks=2)
    make("3d", Network3D, 3, seed=2, res_blocks=1)
