"""Record the sampling defaults chosen by measurement (benchmarks/*_quality.py --sweep) in a model file.

    python training/set_sampling.py src/napari_emdiffuse/models/denoise-sem.npz --sampler euler_ancestral \\
        --steps 6 --sigma-max 1.0 --sigma-end 0.05
"""

from __future__ import annotations

import argparse

from napari_emdiffuse.core.models import load_model, read_metadata, save_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--sampler", choices=["euler_ancestral", "dpmpp_2m_sde"])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eta", type=float)
    parser.add_argument("--sigma-max", type=float)
    parser.add_argument("--sigma-end", type=float)
    args = parser.parse_args()
    meta = read_metadata(args.model)
    chosen = {k: v for k, v in vars(args).items() if k != "model" and v is not None}
    meta["sampling"] = {**meta.get("sampling", {}), **chosen}
    net = load_model(args.model).net
    save_model(net, meta, args.model)
    print(f"{args.model}: sampling defaults {meta['sampling']}")


if __name__ == "__main__":
    main()
