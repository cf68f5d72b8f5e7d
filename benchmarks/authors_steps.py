"""Quality and time per number of steps for the authors' EMDiffuse networks: our samplers on their training noise
levels against their own 1000-step ancestral schedule. It chose the default sampling of imported authors' models
(``core.guided_unet.SAMPLING``).

    python training/train_authors_denoise.py ../shared/data/em -o runs/authors-n/stage1.pth --width 16 \
        --minutes 22 --batch 2 --patch 128 --lr 3e-4                                      # 79 steps (a busy CPU)
    python training/train_authors_denoise.py ../shared/data/em -o runs/authors-n/best_Network.pth \
        --init runs/authors-n/stage1.pth --minutes 11 --batch 2 --patch 128 --lr 3e-4 --seed 1 --threads 1  # 971
    python benchmarks/authors_steps.py runs/authors-n/best_Network.pth ../shared/data/em --threads 1

Data: a central crop of the held-out bottom half of the real SEM pair (short-dwell input, long-dwell truth).
Each setting draws one sample with the same seed (the quality of a sample, not of a mean of several), runs the whole
pipeline (tiles, normalisation, dtype round trip) and is timed on this machine. Results go to
``benchmarks/results/authors_steps.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import tifffile

sys.path.insert(0, str(Path(__file__).parent))
from _common import metrics  # noqa: E402

from napari_emdiffuse.core.models import load_model  # noqa: E402
from napari_emdiffuse.core.tasks import Settings, denoise, drive  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# (sampler, eta, sigma_max): DDIM (first order, deterministic), DPM-Solver++(2M) deterministic, both from pure noise
# at the top of the training range (~148) and from the noisy image plus noise at lower levels (as our models start)
SETTINGS = [("euler_ancestral", 0.0, 148.0), ("dpmpp_2m_sde", 0.0, 148.0), ("dpmpp_2m_sde", 0.0, 20.0),
            ("dpmpp_2m_sde", 0.0, 5.0), ("euler_ancestral", 1.0, 20.0)]
STEPS = (5, 10, 20, 50)


def run(model, image, truth, settings: Settings) -> dict:
    started = time.perf_counter()
    result = drive(denoise(image, model, settings))
    seconds = time.perf_counter() - started
    return {**metrics(result.image, truth), "seconds": round(seconds, 2), "steps": result.info["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--skip-authors", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a CPU shared with others)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    noisy = tifffile.imread(args.data / "sem_pair22_noisy.tif")
    clean = tifffile.imread(args.data / "sem_pair22_clean.tif")
    half = noisy.shape[0] // 2
    y0, x0 = half + (half - args.crop) // 2, (noisy.shape[1] - args.crop) // 2
    image = noisy[y0:y0 + args.crop, x0:x0 + args.crop]
    truth = clean[y0:y0 + args.crop, x0:x0 + args.crop]
    base = load_model(args.checkpoint, task="denoise")
    rows = [{"setting": "input (noisy)", **metrics(image, truth)}]
    print(rows[-1], flush=True)
    for sampler, eta, sigma_max in SETTINGS:
        model = dataclasses.replace(base, sampling={**base.sampling, "sigma_max": sigma_max, "sigma_end": 0.01})
        for steps in STEPS:
            settings = Settings(samples=1, steps=steps, sampler=sampler, eta=eta, seed=0)
            rows.append({"setting": f"{sampler} eta={eta} sigma_max={sigma_max}", **run(model, image, truth, settings)})
            print(rows[-1], flush=True)
    if not args.skip_authors:
        rows.append({"setting": "authors (1000-step ancestral, 1e-4 -> 0.09)",
                     **run(base, image, truth, Settings(samples=1, sampler="authors", seed=0))})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"checkpoint": args.checkpoint.name, "crop": args.crop, "threads": args.threads, "machine": platform.processor() or platform.machine(),
           "network_width": base.net.config.inner_channel, "rows": rows}
    (RESULTS / "authors_steps.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
