"""Speed and peak memory of each task with default settings (K = 2, uncertainty included).

    python benchmarks/speed.py denoise ../shared/data/em     # sem_noisy_1600.tif: 1600 x 1600 (2.56 megapixels)
    python benchmarks/speed.py superres ../shared/data/em    # that image area-averaged to 800 x 800, x2 -> 1600 x 1600
    python benchmarks/speed.py isotropic                     # 32 synthetic slices of 256 x 256 at R = 4: 93 generated
    options: [--device auto|cpu|cuda|mps] [--precision auto|float32|bfloat16] [--samples 2] [--steps N]
             [--model NAME] [--repeat N]

Prints one JSON line per run: seconds (model loading included), megapixels of output per second, the peak resident
memory of the process and, on a GPU, the peak GPU memory. The first run on a GPU includes its warm-up (context,
kernel selection); ``--repeat 2`` shows the steady speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from napari_emdiffuse.core.io import read_tiff
from napari_emdiffuse.core.isotropic import isotropic
from napari_emdiffuse.core.simulate import area_downsample, synthetic_em
from napari_emdiffuse.core.tasks import PRECISIONS, Settings, denoise, drive, superres


def job(task: str, data: Path, model: str | None, settings: Settings):
    if task == "isotropic":
        volume = (np.stack([synthetic_em((256, 256), seed=z) for z in range(32)]) * 255).astype(np.uint8)
        return volume, isotropic(volume, model, settings, factor=4)
    image = read_tiff(data / "sem_noisy_1600.tif").data
    if task == "denoise":
        return image, denoise(image, model, settings)
    low = area_downsample(image.astype(np.float32), 2).astype(image.dtype)
    return low, superres(low, model, settings, scale=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("denoise", "superres", "isotropic"))
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/em"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    settings = Settings(samples=args.samples, steps=args.steps, device=args.device, precision=args.precision)
    for run in range(args.repeat):
        image, work = job(args.task, args.data, args.model, settings)
        start = time.perf_counter()
        result = drive(work)
        seconds = time.perf_counter() - start
        megapixels = result.image.size / 1e6
        report = {
            "task": args.task, "run": run + 1, "input": list(image.shape), "output": list(result.image.shape),
            "seconds": round(seconds, 2), "output_megapixels_per_second": round(megapixels / seconds, 3),
            "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),  # KiB on Linux
            "samples": args.samples, "steps": result.info["steps"], "device": result.info["device"],
            "precision": result.info["precision"],
            "model": result.info["model"], "threads": torch.get_num_threads(), "cpu": platform.processor(),
        }
        if result.info["device"].startswith("cuda"):
            report["gpu"] = torch.cuda.get_device_name()
            report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
