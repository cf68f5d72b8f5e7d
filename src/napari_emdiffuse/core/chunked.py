"""Volumes larger than memory: restore a Zarr/OME-Zarr (or memory-mapped TIFF) volume chunk by chunk with Dask.

The output is cut into chunks; each is a task for a ``dask.distributed`` cluster (threads in this process, a local
cluster of worker processes, or any running scheduler: SLURM/PBS via dask-jobqueue, Kubernetes). A task reads its
chunk of the input plus a halo (margin) straight from the store, restores it with the in-memory code (the tasks'
generators, with the whole volume's :class:`Normalizer` and ``Settings.origin``, which anchors the noise field and
the tile grid in the full plane), crops the halo and writes its own output chunk. No pixels pass through the
scheduler, so memory is bounded by the chunk size on every worker, whatever the volume size.

With a halo of one tile, chunked and in-memory results differ by at most 0.0047 (mean 4e-5; normalised intensity,
the bundled denoiser with its 3 steps, 1024 x 1024 in chunks of 512, measured), well below the spread between
samples; with ``steps - 1`` tiles they are identical, because a difference travels at most one tile per step.

Resumable: a chunk's maps are written first (zarr writes each chunk file atomically), then its uncertainty
histogram, then its flag in ``run/done``; a restarted run skips flagged chunks and recomputes the others, so a
killed run never leaves a corrupt chunk behind.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from .normalize import InputError, Normalizer, check_finite, check_layout
from .tasks import Progress, Settings, drive

DEFAULT_LATERAL_CHUNK = 2048  # output pixels; a chunk with its halo needs well under 1 GB with the bundled model
HISTOGRAM_BINS, HISTOGRAM_MAX = 5000, 0.5  # uncertainty histogram per chunk: score and flagged fraction to 1e-4
BRIGHTNESS_REACH = 4  # sigmas: how far the brightness kept from the input reaches (scipy's Gaussian truncation)
LOOPBACK = "127.0.0.1"  # a local cluster listens here only
RUN_GROUP = "run"  # bookkeeping inside the output store: which chunks are done, their histograms


def check_chunkable(bad, align) -> None:
    """Refuse, before any work, what a run chunk by chunk cannot do: regenerating ``bad`` sections and aligning
    sections (``align``) need the whole stack in memory."""
    if bad or align:
        raise InputError("Bad sections are regenerated, and sections aligned, in a volume held in memory, not chunk "
                         "by chunk.")


@dataclass(frozen=True)
class ChunkedTask:
    """A task and how its output grid relates to the input: ``factor`` in y, x (superres) or along z (isotropic)."""

    name: str  # "denoise", "superres" or "isotropic"
    factor: float = 1  # isotropic: any R above 1 (see core/isotropic.py)
    gap: float | None = None  # isotropic: the sections' spacing in lateral pixels (default: the factor)

    @property
    def lateral(self) -> int:
        return self.factor if self.name == "superres" else 1

    @property
    def axial(self) -> float:
        return self.factor if self.name == "isotropic" else 1

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        from .isotropic import output_slices

        lateral = tuple(s * self.lateral for s in shape[-2:])
        return (output_slices(shape[0], self.axial),) + lateral if len(shape) == 3 else lateral

    def job(self, window: np.ndarray, model, settings: Settings, norm: Normalizer, offset: float = 0.0):
        """The job restoring ``window``; ``offset``: where its first output plane lies (isotropic, in sections)."""
        from . import tasks

        if self.name == "denoise":
            return tasks.denoise(window, model, settings, norm=norm)
        if self.name == "superres":
            return tasks.superres(window, model, settings, scale=self.factor, norm=norm)
        from .isotropic import isotropic

        return isotropic(window, model, settings, factor=self.factor, norm=norm, gap=self.gap, offset=offset,
                         check_alignment=False)  # a chunk's few sections say little; every chunk would say it

    def plane_offset(self, block: Block) -> float:
        """Where a block's first output plane lies in its window, in sections (planes lie at k / R sections)."""
        return block.write[0].start / self.axial - block.read[0].start if self.axial > 1 else 0.0


@dataclass(frozen=True)
class Block:
    """One output chunk: the input window it reads (with halo), the part of the window's result it keeps, where
    that goes in the output, and where the window's output starts in the full plane (``Settings.origin``)."""

    index: tuple[int, int, int]
    read: tuple[slice, slice, slice]
    keep: tuple[slice, slice, slice]
    write: tuple[slice, slice, slice]
    origin: tuple[int, int]


