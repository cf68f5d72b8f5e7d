"""Average the weights of two training runs of one model (a "model soup", Wortsman et al. 2022).

    python training/average_weights.py denoise-sem gpu_run.npz -o src/napari_emdiffuse/models/denoise-sem.npz

Two runs continued from the same weights stay in one basin of the loss, so their average is a valid model that
often generalises better than either (measured for ``denoise-sem``: better than both on every benchmark set).
The result keeps the first model's metadata (task, labels, sampling defaults) and records both sources.
"""

from __future__ import annotations

import argparse
import time

from napari_emdiffuse.core.models import load_model, save_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="model name or file; its metadata is kept")
    parser.add_argument("second", help="model name or file of the same network")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--weight", type=float, default=0.5, help="share of the second model")
    parser.add_argument("--first-only", nargs="*", default=[], metavar="TENSOR",
                        help="weights taken from the first model alone (e.g. position_table: what the second never "
                             "learnt)")
    args = parser.parse_args()
    first, second = load_model(args.first), load_model(args.second)
    if first.meta["task"] != second.meta["task"] or first.meta["network"] != second.meta["network"]:
        raise SystemExit("The two models must be the same network for the same task.")
    a, b = first.net.state_dict(), second.net.state_dict()
    first.net.load_state_dict({k: a[k] if k in args.first_only else (1 - args.weight) * a[k] + args.weight * b[k]
                               for k in a})
    training = {"average": {"weight of the second": args.weight, "first only": args.first_only,
                            "first": first.meta.get("training"),
                            "second": second.meta.get("training")},
                "script": "training/average_weights.py", "date": time.strftime("%Y-%m-%d")}
    print(f"saved {save_model(first.net, {**first.meta, 'training': training}, args.output)}")


if __name__ == "__main__":
    main()
