"""Speed and peak memory of denoising a 2.56-megapixel SEM image with default settings (K = 2, uncertainty).

    python benchmarks/denoise_speed.py ../shared/data/em [--device cpu] [--samples 2] [--steps N]

Prints seconds, megapixels per second and the peak resident memory of the process (model loading included).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from napari_emdiffuse.core.io import read_tiff
from napari_emdiffuse.core.tasks import Settings, denoise, drive


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/em"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()

    image = read_tiff(args.data / "sem_noisy_1600.tif").data
    settings = Settings(samples=args.samples, steps=args.steps, device=args.device)
    start = time.perf_counter()
    result = drive(denoise(image, None, settings))
    seconds = time.perf_counter() - start
    megapixels = image.size / 1e6
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    print(json.dumps({
        "image": list(image.shape), "megapixels": megapixels, "seconds": round(seconds, 2),
        "megapixels_per_second": round(megapixels / seconds, 3), "peak_memory_gb": round(peak_gb, 3),
        "samples": args.samples, "steps": result.info["steps"], "sampler": result.info["sampler"],
        "device": result.info["device"], "threads": torch.get_num_threads(), "cpu": platform.processor(),
        "uncertainty_score": round(result.info["uncertainty_score"], 4),
    }))


if __name__ == "__main__":
    main()
