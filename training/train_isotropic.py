"""Train the bundled isotropic-reconstruction model (vEMDiffuse-i) on an isotropic FIB-SEM volume.

    python training/train_isotropic.py ../shared/data/em -o src/napari_emdiffuse/models/isotropic-fibsem.npz --minutes 80

Volume ``fibsem_iso10nm_a_250.tif`` (10 nm in z, y and x) is used in all three orientations: an isotropic volume
looks alike along each axis, so every axis can play z. Every factor R from 2 to 10 and every slice j between two
kept slices is a label of one model; R = 4 and R = 6 (the common serial-section ratios) get most of the training.
The model is residual: it diffuses the difference between the slice and the motion-compensated interpolation of
its two neighbours (``core/flow.py``), which is small and learnt much faster than the slice itself. Volume ``b``
is held out for the benchmark (``benchmarks/isotropic_quality.py``). With ``--scales`` the volume is also shown
with coarser voxels (structures fewer pixels across, more change between sections), for volumes of other pixel sizes.
"""

from __future__ import annotations

import argparse

import tifffile
import torch
from common import add_arguments, fit

from napari_emdiffuse.core.isotropic import FACTORS, LABELS, interpolation_batches, oriented, sees_start
from napari_emdiffuse.core.network import UNet, UNetConfig
from napari_emdiffuse.core.normalize import Normalizer
from napari_emdiffuse.core.simulate import coarser_voxels

MAIN_FACTORS = (4, 6)


def factor_weights(main_share: float = 0.6) -> list[float]:
    others = [f for f in FACTORS if f not in MAIN_FACTORS]
    return [main_share / len(MAIN_FACTORS) if f in MAIN_FACTORS else (1 - main_share) / len(others) for f in FACTORS]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, "src/napari_emdiffuse/models/isotropic-fibsem.npz", 80.0)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--flow-device", default="cpu",
                        help="where batches' motion-compensated starts are estimated: cuda lets a few batch-making "
                             "processes keep a GPU busy (on the CPU they are the bottleneck)")
    parser.add_argument("--cache-starts", action="store_true",
                        help="compute each plane pair's start once, over the whole planes as in reconstruction, and "
                             "keep it (about 4 GB per batch process): 2.5x the steps in 65 minutes on 2 CPU cores")
    parser.add_argument("--invert", type=float, default=0.0,
                        help="fraction of examples in the other contrast convention (membranes bright)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="the voxel scales the volume is shown at (1: as recorded; 0.5: 20 nm voxels, each the "
                             "mean of 2x2x2), so the model serves coarser volumes too")
    parser.add_argument("--scale-shares", type=float, nargs="+", default=None,
                        help="the examples' share of each scale (default: equal)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    volume = tifffile.imread(args.data / "fibsem_iso10nm_a_250.tif")
    volume = Normalizer.fit(volume)(volume)
    shares = args.scale_shares or [1.0] * len(args.scales)
    if len(shares) != len(args.scales):
        parser.error("give one --scale-shares value per --scales value")
    volumes, volume_shares = [], []
    for scale, share in zip(args.scales, shares):
        scaled = coarser_voxels(volume, scale)
        volumes += oriented(scaled)
        volume_shares += [share / 3] * 3
    net = UNet(UNetConfig(cond_channels=3, base=args.base, mults=(1, 2, 2, 4), blocks=1, attention=True, patch=2,
                          num_labels=len(LABELS)))
    meta = {"task": "isotropic", "script": "training/train_isotropic.py", "labels": LABELS,
            "factors": list(FACTORS), "mode": "isotropic training data", "residual": True, "start": "motion",
            "description": "vEMDiffuse-i: slices between serial sections, trained on 10 nm isotropic FIB-SEM"
                           + (" in both contrast conventions (membranes dark or bright)." if args.invert else ".")}
    fit(net, lambda seed: interpolation_batches(volumes, FACTORS, args.batch, args.patch, seed, factor_weights(),
                                                jitter=0.03, residual="motion", cache=args.cache_starts,
                                                start_condition=sees_start(net), invert=args.invert,
                                                device=args.flow_device, volume_shares=volume_shares),
        meta, args)


if __name__ == "__main__":
    main()
