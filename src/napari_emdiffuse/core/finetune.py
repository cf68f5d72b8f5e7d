"""Fine-tuning a model on data of a new tissue or microscope (the paper's transfer).

Denoising and super-resolution models learn from one registered image pair (a fast and a slow acquisition of one
field of view); an isotropic-reconstruction model (vEMDiffuse-i) learns from one small isotropic volume of the
tissue (e.g. FIB-SEM), decimated along each of its axes as an anisotropic acquisition would see it.

``finetune`` is a generator like the restoration jobs: it yields :class:`~.train.TrainProgress` while training
(and :class:`~.tasks.Progress` while validating) and returns a :class:`FinetuneResult`. A part of the data (a
strip of the pair, the last slices of the volume) is kept aside for validation; its PSNR is measured before
training, at every checkpoint and at the end (first sampling seed), the best weights are kept; they are then
judged against the base model with several seeds and the same settings, and saved only when they beat it with
every seed by more than the seed-to-seed spread (:func:`judge`). Otherwise the base model is kept, nothing is
written, and the user is told why it likely did not help (a pair still misaligned after registration, or a
budget too short). A cancelled run writes nothing. The pair is registered as a whole before the validation strip
is cut from it, so the strip is aligned exactly as the training region is.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .normalize import InputError, Normalizer, check_image
from .register import Registration, apply_registration, register_pair

PATCH = 128
TASKS = ("denoise", "superres", "isotropic")


@dataclass
class FinetuneResult:
    improved: bool
    model_name: str  # the new model, or the base model when nothing improved
    path: Path | None  # where the new model was saved (None when the base was kept)
    val_psnr_before: float
    val_psnr_after: float
    registration: Registration | None  # of the pair (None for a volume)
    steps: int
    message: str
    history: list = field(default_factory=list)  # (step, loss)
    val_psnr_spread: float = 0.0  # seed-to-seed standard deviation of the validation PSNR
    validation: list = field(default_factory=list)  # (step, validation PSNR with the first seed); step 0: the base


@dataclass
class Tuning:
    """What one kind of fine-tuning learns from, and how a candidate is judged."""

    batches: Callable[[int], Iterator]  # seed -> endless (x0, cond, label) batches in model space
    validate: Callable  # (net, settings) -> generator (restoration progress) returning the validation PSNR
    record: dict  # provenance for the model file
    about: str  # what the model was tuned on, for its description
    registration: Registration | None = None


def prepare_pair(task: str, image: np.ndarray, target: np.ndarray, scale: int) -> tuple:
    """Register the pair (at the input's grid), crop the invalid border; return input, target, registration."""
    from .simulate import area_downsample

    image, target = check_image(image, (2,)), check_image(target, (2,))
    factor = scale if task == "superres" else 1
    expected = (image.shape[0] * factor, image.shape[1] * factor)
    mismatch = max(abs(t - e) for t, e in zip(target.shape, expected))
    if task == "superres" and mismatch > factor:
        raise InputError(f"For x{scale} super-resolution the target must be {scale} times the input's size "
                         f"({expected[0]} x {expected[1]}), not {target.shape[0]} x {target.shape[1]}.")
    if task == "denoise" and image.shape != target.shape:
        raise InputError(f"The two images must have the same shape (got {image.shape} and {target.shape}).")
    target = target[: expected[0], : expected[1]].astype(np.float64)
    image = image[: target.shape[0] // factor, : target.shape[1] // factor]
    coarse_target = area_downsample(target, factor) if factor > 1 else target
    reg = register_pair(image.astype(np.float64), coarse_target)
    return image[reg.crop], apply_registration(target, reg, factor), reg


def split_validation(image: np.ndarray, target: np.ndarray, factor: int, fraction: float = 0.2):
    """Keep the last ``fraction`` of the longer axis aside for validation (at least 64 input pixels)."""
    axis = 0 if image.shape[0] >= image.shape[1] else 1
    n = image.shape[axis]
    cut = n - max(64, int(n * fraction))
    if cut < 64:
        raise InputError("The image pair is too small to fine-tune on (need at least 128 pixels along one side).")
    take = lambda a, lo, hi, f=1: a[lo * f:hi * f] if axis == 0 else a[:, lo * f:hi * f]  # noqa: E731
    return (take(image, 0, cut), take(target, 0, cut, factor)), (take(image, cut, n), take(target, cut, n, factor))


def pair_batches(pairs: list[tuple[np.ndarray, np.ndarray]], batch: int, seed: int, label: int | None):
    """Random augmented patches of aligned (condition on the output grid, target) pairs, in model space; each patch
    from a pair drawn in proportion to its area."""
    import torch

    from .train import augment, to_model_space

    rng = np.random.default_rng(seed)
    patch = min(PATCH, *(n // 16 * 16 for cond, _ in pairs for n in cond.shape))
    areas = np.array([cond.size for cond, _ in pairs], float)
    while True:
        xs, cs = [], []
        for _ in range(batch):
            cond, target = pairs[rng.choice(len(pairs), p=areas / areas.sum())]
            y = rng.integers(0, cond.shape[0] - patch + 1)
            x = rng.integers(0, cond.shape[1] - patch + 1)
            c, t = augment(rng, cond[y:y + patch, x:x + patch], target[y:y + patch, x:x + patch])
            cs.append(c)
            xs.append(t)
        labels = None if label is None else torch.full((batch,), label)
        yield to_model_space(xs), to_model_space(cs), labels


def in_input_brightness(target: np.ndarray, reference: np.ndarray, sigma: float) -> np.ndarray:
    """``target`` in the brightness and contrast of ``reference`` (the input on the target's grid): a straight line
    through their local means (the acquisitions may differ in gain, offset and even bit depth), then the local
    brightness itself (:func:`~.tasks.keep_brightness`, as every result is made)."""
    from scipy.ndimage import gaussian_filter

    from .tasks import keep_brightness

    gain, offset = np.polyfit(gaussian_filter(target, sigma).ravel(), gaussian_filter(reference, sigma).ravel(), 1)
    return keep_brightness(gain * target + offset, reference, sigma)


def pair_tuning(task: str, image, target, base_model, scale: int, batch: int,
                target_brightness: bool = False) -> Tuning:
    """Denoising or super-resolution: learn from one image pair, validated on a strip kept aside.

    The target is brought to the input's local brightness first (two acquisitions rarely agree on it, and a model
    must not learn their difference), unless ``target_brightness``: then the model adopts the target's.
    """
    from .simulate import area_downsample
    from .tasks import BRIGHTNESS_SIGMA, denoise, superres, superres_steps, upsample

    image, aligned, reg = prepare_pair(task, np.asarray(image), np.asarray(target), scale)
    factor = scale if task == "superres" else 1
    if not target_brightness:
        reference = image.astype(np.float64) if factor == 1 else upsample(image.astype(np.float32), factor)
        aligned = in_input_brightness(aligned, reference, BRIGHTNESS_SIGMA * factor)
    steps = superres_steps(base_model, scale) if task == "superres" else (1,)
    label = None
    if base_model.meta.get("labels"):
        label = int(base_model.meta["labels"].get(str(steps[0]), -1))
        if label < 0:
            raise InputError(f"The model '{base_model.name}' does not support x{scale}.")
    norm = Normalizer.fit(image)
    (train_in, train_out), (val_in, val_out) = split_validation(image, aligned, factor)
    if steps == (2, 2):  # a x2 model making x4 in two steps learns both: to the target's x2 average, and from it
        middle = norm(area_downsample(train_out, 2))
        pairs = [(upsample(norm(train_in), 2), middle), (upsample(middle, 2), norm(train_out))]
    else:
        pairs = [(norm(train_in) if factor == 1 else upsample(norm(train_in), factor), norm(train_out))]
    val_truth = norm(val_out)

    def validate(candidate, settings) -> Generator:
        job = denoise(val_in, candidate, settings) if task == "denoise" else superres(val_in, candidate, settings,
                                                                                         scale)
        result = yield from job
        return psnr(norm(result.image.astype(np.float64)), val_truth)

    record = reg.summary()
    return Tuning(lambda seed: pair_batches(pairs, batch, seed, label), validate, record, "one image pair", reg)


VALIDATION_PIXELS = 256  # the validation slices' crop in y and x: long enough to judge, quick to reconstruct
# Starts kept over whole planes only while computing them all takes a few minutes (2 CPU cores: about 5 M pixels
# a minute): on a 100 x 250 x 250 volume (55 M) that filled the whole 10-minute budget (332 steps), and starts
# computed per patch trained as well (20 nm FIB-SEM, R = 4: 1690 steps, test +0.15 dB over the bundled model;
# kept starts: 6458 steps, +0.16)
TUNING_CACHE_PIXELS = 2 ** 24


def volume_tuning(volume, base_model, factor: int, batch: int) -> Tuning:
    """Isotropic reconstruction (vEMDiffuse-i): learn from an isotropic volume, along each of its three axes, to
    generate the ``factor`` - 1 slices between two kept ones; validated on the volume's last slices kept aside
    (decimated along z, reconstructed as a user's volume is, scored on the generated slices)."""
    from .isotropic import (
        caches_starts,
        check_factor,
        check_positions,
        decimate,
        interpolation_batches,
        isotropic,
        oriented,
        sees_start,
        uses_positions,
    )
    from .memory import available_bytes

    volume = check_image(volume, (3,))
    factor = check_factor(factor)
    if factor != int(factor):
        raise InputError(f"Fine-tuning learns the slices between planes of an isotropic volume, so its z factor R is "
                         f"a whole number, not {factor:g} (the tuned model serves any factor its base does).")
    factor = int(factor)
    check_positions(base_model, 2 * factor + 1, factor)
    held = max(2 * factor + 1, round(0.2 * len(volume)))  # at least two gaps
    if len(volume) < 2 * held or min(volume.shape[1:]) < 2 * factor + 1:
        raise InputError(f"Fine-tuning for R = {factor} needs an isotropic volume of at least {2 * held} slices "
                         f"and {2 * factor + 1} pixels across (this one is {' x '.join(map(str, volume.shape))}).")
    needed, free = 12 * volume.size, 0.7 * available_bytes()  # the three orientations, in float32
    if needed > free:
        raise InputError(f"Learning from this volume needs about {needed / 2**30:.1f} GB of memory but only "
                         f"{free / 2**30:.1f} GB is free; crop a smaller block (a few hundred pixels along each "
                         "axis are plenty).")
    norm = Normalizer.fit(volume)
    planes = oriented(norm(volume[: len(volume) - held]))
    net = base_model.net
    residual = base_model.meta.get("start", "linear") if base_model.meta.get("residual") else None
    cache = residual is not None and caches_starts(planes, [factor], TUNING_CACHE_PIXELS)

    def batches(seed: int) -> Iterator:
        return interpolation_batches(planes, [factor], batch, 96, seed, multiple=net.config.multiple,
                                     residual=residual, cache=cache, start_condition=sees_start(net),
                                     gaps=(factor, factor) if uses_positions(base_model) else None)

    kept_aside = volume[len(volume) - held:][: (held - 1) // factor * factor + 1]
    y0, x0 = ((n - min(n, VALIDATION_PIXELS)) // 2 for n in kept_aside.shape[1:])
    truth = kept_aside[:, y0:y0 + VALIDATION_PIXELS, x0:x0 + VALIDATION_PIXELS]
    generated = np.arange(len(truth)) % factor != 0

    def validate(candidate, settings) -> Generator:
        result = yield from isotropic(decimate(truth, factor), candidate, settings, factor, norm)
        return psnr(norm(result.image[generated].astype(np.float64)), norm(truth[generated].astype(np.float64)))

    record = {"factor": factor, "volume_shape": list(volume.shape), "validation_slices": len(truth)}
    return Tuning(batches, validate, record, f"an isotropic volume for R = {factor}")


def psnr(restored: np.ndarray, truth: np.ndarray) -> float:
    """In normalised units (the data's robust range is 1)."""
    return float(10 * np.log10(1.0 / np.mean((restored - truth) ** 2)))


def finetune(task: str, image: np.ndarray, target: np.ndarray | None = None, *, base: str | None = None,
             name: str | None = None, scale: int = 2, factor: int = 4, minutes: float | None = None,
             iterations: int | None = None, seed: int = 0, output: str | Path | None = None, batch: int | None = None,
             lr: float = 1e-4, device: str = "auto", precision: str = "auto",
             validate_every_minutes: float = 2.0, target_brightness: bool = False) -> Generator:
    """Fine-tune ``base`` (default: the bundled model of ``task``); see the module docstring.

    ``image`` and ``target``: the pair (fast and slow acquisition; for super-resolution at ``scale``), or for
    ``"isotropic"`` the isotropic volume alone, tuned to generate the slices of gaps of ``factor``. The result is
    saved to ``output`` if given, else into the user's model folder as ``name``. ``precision`` of the training
    steps (see :func:`~.tasks.pick_precision`): bfloat16 where it is native takes 1.65x the steps in the budget,
    which fine-tunes further (``benchmarks/finetune_transfer.py``). ``target_brightness``: the tuned model gives
    the target acquisition's brightness instead of keeping its input's (see :func:`pair_tuning`).
    """
    from .diffusion import training_log_sigma
    from .limits import check_budget
    from .models import Model, dated_name, default_model, free_name, install_model, load_model, save_model
    from .tasks import Progress, Settings, pick_device, pick_precision, relayed
    from .train import train

    if task not in TASKS:
        raise InputError(f"Fine-tuning supports {', '.join(TASKS)}, not {task}.")
    if (target is None) != (task == "isotropic"):
        raise InputError("Isotropic fine-tuning learns from one isotropic volume and takes no target."
                         if task == "isotropic" else "Fine-tuning needs the slow acquisition as the target.")
    check_budget(minutes, iterations)  # a zero or negative budget trained forever
    if output is not None and Path(output).suffix != ".npz":  # written exactly there, or refused before training
        raise InputError(f"Model files end in .npz; {Path(output).name} does not.")
    if minutes is None and iterations is None:
        minutes = 10.0
    if name and output is None:
        free_name(name)  # before the training, not after it
    started = time.perf_counter()
    dev = pick_device(device)
    base_model = load_model(base or default_model(task), device=dev, task=task)
    if base_model.meta.get("architecture") == "emdiffuse-guided":
        raise InputError(f"'{base_model.name}' is one of the EMDiffuse authors' networks; fine-tune it with their "
                         "code, or fine-tune one of this plugin's models here.")
    settings = Settings(samples=2, seed=seed, device=dev.type, precision=precision)
    if task == "isotropic":
        yield Progress(0, 1, "preparing the volume")
        tuning = volume_tuning(np.asarray(image), base_model, factor, batch or 8)
    else:
        yield Progress(0, 1, "registering the pair")
        tuning = pair_tuning(task, image, target, base_model, scale, batch or 4, target_brightness)

    def validate(net, seed: int) -> Generator:
        """Validation PSNR of ``net`` on the data kept aside, sampled with ``seed``; yields the restoration's
        progress as validation's."""
        job = tuning.validate(Model(net=net, meta=base_model.meta, name=base_model.name, sampling=base_model.sampling),
                              replace(settings, seed=seed))
        return (yield from relayed(job, lambda p: Progress(p.done, p.total, f"validating: {p.message}")))

    seeds = [seed + i for i in range(VALIDATION_SEEDS)]
    before = []
    for s in seeds:  # the base model, with every seed the candidate will be judged with
        before.append((yield from validate(base_model.net, s)))
    best = {"psnr": before[0], "state": None, "step": 0}  # checkpoints are ranked with the first seed
    net = copy.deepcopy(base_model.net).float()

    def consider(ema, step) -> Generator:
        score = yield from validate(ema, seeds[0])
        validation.append((step, score))
        if score > best["psnr"]:
            best.update(psnr=score, state=copy.deepcopy(ema.state_dict()), step=step)
        yield ValidationPoint(step, score, before[0])

    history, validation = [], [(0, before[0])]
    # the noise levels the base model's sampler visits: steps spent elsewhere do not change what users get
    log_sigma = training_log_sigma(base_model.sampling["sigma_end"], base_model.sampling["sigma_max"])
    job = train(net, tuning.batches(seed), iterations=iterations, minutes=minutes, lr=lr, ema_decay=0.995,
                seed=seed, device=dev, report_every=5, warmup=20, checkpoint_minutes=validate_every_minutes,
                log_sigma=log_sigma, precision=pick_precision(precision, dev))
    while True:  # cancelled (closed) here, nothing is written: only a candidate judged with every seed is saved
        try:
            progress = next(job)
        except StopIteration as stop:
            ema = stop.value
            break
        history.append((progress.step, progress.loss))
        yield progress
        if progress.checkpoint is not None:
            yield from consider(progress.checkpoint, progress.step)
    yield from consider(ema, history[-1][0] if history else 0)
    after = list(before)
    if best["state"] is not None:
        net.load_state_dict(best["state"])
        after = [best["psnr"]]
        for s in seeds[1:]:
            after.append((yield from validate(net, s)))
    verdict = judge(before, after)
    reg = tuning.registration
    path = None
    if verdict.improved:
        meta = {k: v for k, v in base_model.meta.items() if k != "name"}
        meta["brightness"] = "target" if target_brightness and task != "isotropic" else "input"
        meta["finetune"] = {
            "base": base_model.name, "val_psnr_before": verdict.before, "val_psnr_after": verdict.after,
            "val_psnr_spread": verdict.spread, "val_seeds": seeds, "step": best["step"], **tuning.record,
            "seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d"),
        }
        meta["description"] = f"{base_model.name} fine-tuned on {tuning.about} ({time.strftime('%Y-%m-%d')})"
        model_name = name or dated_name(f"{base_model.name}-finetuned")
        if output is not None:
            path = save_model(net, {**meta, "name": Path(output).stem}, output)
            model_name = Path(path).stem
        else:
            path = install_model(net, meta, model_name)
        message = (f"Validation PSNR {verdict.before:.2f} -> {verdict.after:.2f} dB ({verdict.gain:+.2f}, more than "
                   f"the spread of {verdict.spread:.2f} dB between {len(seeds)} seeds); saved as '{model_name}'.")
    else:
        model_name = base_model.name
        message = (f"Fine-tuning did not help: validation PSNR {verdict.before:.2f} -> {verdict.after:.2f} dB "
                   f"({verdict.gain:+.2f}), not more than the spread of {verdict.spread:.2f} dB between "
                   f"{len(seeds)} seeds; the base model '{base_model.name}' is kept and nothing was saved.")
        message += (f" Likely why: {reg.warning}." if reg is not None and reg.warning else
                    " Likely why: the budget was too short to learn more than the base model knows"
                    + (f" ({history[-1][0]} steps)." if history else "."))
    if reg is not None:
        message += (f" Registration: shift ({reg.shift[0]:+.2f}, {reg.shift[1]:+.2f}) px, rotation "
                    f"{reg.rotation:+.2f}°, scale {reg.scale:.4f}; residual misalignment {reg.residual:.2f} px "
                    f"(median), {reg.residual_p95:.2f} px (95th percentile) over 64-px blocks.")
        if verdict.improved and reg.warning:
            message += f" Note: {reg.warning}."
    return FinetuneResult(verdict.improved, model_name, path, verdict.before, verdict.after, reg,
                          history[-1][0] if history else 0, message, history, verdict.spread, validation)


VALIDATION_SEEDS = 3  # a candidate is judged against the base with these many sampling seeds, the same for both


@dataclass
class ValidationPoint:
    """Yielded after each checkpoint's validation (for the loss plot)."""

    step: int
    psnr: float  # of the checkpoint, first seed
    base: float  # of the base model, same seed

    @property
    def message(self) -> str:
        return f"validation PSNR {self.psnr:.2f} dB at step {self.step} (base model {self.base:.2f})"


@dataclass
class Verdict:
    improved: bool
    before: float  # mean validation PSNR of the base model over the seeds
    after: float  # of the candidate, same seeds and settings
    gain: float
    spread: float  # seed-to-seed standard deviation (the larger of the two models')


def judge(before: list[float], after: list[float], margin: float = 0.0) -> Verdict:
    """A candidate improves on the base only when it is better with every seed and its mean gain exceeds the
    seed-to-seed spread: a difference within that spread is chance of the sampling, not learning. ``margin`` (dB):
    the least gain that counts where the spread says little (a base that draws no noise)."""
    b, a = np.asarray(before, float), np.asarray(after, float)
    spread = float(max(b.std(ddof=1), a.std(ddof=1))) if len(b) > 1 else 0.0
    gain = float(a.mean() - b.mean())
    improved = bool(len(a) == len(b) and (a > b).all() and gain > max(spread, margin))
    return Verdict(improved, float(b.mean()), float(a.mean()), gain, spread)