def plan_blocks(shape: tuple[int, int, int], task: ChunkedTask, chunk: tuple[int, int, int],
                halo: int, align: int = 16) -> list[Block]:
    """The blocks covering an input volume of ``shape`` (z, y, x) in chunks of ``chunk`` input pixels.

    Planes are restored independently, so z needs no halo; isotropic chunks read the next acquired slice as well,
    because each gap needs the slices on both sides. Windows start at multiples of ``align`` (the network's size
    multiple): a window that reaches the volume's end is then padded to the same end as the whole volume is.
    """
    from .isotropic import first_plane, output_slices

    depth, lateral, axial = shape[0], task.lateral, task.axial
    out_depth = output_slices(depth, axial)
    cz, cy, cx = chunk
    zs = []
    for z0 in range(0, max(depth - 1, 1) if axial > 1 else depth, cz):
        if axial == 1:
            z1 = min(z0 + cz, depth)
            zs.append((slice(z0, z1), slice(0, z1 - z0), slice(z0, z1)))
        else:  # the planes from section z0 up to (not at) z1; the last block also writes the plane at the last
            z1 = min(z0 + cz, depth - 1)
            start, end = first_plane(z0, axial), out_depth if z1 == depth - 1 else first_plane(z1, axial)
            zs.append((slice(z0, z1 + 1), slice(0, end - start), slice(start, end)))

    def lateral_ranges(length: int, size: int):
        for start in range(0, length, size):
            stop, lo = min(start + size, length), max(0, (start - halo) // align * align)
            hi = min(length, stop + halo)
            yield (slice(lo, hi), slice((start - lo) * lateral, (stop - lo) * lateral),
                   slice(start * lateral, stop * lateral), lo * lateral)

    return [Block((iz, iy, ix), (rz, ry, rx), (kz, ky, kx), (wz, wy, wx), (oy, ox))
            for iz, (rz, kz, wz) in enumerate(zs)
            for iy, (ry, ky, wy, oy) in enumerate(lateral_ranges(shape[1], cy))
            for ix, (rx, kx, wx, ox) in enumerate(lateral_ranges(shape[2], cx))]


def read_window(data, region: tuple[slice, ...]) -> np.ndarray:
    """``data[region]`` as a numpy array, for zarr, numpy/memmap and dask sources alike; a part that cannot be read
    (a damaged chunk file) is an InputError naming where."""
    try:
        part = data[region]
        if hasattr(part, "compute"):  # a dask array: compute here, not on the cluster this may be running on
            part = part.compute(scheduler="synchronous")
        return np.asarray(part)
    except (InputError, MemoryError):
        raise
    except Exception as err:  # zarr and its codecs raise many types for a damaged chunk
        raise InputError(f"The input could not be read{region_text(region, data.ndim)}: a chunk file is damaged or "
                         f"missing ({err}).") from err


def region_text(region: tuple, ndim: int) -> str:
    """`` (in the part at z 3-4, y 0-512, x 0-512)``"""
    parts = [f"{axis} {r.start or 0}-{r.stop if r.stop is not None else 'end'}" if isinstance(r, slice) else
             f"{axis} {r}" for axis, r in zip("zyx"[-ndim:], region)]
    return f" (in the part at {', '.join(parts)})"


def fit_normalizer(data, max_samples: int = 2_000_000) -> Normalizer:
    """The volume's intensity normalisation from a regular subsample (at most 32 planes), read plane by plane.

    Volumes up to ``max_samples`` voxels (and 32 planes) are read whole: the result is then exactly the in-memory
    :meth:`Normalizer.fit`.
    """
    planes = range(0, data.shape[0], max(1, math.ceil(data.shape[0] / 32))) if data.ndim == 3 else [None]
    per_plane = max_samples / len(planes)
    step = max(1, math.ceil(math.sqrt(data.shape[-1] * data.shape[-2] / per_plane)))
    sample = np.stack([read_window(data, ((z,) if z is not None else ()) + (slice(None, None, step),) * 2)
                       for z in planes])
    return Normalizer.fit(sample.astype(np.dtype(data.dtype), copy=False))


@dataclass(frozen=True)
class ChunkJob:
    """What every block task needs (small: sent along with each task)."""

    source: str  # a file path, or the key of an in-process array (threads scheduler)
    output: str
    task: ChunkedTask
    model: str  # model file path (must be readable by the workers)
    settings: Settings
    norm: Normalizer
    maps: tuple[str, ...]  # "image", then "uncertainty" and/or "difficulty"
    ndim: int
    torch_threads: int | None = None
    run_id: str = ""


_IN_PROCESS_SOURCES: dict = {}  # key -> array, for the threads scheduler: arrays never need pickling
_CANCELLED: set[str] = set()  # run ids cancelled by their client; in-process tasks stop between two tiles


class Cancelled(Exception):
    pass


@lru_cache(maxsize=4)
def _open_path(path: str, mtime_ns: int):
    from .io import read_tiff
    from .zarr_io import is_zarr, open_volume

    return (open_volume(path) if is_zarr(path) else read_tiff(path)).data


def open_source(source: str):
    if source in _IN_PROCESS_SOURCES:
        return _IN_PROCESS_SOURCES[source]
    return _open_path(source, os.stat(source).st_mtime_ns)


def process_block(block: Block, job: ChunkJob) -> dict:
    """Restore one block and write its output chunk (a Dask task). Returns notes on memory fallbacks."""
    import zarr

    if job.torch_threads:
        import torch

        torch.set_num_threads(job.torch_threads)
    data = open_source(job.source)
    region = block.read[3 - job.ndim:]
    window = read_window(data, region)
    check_finite(window, region_text(region, job.ndim))  # every chunk as it is read: the up-front checks see a sample
    settings = replace(job.settings, origin=block.origin)

    def check_cancelled(_):
        if job.run_id in _CANCELLED:
            raise Cancelled

    result = drive(job.task.job(window, job.model, settings, job.norm, job.task.plane_offset(block)),
                   check_cancelled)
    root = zarr.open_group(job.output, mode="r+")
    keep = block.keep[3 - job.ndim:]
    for name in job.maps:
        values = {"image": result.image, "uncertainty": result.uncertainty, "difficulty": result.difficulty}[name]
        root[map_key(name)][block.write[3 - job.ndim:]] = values[keep]
    if result.uncertainty is not None:
        root[f"{RUN_GROUP}/histogram"][block.index] = uncertainty_histogram(
            result.uncertainty[keep], job.task, block.write[0].start)
    root[f"{RUN_GROUP}/done"][block.index] = 1  # last: the chunk counts as written only now
    return {"notes": result.info.get("notes", [])}


def map_key(name: str) -> str:
    from .zarr_io import map_path

    return map_path(name, "image")


def uncertainty_histogram(uncertainty: np.ndarray, task: ChunkedTask, first_slice: int) -> np.ndarray:
    """Counts of the uncertainty values that score (isotropic: the generated slices only) in fixed bins."""
    if task.axial > 1:
        from .isotropic import on_section

        uncertainty = uncertainty[[not on_section(k, task.axial) for k in range(first_slice,
                                                                               first_slice + len(uncertainty))]]
    counts, _ = np.histogram(np.minimum(uncertainty, HISTOGRAM_MAX), HISTOGRAM_BINS, (0.0, HISTOGRAM_MAX))
    return counts


def histogram_summary(counts: np.ndarray, threshold: float) -> tuple[float, float]:
    """The uncertainty score (99th percentile) and the fraction of values above ``threshold``, from a histogram."""
    width = HISTOGRAM_MAX / HISTOGRAM_BINS
    cumulative = np.cumsum(counts)
    score = (np.searchsorted(cumulative, 0.99 * cumulative[-1]) + 0.5) * width
    flagged = counts[(np.arange(HISTOGRAM_BINS) + 0.5) * width > threshold].sum() / cumulative[-1]
    return float(score), float(flagged)


@contextmanager
def dask_client(scheduler: str = "threads", workers: int | None = None, dashboard: bool = False):
    """A ``dask.distributed`` client: ``threads`` (this process), ``local`` (``workers`` processes, one chunk at
    a time each) or the address of a running scheduler (e.g. ``tcp://host:8786``, from dask-jobqueue).

    A local cluster listens on the loopback interface only (its scheduler and workers serve unauthenticated
    connections) and serves no dashboard unless ``dashboard`` (then at http://127.0.0.1:8787 or a free port)."""
    import dask
    from dask.distributed import Client, LocalCluster

    if scheduler in ("threads", "local"):
        processes = scheduler == "local"
        # every HTTP server on loopback; without a dashboard they serve only the health check (the default routes
        # show worker logs and call stacks to anyone who can connect)
        quiet = {} if dashboard else {"distributed.scheduler.http.routes": ["distributed.http.health"],
                                      "distributed.worker.http.routes": ["distributed.http.health"]}
        with dask.config.set(quiet):
            cluster = LocalCluster(n_workers=(workers or 2) if processes else 1, processes=processes,
                                   threads_per_worker=1 if processes else (workers or 1),
                                   **({"host": LOOPBACK} if processes else {}),
                                   dashboard_address=f"{LOOPBACK}:{8787 if dashboard else 0}",
                                   worker_dashboard_address=f"{LOOPBACK}:0", scheduler_kwargs={"dashboard": dashboard},
                                   silence_logs=logging.CRITICAL)
        client = Client(cluster)
    else:
        cluster, client = None, Client(scheduler)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def input_fingerprint(data) -> dict:
    """What identifies an input whatever path names it: shape, dtype, chunking and a hash of a few small windows
    (corners and centre of the first, middle and last plane: cheap, and a different volume differs there)."""
    import hashlib

    digest = hashlib.sha256()
    shape = tuple(data.shape)
    planes = sorted({0, shape[0] // 2, shape[0] - 1}) if data.ndim == 3 else [None]
    for z in planes:
        for y, x in ((0, 0), (shape[-2] // 2, shape[-1] // 2), (max(0, shape[-2] - 16), max(0, shape[-1] - 16))):
            region = ((z,) if z is not None else ()) + (slice(y, y + 16), slice(x, x + 16))
            digest.update(np.ascontiguousarray(read_window(data, region)).tobytes())
    chunks = getattr(data, "chunksize", None) or getattr(data, "chunks", None)
    return {"shape": list(shape), "dtype": np.dtype(data.dtype).str,
            "chunks": [int(c) for c in chunks] if chunks else None, "sample": digest.hexdigest()}


def restore_volume(source, output: str | os.PathLike, task: ChunkedTask, model: str | None = None,
                   settings: Settings | None = None, *, chunk: tuple[int, int, int] | None = None,
                   halo: int | None = None, scheduler: str = "threads", workers: int | None = None,
                   pixel_size: tuple[float, ...] | None = None, unit: str = "pixel",
                   overwrite: bool = False, dashboard: bool = False) -> Generator[Progress, None, dict]:
    """Restore ``source`` (a Zarr/OME-Zarr/TIFF path, or an array for the threads scheduler) into the OME-Zarr
    store ``output``; yields progress per chunk and returns the run summary (as the in-memory ``info``).

    ``chunk`` (z, y, x) and ``halo`` are in input pixels (defaults: 2048 output pixels across, one plane or gap,
    one tile of halo, and the reach of the brightness kept from the input). An existing ``output`` of the same run
    on the same input (its fingerprint, whatever path names it) is resumed; of another run, it is an error unless
    ``overwrite`` (and then only a store this tool made is replaced: core/safety.py). Everything is checked before
    any work; a run that fails with an error leaves no store behind that it created (an interrupted one keeps its
    finished chunks, to resume).
    """
    from .isotropic import check_factor
    from .limits import check_number, check_optional, check_scheduler
    from .models import default_model, load_model, resolve
    from .safety import check_output
    from .tasks import (
        BRIGHTNESS_SIGMA,
        SUPERRES_SCALES,
        gives_uncertainty,
        is_reliable,
        keeps_input_brightness,
        pick_device,
        summarise,
        superres_steps,
    )

    started = time.perf_counter()
    settings = settings or Settings()
    scheduler = check_scheduler(scheduler)
    workers = check_optional("workers", workers)
    halo = check_optional("halo", halo)
    if chunk is not None:
        if len(chunk) != 3:
            raise InputError("The chunk must be three sizes (z, y, x).")
        chunk = tuple(check_number("chunk", c) for c in chunk)
    if task.axial > 1:
        check_factor(task.factor)
    elif task.lateral > 1 and task.factor not in SUPERRES_SCALES:
        raise InputError(f"The super-resolution factor must be 2 or 4, not {task.factor}.")
    inputs = [source] if isinstance(source, (str, os.PathLike)) else []
    check_output(output, inputs, overwrite=True, store=True)  # replaceable at all? (whether to: _open_output)
    if isinstance(source, (str, os.PathLike)):
        source = str(source)
        from .io import read_tiff
        from .zarr_io import is_zarr, open_volume

        opened = open_volume(source) if is_zarr(source) else read_tiff(source)
        data, pixel_size, unit = opened.data, pixel_size or opened.scale, opened.unit
    else:
        data = source
    if scheduler != "threads" and not isinstance(source, str):
        raise InputError("An array in memory can only be processed with the threads scheduler; save it first.")
    if data.ndim not in (2, 3) or (task.axial > 1 and (data.ndim != 3 or data.shape[0] < 2)):
        raise InputError(f"Expected {'a volume of at least 2 slices' if task.axial > 1 else 'a 2D image or 3D volume'}"
                         f", got the shape {data.shape}.")
    check_layout(data.shape, data.dtype)  # dtype, RGB: from the shape, whatever the route
    model_path = str(Path(resolve(model or default_model(task.name), task.name)).resolve())
    model_info = load_model(model_path, task=task.name)
    shape3 = (1,) * (3 - data.ndim) + tuple(data.shape)
    default_chunk = (1, max(64, DEFAULT_LATERAL_CHUNK // task.lateral), max(64, DEFAULT_LATERAL_CHUNK // task.lateral))
    chunk = chunk or default_chunk
    if halo is None:  # one tile of each step's output grid, and the reach of its brightness, in input pixels
        steps = superres_steps(model_info, task.factor) if task.name == "superres" else (1,)
        reach = BRIGHTNESS_REACH * BRIGHTNESS_SIGMA if keeps_input_brightness(model_info) and task.axial == 1 else 0
        halo = sum(math.ceil(settings.tile / math.prod(steps[:i + 1]) + reach / math.prod(steps[:i]))
                   for i in range(len(steps)))
    maps = ("image",) + (("uncertainty",) if gives_uncertainty(model_info, settings) else ()) + (
        ("difficulty",) if settings.difficulty else ())
    if task.axial > 1:  # every position the chunks will ask of the model, before any work
        from .isotropic import check_positions

        check_positions(model_info, shape3[0], task.factor, task.gap)
    run = {"task": task.name, "factor": task.factor, "gap": task.gap, "model": model_info.name,
           "model_path": model_path,
           "input_fingerprint": input_fingerprint(data), "chunk": list(chunk), "halo": halo, "maps": list(maps),
           "settings": {k: v for k, v in asdict(settings).items() if k not in ("device", "threshold", "origin")}}
    blocks = plan_blocks(shape3, task, chunk, halo, model_info.net.config.multiple)
    grid = tuple(max(b.index[i] for b in blocks) + 1 for i in range(3))
    root = _open_output(Path(output), run, overwrite, inputs)
    created = root is None
    norm = fit_normalizer(data)  # also on a resume: a store's normaliser is never used for another input
    fitted = {"low": norm.low, "high": norm.high, "dtype": norm.dtype.str}
    if created:
        root = _create_output(Path(output), data, task, chunk, maps,
                              {**run, "normalizer": fitted, "input": source if isinstance(source, str) else None},
                              grid, pixel_size, unit)
    elif root.attrs["emdiffuse"]["run"].get("normalizer") != fitted:
        raise InputError(f"{output} was started on input of other intensities (its normalisation differs); choose "
                         "another name or allow overwriting.")
    done = root[f"{RUN_GROUP}/done"][...]
    pending = [b for b in blocks if not done[b.index]]
    run_id = uuid.uuid4().hex
    processes = scheduler != "threads"
    if not processes and not isinstance(source, str):
        _IN_PROCESS_SOURCES[run_id] = data
    job = ChunkJob(source if isinstance(source, str) else run_id, str(output), task, model_path, settings, norm,
                   maps, data.ndim, max(1, (os.cpu_count() or 1) // (workers or 2)) if scheduler == "local" else None,
                   run_id)
    total, finished = len(blocks), len(blocks) - len(pending)
    notes = [f"resumed: {finished} of {total} chunks were already done"] if finished else []
    try:
        yield Progress(finished, total, f"{task.name}: {finished} of {total} chunks done")
        if pending:
            with dask_client(scheduler, workers, dashboard) as client:
                if dashboard:
                    yield Progress(finished, total, f"{task.name}: Dask dashboard at {client.dashboard_link}")
                yield from _run_blocks(client, pending, job, finished, total, notes)
    except Exception:
        if created:  # a failed run leaves nothing behind that it made (an interrupted one keeps its chunks)
            _remove_store(Path(output))
        raise
    finally:
        _IN_PROCESS_SOURCES.pop(run_id, None)
    device = pick_device(settings.device)
    info = summarise(task.name, model_info, settings, device, None, settings.tile, notes, started,
                     output=str(output), maps=list(maps), chunks=total, resumed_chunks=total - len(pending),
                     **({"scale": task.factor} if task.lateral > 1 else {}),
                     **({"factor": task.factor} if task.axial > 1 else {}))
    if "uncertainty" in maps:
        counts = sum(root[f"{RUN_GROUP}/histogram"][iz].sum(axis=(0, 1)) for iz in range(grid[0]))
        score, flagged = histogram_summary(counts, settings.threshold)
        info.update(uncertainty_score=score, reliable=is_reliable(score, settings.threshold), flagged_fraction=flagged)
    root.attrs["emdiffuse"] = {**root.attrs["emdiffuse"], "result": {k: v for k, v in info.items() if k != "notes"}}
    yield Progress(total, total, f"{task.name}: done")
    return info


def _remove_store(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _run_blocks(client, blocks: list[Block], job: ChunkJob, finished: int, total: int,
                notes: list[str]) -> Generator[Progress, None, None]:
    from dask.distributed import as_completed

    keys = [f"block-{job.run_id}-{b.index[0]}.{b.index[1]}.{b.index[2]}" for b in blocks]
    futures = client.map(process_block, blocks, job=job, pure=False, key=keys)
    completed = as_completed(futures)
    try:
        while not completed.is_empty():
            batch = completed.next_batch(block=False)
            for future in batch:
                notes += [n for n in future.result()["notes"] if n not in notes]
                finished += 1
            if not batch:
                time.sleep(0.2)  # no busy loop; still a yield (a chance to cancel) every 0.2 s
            yield Progress(finished, total, f"{job.task.name}: {finished} of {total} chunks done")
    finally:
        # after a cancel or an error: in-process tasks stop at their next tile, before the cluster closes (which
        # waits for them), so no thread goes on computing or writing once the run has ended
        _CANCELLED.add(job.run_id)
        client.cancel(futures)


def _open_output(path: Path, run: dict, overwrite: bool, inputs: list):
    """The output store to resume, or None when it must be created (removing an old one of ours if ``overwrite``;
    core/safety.py decides what may be removed)."""
    import zarr

    from .safety import own_store, remove_own

    if not os.path.lexists(path):
        return None
    previous = {}
    if own_store(path):
        root = zarr.open_group(str(path), mode="r+")
        previous = {k: v for k, v in dict(root.attrs["emdiffuse"]["run"]).items()
                    if k not in ("normalizer", "input")}  # the path may differ (relative, absolute)
    if previous == run and not overwrite:
        return root
    if overwrite:
        remove_own(path, inputs)
        return None
    raise InputError(f"{path} exists and is not an unfinished run of this input with these settings; choose "
                     "another name or allow overwriting.")


def _create_output(path: Path, data, task: ChunkedTask, chunk, maps, run: dict, grid, pixel_size, unit: str):
    import shutil

    import zarr

    from .zarr_io import create_ome_zarr

    out_shape = task.output_shape(tuple(data.shape))
    out_chunk = (math.ceil(chunk[0] * task.axial), chunk[1] * task.lateral, chunk[2] * task.lateral)[3 - data.ndim:]
    pixel = tuple(pixel_size or (1.0,) * data.ndim)
    scale = tuple(s / task.axial for s in pixel[:-2]) + tuple(s / task.lateral for s in pixel[-2:])
    dtypes = {"image": np.dtype(data.dtype), "uncertainty": np.float32, "difficulty": np.float32}
    tmp = path.with_name(f".{path.name}.creating")
    if tmp.exists():  # left by a start that was killed
        shutil.rmtree(tmp)
    try:
        root = create_ome_zarr(tmp, {name: dtypes[name] for name in maps}, out_shape, out_chunk, scale, unit)
        run_group = root.create_group(RUN_GROUP)
        run_group.create_array("done", shape=grid, chunks=(1, 1, 1), dtype=np.uint8, fill_value=0)
        run_group.create_array("histogram", shape=grid + (HISTOGRAM_BINS,), chunks=(1, 1, 1, HISTOGRAM_BINS),
                               dtype=np.int64, fill_value=0)
        root.attrs["emdiffuse"] = {"run": run}
        os.replace(tmp, path)  # a store exists only once complete: a killed start leaves nothing to resume from
    except BaseException:  # e.g. a full disk: nothing half-made is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return zarr.open_group(str(path), mode="r+")
