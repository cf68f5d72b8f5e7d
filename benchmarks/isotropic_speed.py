"""Speed of isotropic reconstruction: 32 slices of 256 x 256 at R = 4 (93 generated slices), K = 2.

    python benchmarks/isotropic_speed.py [--model NAME] [--device cpu] [--samples 2] [--steps N]

The volume is synthetic (the speed does not depend on the content). Prints seconds, generated slices per second
and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np
import torch

from napari_emdiffuse.core.isotropic import isotropic
from napari_emdiffuse.core.simulate import synthetic_em
from napari_emdiffuse.core.tasks import Settings, drive


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--factor", type=int, default=4)
    args = parser.parse_args()

    volume = (np.stack([synthetic_em((256, 256), seed=z) for z in range(32)]) * 255).astype(np.uint8)
    settings = Settings(samples=args.samples, steps=args.steps, device=args.device)
    start = time.perf_counter()
    result = drive(isotropic(volume, args.model, settings, factor=args.factor))
    seconds = time.perf_counter() - start
    generated = len(result.image) - len(volume)
    print(json.dumps({
        "input": list(volume.shape), "output": list(result.image.shape), "generated_slices": generated,
        "seconds": round(seconds, 2), "slices_per_second": round(generated / seconds, 3),
        "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "samples": args.samples, "steps": result.info["steps"], "device": result.info["device"],
        "threads": torch.get_num_threads(), "cpu": platform.processor(), "model": result.info["model"],
    }))


if __name__ == "__main__":
    main()
