"""Train the bundled isotropic-reconstruction model (vEMDiffuse-i) on an isotropic FIB-SEM volume.

    python training/train_isotropic.py ../shared/data/em -o src/napari_emdiffuse/models/isotropic-fibsem.npz --minutes 80

Volume ``fibsem_iso10nm_a_250.tif`` (10 nm in z, y and x) is used in all three orientations: an isotropic volume
looks alike along each axis, so every axis can play z. The network is told where the slice it makes lies: the gap
between its two sections in lateral pixels (:data:`GAPS`, any real number in range) and the fraction of the way
across, so one model serves any z spacing, whole factor or not. Gaps come whole from the volume as recorded and in
half and three-quarter pixels from copies binned in y and x only (``--lateral-scales``: 20 nm pixels with 10 nm
between planes); gaps of 3.5 to 6.5 pixels (the common serial-section ratios) get most of the training.
``--init`` from a model with integer labels (the earlier ``"R:j"`` variants) first fills the position table from
that model's label embeddings, so training starts from what it knew.
The model is residual: it diffuses the difference between the slice and the motion-compensated interpolation of
its two neighbours (``core/flow.py``), which is small and learnt much faster than the slice itself. Volume ``b``
is held out for the benchmark (``benchmarks/isotropic_quality.py``). With ``--scales`` the volume is also shown
with coarser voxels (structures fewer pixels across, more change between sections), for volumes of other pixel sizes.
"""

from __future__ import annotations

import argparse
import functools

import tifffile
import torch
from common import add_arguments, fit, init_from

from napari_emdiffuse.core.isotropic import GAPS, interpolation_batches, oriented, sees_start
from napari_emdiffuse.core.network import UNet, UNetConfig, position_embedding
from napari_emdiffuse.core.normalize import Normalizer
from napari_emdiffuse.core.simulate import coarser_voxels

POSITIONS = 32  # the position table's gaps (up to 32 px) and fraction steps (1/32)
MAIN_GAPS = (3.5, 6.5)


def gap_weight(gap: float, main: float = 3.0) -> float:
    return main if MAIN_GAPS[0] <= gap <= MAIN_GAPS[1] else 1.0


def laterally_coarser(volume, scale: float):
    """The volume with its planes (axes 1 and 2) binned by ``1 / scale``, its plane spacing kept."""
    import torch.nn.functional as F

    planes = torch.from_numpy(volume.astype("float32"))[:, None]
    return F.interpolate(planes, scale_factor=scale, mode="area")[:, 0].numpy()


def positions_from_labels(net, source_meta: dict, source_state: dict) -> None:
    """Fill ``net.position_table`` from a model with labels ``"R:j"``: every node (gap, fraction) gets the
    embedding of the nearest label (whole factors within the source's, the nearest slice), so that the labels'
    own positions (R, j / R) get exactly the source's embedding (for R up to half the table's fraction steps)."""
    labels = source_meta["labels"]
    table = source_state["label_emb.weight"].float()
    factors = sorted({int(name.split(":")[0]) for name in labels})
    n = net.config.positions
    with torch.no_grad():
        for g in range(n):
            factor = min(max(g + 1, factors[0]), factors[-1])
            for f in range(n + 1):
                j = min(max(round(f / n * factor), 1), factor - 1)
                net.position_table[g, f] = table[int(labels[f"{factor}:{j}"])]
    exact = torch.tensor([(int(k.split(":")[0]), int(k.split(":")[1]) / int(k.split(":")[0])) for k in labels])
    error = (position_embedding(net.position_table, exact) - table[[int(i) for i in labels.values()]]).abs().max()
    print(f"position table filled from {len(labels)} labels: largest difference at theirs {error.item():.2e}",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, "src/napari_emdiffuse/models/isotropic-fibsem.npz", 80.0)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--flow-device", default="cpu",
                        help="where batches' motion-compensated starts are estimated: cuda lets a few batch-making "
                             "processes keep a GPU busy (on the CPU they are the bottleneck)")
    parser.add_argument("--invert", type=float, default=0.0,
                        help="fraction of examples in the other contrast convention (membranes bright)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="the voxel scales the volume is shown at (1: as recorded; 0.5: 20 nm voxels, each the "
                             "mean of 2x2x2), so the model serves coarser volumes too")
    parser.add_argument("--scale-shares", type=float, nargs="+", default=None,
                        help="the examples' share of each scale (default: equal)")
    parser.add_argument("--lateral-scales", type=float, nargs="*", default=[0.75, 0.5],
                        help="also show the volume binned in y and x only by 1 / S (gaps of fractions of pixels)")
    parser.add_argument("--main-weight", type=float, default=3.0,
                        help="how much more often gaps of 3.5-6.5 pixels are drawn than others")
    parser.add_argument("--lateral-share", type=float, default=0.35,
                        help="the examples' share of the laterally binned copies, together")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    volume = tifffile.imread(args.data / "fibsem_iso10nm_a_250.tif")
    volume = Normalizer.fit(volume)(volume)
    shares = args.scale_shares or [1.0] * len(args.scales)
    if len(shares) != len(args.scales):
        parser.error("give one --scale-shares value per --scales value")
    whole = sum(shares)
    lateral = args.lateral_share if args.lateral_scales else 0.0
    volumes, volume_shares, ratios = [], [], []
    for scale, share in zip(args.scales, shares):
        scaled = oriented(coarser_voxels(volume, scale))
        volumes += scaled
        volume_shares += [(1 - lateral) * share / whole / 3] * 3
        ratios += [1.0] * 3
        for lateral_scale in args.lateral_scales if scale == 1 else []:
            volumes += [laterally_coarser(v, lateral_scale) for v in scaled]
            volume_shares += [lateral / len(args.lateral_scales) / 3] * 3
            ratios += [lateral_scale] * 3
    net = UNet(UNetConfig(cond_channels=3, base=args.base, mults=(1, 2, 2, 4), blocks=1, attention=True, patch=2,
                          positions=POSITIONS))
    inherited = {}
    if args.init:
        from napari_emdiffuse.core.models import load_model

        source = load_model(args.init)
        if "labels" in source.meta and "label_emb.weight" in source.net.state_dict():
            init_from(net, args.init)
            positions_from_labels(net, source.meta, source.net.state_dict())
            inherited = {"init": str(args.init), "sampling": source.meta["sampling"]}
            args.init = None  # done here
    meta = {**inherited, "task": "isotropic", "script": "training/train_isotropic.py",
            "gaps": list(GAPS),
            "mode": "isotropic training data", "residual": True, "start": "motion",
            "description": "vEMDiffuse-i: slices anywhere between serial sections 2 to 16 pixels apart, trained on "
                           "10 nm isotropic FIB-SEM"
                           + (" in both contrast conventions (membranes dark or bright)." if args.invert else ".")}
    largest = int(GAPS[1] / min(ratios))
    weight = functools.partial(gap_weight, main=args.main_weight)
    fit(net, lambda seed: interpolation_batches(volumes, range(2, largest + 1), args.batch, args.patch, seed,
                                                weight, jitter=0.03, residual="motion", cache=False,
                                                start_condition=sees_start(net), invert=args.invert,
                                                device=args.flow_device, volume_shares=volume_shares,
                                                ratios=ratios, gaps=GAPS),
        meta, args)


if __name__ == "__main__":
    main()
