"""How many learning steps self-supervised isotropic reconstruction (vEMDiffuse-a) needs before its model beats the
motion-compensated interpolation it starts from, judged as the plugin judges it (core/isotropic.py
``judge_learnt``: planes kept aside, the lateral task it learnt, several sampling seeds, ``finetune.judge``).

    python benchmarks/self_supervised_budget.py ../shared/data/em/fibsem_iso10nm_b_250.tif --minutes 6

An isotropic FIB-SEM volume is cropped and made anisotropic (every R-th slice kept); the model learns from its
first x columns as the plugin does, and its exponential moving average of the weights is kept every
``--every`` minutes of learning; each is then judged on the columns kept aside. Steps, not minutes, carry over to
other machines: the CPU here (2 cores, shared) sets the minutes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import tifffile

import napari_emdiffuse.core.train as train_module
from napari_emdiffuse.core.isotropic import judge_learnt, lateral_truth, self_supervised, split_aside
from napari_emdiffuse.core.normalize import Normalizer
from napari_emdiffuse.core.tasks import Settings

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("volume", type=Path, help="an isotropic volume (z, y, x)")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--crop", type=int, nargs=3, default=(250, 160, 200), help="z y x of the isotropic crop")
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--every", type=float, default=0.5, help="minutes of learning between kept models")
    parser.add_argument("--out", type=Path, default=RESULTS / "self_supervised_budget.json")
    args = parser.parse_args()

    iso = tifffile.imread(args.volume)
    z, y, x = (min(c, n) for c, n in zip(args.crop, iso.shape))
    volume = np.ascontiguousarray(iso[:z, :y, :x][:: args.factor])  # an anisotropic acquisition of the block
    learn, aside = split_aside(volume, args.factor)
    truth = lateral_truth(aside, args.factor)
    norm = Normalizer.fit(volume)
    kept = []
    original = train_module.train

    def train_keeping(*a, **k):  # the plugin's training, with the moving average handed out every --every minutes
        return original(*a, **{**k, "checkpoint_minutes": args.every})

    train_module.train = train_keeping
    try:
        job = self_supervised(learn, args.factor, args.minutes)
        while True:
            try:
                p = next(job)
            except StopIteration as stop:
                model = stop.value
                break
            if p.checkpoint is not None:
                kept.append((p.step, p.seconds, copy.deepcopy(p.checkpoint)))
    finally:
        train_module.train = original
    kept.append((p.step, p.seconds, model.net))
    rows = []
    for step, seconds, net in kept:
        verdict = judge_learnt(dataclasses.replace(model, net=net), truth, args.factor, norm, Settings())
        try:
            while True:
                next(verdict)
        except StopIteration as stop:
            v = stop.value
        rows.append({"step": step, "minutes": round(seconds / 60, 2), "psnr_model": round(v.after, 3),
                     "psnr_start": round(v.before, 3), "gain": round(v.gain, 3), "spread": round(v.spread, 3),
                     "beats_start": v.improved})
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"volume": args.volume.name, "crop": [z, y, x], "factor": args.factor,
                                    "learnt_from": list(learn.shape), "validation_planes": list(truth.shape),
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
