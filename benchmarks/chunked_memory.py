"""Peak memory of a chunked (out-of-core) denoising run on a synthetic volume larger than the memory it may use.

    nice -n 10 python benchmarks/chunked_memory.py /tmp --size-gb 4.03

Creates a uint8 Zarr volume of ``--size-gb`` in FOLDER (EM-like texture plus noise, planes of 8192 x 8192), denoises
it with a local Dask cluster of ``--workers`` processes and a small randomly initialised network (the point is
memory and plumbing, not quality), samples the resident memory of this process and all its children (scheduler,
nannies, workers) every 0.2 s, checks one plane against the in-memory result, writes the numbers to
benchmarks/results/chunked_memory.json and deletes the volumes (unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import threading
import time
from pathlib import Path

import numpy as np

PLANE = 8192


class PeakMemory:
    """Sum of the RSS of this process and its descendants, sampled in a thread; keeps the maximum."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.process, self.interval, self.peak, self.processes = psutil.Process(), interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total, count = 0, 0
            for p in [self.process, *self.process.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    count += 1
                except psutil.Error:  # exited between listing and reading
                    pass
            self.peak, self.processes = max(self.peak, total), max(self.processes, count)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_volume(path: Path, planes: int) -> None:
    import zarr

    from napari_emdiffuse.core.simulate import synthetic_em

    tile = (synthetic_em((1024, 1024), seed=1) * 150 + 50).astype(np.int16)
    texture = np.tile(tile, (PLANE // 1024, PLANE // 1024))
    array = zarr.create_array(str(path), shape=(planes, PLANE, PLANE), chunks=(1, 1024, 1024), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for z in range(planes):
        noise = rng.integers(-25, 26, (PLANE, PLANE), dtype=np.int16)
        array[z] = np.clip(np.roll(texture, 37 * z, axis=1) + noise, 0, 255).astype(np.uint8)


def small_model(path: Path) -> str:
    import torch

    from napari_emdiffuse.core.models import save_model
    from napari_emdiffuse.core.network import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(base=4, mults=(1, 2, 2, 2), patch=4))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return str(save_model(net, {"task": "denoise", "name": "benchmark-small", "sampling": {"steps": 1}}, path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="/tmp", type=Path)
    parser.add_argument("--size-gb", type=float, default=4.03)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--halo", type=int, default=256)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "chunked_memory.json")
    args = parser.parse_args()

    import zarr

    from napari_emdiffuse.core.chunked import ChunkedTask, fit_normalizer, restore_volume
    from napari_emdiffuse.core.tasks import Settings, denoise, drive

    work = args.folder / "emdiffuse-chunked-benchmark"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        planes = max(1, round(args.size_gb * 1e9 / PLANE**2))
        started = time.perf_counter()
        make_volume(work / "volume.zarr", planes)
        created = time.perf_counter() - started
        model = small_model(work / "model.npz")
        settings = Settings(samples=args.samples, steps=1, seed=0, tile=args.tile)
        started = time.perf_counter()
        last = [0.0]

        def report(p):
            if time.perf_counter() - last[0] > 60 or p.done == p.total:
                last[0] = time.perf_counter()
                print(f"{last[0] - started:7.0f} s  {p.message}", flush=True)

        with PeakMemory() as memory:
            info = drive(restore_volume(work / "volume.zarr", work / "denoised.zarr", ChunkedTask("denoise"), model,
                                        settings, halo=args.halo, scheduler="local", workers=args.workers), report)
        seconds = time.perf_counter() - started
        import torch

        torch.set_num_threads(1)  # as in the workers; more threads than free cores is slow on a shared machine
        # correctness: the last plane, restored in memory with the volume's normalisation, against the chunked result
        source = zarr.open_array(str(work / "volume.zarr"), mode="r")
        plane = source[planes - 1:planes]
        whole = drive(denoise(plane, model, settings, norm=fit_normalizer(source)))
        chunked = zarr.open_group(str(work / "denoised.zarr"), mode="r")
        image_diff = int(np.abs(chunked["0"][planes - 1:planes].astype(int) - whole.image.astype(int)).max())
        volume_bytes = planes * PLANE**2
        stored = sum(f.stat().st_size for f in (work / "volume.zarr").rglob("*") if f.is_file())
        result = {
            "volume_shape": [planes, PLANE, PLANE], "dtype": "uint8", "volume_gb": volume_bytes / 1e9,
            "volume_on_disk_gb": stored / 1e9, "create_seconds": round(created, 1),
            "workers": args.workers, "chunks": info["chunks"], "samples": args.samples, "steps": 1,
            "tile": args.tile, "halo": args.halo, "model": "UNet(base=4, mults=(1,2,2,2), patch=4), random weights",
            "seconds": round(seconds, 1), "megavoxels_per_second": round(volume_bytes / seconds / 1e6, 2),
            "peak_rss_all_processes_gb": round(memory.peak / 1e9, 3), "processes_seen": memory.processes,
            "last_plane_max_abs_diff_vs_in_memory_grey_levels": image_diff,
            "uncertainty_score": info["uncertainty_score"] if args.samples > 1 else None,
            "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores "
                       "(shared with other jobs), run with nice -n 10",
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(result, indent=1))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
