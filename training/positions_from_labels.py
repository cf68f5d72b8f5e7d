"""Turn an isotropic model of whole factors (labels ``"R:j"``) into one told the slices' positions, unchanged.

    python training/positions_from_labels.py isotropic-fibsem -o runs/iso_stage0.npz

The network is the same but for the label embedding, replaced by a position table (``core/network.py``) whose
nodes take the embeddings of the nearest labels: at the labels' own positions it computes exactly what the source
did. Training continues from it (``train_isotropic.py --init``), and ``average_weights.py`` can average the trained
model with it to keep what the source did best.
"""

from __future__ import annotations

import argparse
import time

from common import init_from
from train_isotropic import POSITIONS, positions_from_labels

from napari_emdiffuse.core.isotropic import GAPS
from napari_emdiffuse.core.models import load_model, save_model
from napari_emdiffuse.core.network import UNet, UNetConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="model name or file with labels R:j")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    source = load_model(args.source)
    if "labels" not in source.meta:
        raise SystemExit(f"{args.source} has no labels R:j to turn into positions.")
    config = {**source.net.config.to_dict(), "num_labels": 0, "positions": POSITIONS}
    net = UNet(UNetConfig.from_dict(config))
    init_from(net, args.source)
    positions_from_labels(net, source.meta, source.net.state_dict())
    meta = {k: v for k, v in source.meta.items() if k not in ("labels", "factors", "network", "name")}
    meta.update(gaps=list(GAPS), training={"converted from": args.source, "earlier": source.meta.get("training"),
                                           "script": "training/positions_from_labels.py",
                                           "date": time.strftime("%Y-%m-%d")})
    print(f"saved {save_model(net, meta, args.output)}")


if __name__ == "__main__":
    main()
