"""Pieces shared by the training scripts: the clean training images, normalisation jitter, the training driver."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_emdiffuse.core.models import save_model
from napari_emdiffuse.core.network import count_parameters
from napari_emdiffuse.core.normalize import Normalizer
from napari_emdiffuse.core.simulate import scale01
from napari_emdiffuse.core.train import train


def load_clean_images(data: Path, with_real_clean: bool = False) -> list[np.ndarray]:
    """Clean training images scaled to [0, 1]. Held out: FIB-SEM 5 nm slices 22-26, volume b, the pair's bottom half."""
    images = [scale01(s) for s in tifffile.imread(data / "fibsem_5nm_slices_27x768x1024.tif")[:22]]
    volume = tifffile.imread(data / "fibsem_iso10nm_a_250.tif")
    for axis in range(3):  # isotropic: every orientation is a valid clean image
        images += [scale01(s) for s in np.moveaxis(volume, axis, 0)[::10]]
    images += [scale01(s) for s in tifffile.imread(data / "sstem_aniso_50x4x4nm_30x512x512.tif")[::3]]
    if with_real_clean:
        clean = tifffile.imread(data / "sem_pair22_clean.tif")
        images.append(scale01(clean[: clean.shape[0] // 2]))
    return images


def jittered(norm: Normalizer, rng: np.random.Generator) -> Normalizer:
    """Small random changes of the normalisation range: robustness to percentiles of other images."""
    span = norm.high - norm.low
    return Normalizer(norm.low + rng.normal(0, 0.03) * span, norm.high + rng.normal(0, 0.03) * span, norm.dtype)


def add_arguments(parser: argparse.ArgumentParser, output: str, minutes: float) -> None:
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/em"))
    parser.add_argument("-o", "--output", type=Path, default=Path(output))
    parser.add_argument("--minutes", type=float, default=minutes)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=int, default=32)
    parser.add_argument("--init", default=None, help="start from the weights of this model (name or file)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                        help="bfloat16: about 1.65x the steps per minute on CPUs that compute it natively")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that make training batches (0: in the training process); a GPU needs several")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--log-sigma", type=float, nargs=2, default=(-1.2, 1.2), metavar=("MEAN", "STD"),
                        help="training noise levels: log sigma ~ N(MEAN, STD); centre them on the sampler's range")


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-contrast", type=float, default=0.3,
                        help="clean images fill between this fraction and all of the detector range before the "
                             "noise is simulated (core.simulate.in_detector_range): lower = relatively noisier")


def init_from(net, model: str) -> dict:
    """Copy every weight whose name and shape match from another model (e.g. denoising into super-resolution).

    A weight with more input channels here (a condition channel added, e.g. the isotropic start) gets the source's
    in its leading channels and zeros in the new ones: the network starts out computing what the source did (the
    stem's pixel-unshuffle keeps each image channel's block together, so a channel added last stays last).
    Returns the source's metadata.
    """
    from napari_emdiffuse.core.models import load_model

    loaded = load_model(model)
    source = loaded.net.state_dict()
    own = net.state_dict()
    shared = {k: v.float() for k, v in source.items() if k in own and own[k].shape == v.shape}
    for k, v in source.items():
        mine = own.get(k)
        if k not in shared and mine is not None and mine.ndim > 1 and mine.shape[0] == v.shape[0] \
                and mine.shape[2:] == v.shape[2:] and mine.shape[1] > v.shape[1]:
            shared[k] = torch.zeros_like(mine)
            shared[k][:, : v.shape[1]] = v.float()
    own.update(shared)
    net.load_state_dict(own)
    print(f"initialised {len(shared)}/{len(own)} tensors from {model}", flush=True)
    return loaded.meta


def _produce(make_batches, seed: int, queue) -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: the workers together fill the machine
    for batch in make_batches(seed):
        queue.put(tuple(None if t is None else t.numpy() for t in batch))


def parallel_batches(make_batches, seed: int, workers: int):
    """Batches from ``workers`` processes, each running ``make_batches(seed)`` with its own seed."""
    import multiprocessing

    import torch

    context = multiprocessing.get_context("fork")  # started now, before the training process touches the GPU
    queue = context.Queue(maxsize=4 * workers)
    for i in range(workers):
        context.Process(target=_produce, args=(make_batches, seed * 1000 + i, queue), daemon=True).start()

    def receive():
        while True:
            yield tuple(None if a is None else torch.from_numpy(a) for a in queue.get())

    return receive()


def fit(net, make_batches, meta: dict, args) -> None:
    """Train on ``make_batches(seed)`` with checkpoints (atomic writes), then save the final averaged weights."""
    from napari_emdiffuse.core.tasks import pick_device

    if args.init:
        source = init_from(net, args.init)
        meta["init"] = str(args.init)
        if source["task"] == meta["task"] and "sampling" in source:
            # measured for the weights being continued: a better start than the generic defaults until re-swept
            meta["sampling"] = source["sampling"]
    print(f"parameters: {count_parameters(net):,}", flush=True)
    meta = {**meta, "name": args.output.stem,
            "training": {"script": meta.pop("script"), "args": {k: str(v) for k, v in vars(args).items()},
                         "date": time.strftime("%Y-%m-%d")}}

    def checkpoint(ema, step):
        save_model(ema, {**meta, "training": {**meta["training"], "step": step}}, args.output)

    batches = (parallel_batches(make_batches, args.seed, args.workers) if args.workers
               else make_batches(args.seed))
    job = train(net, batches, iterations=args.iterations, minutes=args.minutes, lr=args.lr, seed=args.seed,
                device=pick_device(args.device), report_every=50, checkpoint_minutes=args.checkpoint_minutes,
                log_sigma=tuple(args.log_sigma), precision=args.precision)
    while True:
        try:
            p = next(job)
        except StopIteration as stop:
            checkpoint(stop.value, p.step)
            break
        print(f"step {p.step} loss {p.loss:.4f} {p.seconds / 60:.1f} min", flush=True)
        if p.checkpoint is not None:
            checkpoint(p.checkpoint, p.step)
    print(f"saved {args.output}", flush=True)
