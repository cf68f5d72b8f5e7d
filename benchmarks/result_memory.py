"""Peak memory of whole-stack results held in memory (what a napari layer or a TIFF output needs).

    python benchmarks/result_memory.py              # denoise 64 x 512², super-resolution x4 16 x 256², isotropic R = 4

Each job runs in its own process with one sampling step and one sample (the result's buffers are what is measured,
not the network); the peak resident memory above the process's memory just before the job is reported per output
voxel, next to the result's own size (image + uncertainty map).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
from pathlib import Path

import numpy as np

JOBS = {"denoise": ((64, 512, 512), {}), "superres": ((16, 256, 256), {"scale": 4}),
        "isotropic": ((17, 512, 512), {"factor": 4})}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(task: str, queue) -> None:
    from napari_emdiffuse.core import isotropic, tasks
    from napari_emdiffuse.core.simulate import synthetic_em

    shape, kwargs = JOBS[task]
    plane = (synthetic_em(shape[1:], seed=0) * 200 + 30).astype(np.uint8)
    stack = np.stack([np.roll(plane, 3 * z, axis=1) for z in range(shape[0])])
    job = isotropic.isotropic if task == "isotropic" else getattr(tasks, task)
    settings = tasks.Settings(samples=1, steps=1)
    tasks.drive(job(stack[:2, :64, :64], settings=settings, **kwargs))  # model loaded, torch warmed up
    before = rss_bytes()
    result = tasks.drive(job(stack, settings=settings, **kwargs))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    own = result.image.nbytes + (result.uncertainty.nbytes if result.uncertainty is not None else 0)
    queue.put({"task": task, "input": list(shape), "output": list(result.image.shape),
               "peak_above_start_mb": round((peak - before) / 2**20, 1), "result_mb": round(own / 2**20, 1),
               "peak_bytes_per_output_voxel": round((peak - before) / result.image.size, 1)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="*", default=list(JOBS))
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")  # a fresh process per job: its own peak
    rows = []
    for task in args.tasks:
        queue = context.Queue()
        process = context.Process(target=measure, args=(task, queue))
        process.start()
        rows.append(queue.get())
        print(json.dumps(rows[-1]), flush=True)
        process.join()
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "result_memory.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
