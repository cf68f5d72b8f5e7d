"""The restoration jobs, as generators: they yield :class:`Progress` and return a :class:`Restoration`.

One code path serves every front end: napari runs a job in a thread worker (progress in the Activity dock,
cancel between two yields), the CLI and the tests drive it synchronously with :func:`drive`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from .normalize import InputError, Normalizer, check_image

UNCERTAINTY_THRESHOLD = 0.12  # the paper's reliability threshold on the 99th percentile of the std map
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class Settings:
    """How to sample. ``None`` means: use the model's default."""

    samples: int = 2
    steps: int | None = None
    seed: int = 0
    tile: int = 256
    overlap: int = 32  # at most a quarter of the tile is used
    device: str = "auto"
    precision: str = "auto"  # of the network's evaluations: auto, float32 or bfloat16 (see pick_precision)
    threshold: float = UNCERTAINTY_THRESHOLD
    sampler: str | None = None
    eta: float | None = None  # stochasticity of the sampler: 1 ancestral, 0 deterministic (DDIM)
    difficulty: bool = False  # also return the difficulty map phi
    # where the image's first output pixel lies in the full output plane, when the image is a chunk of a larger
    # one: the noise field and the tile grid are anchored there, so chunks match the whole-plane result
    origin: tuple[int, int] = (0, 0)

    def __post_init__(self):
        """Every number checked by the one validation (core/limits.py), whichever front end made the settings."""
        from .diffusion import SAMPLERS
        from .limits import check_choice, check_number, check_optional

        self.samples = check_number("samples", self.samples)
        self.steps = check_optional("steps", self.steps)
        self.seed = check_number("seed", self.seed)
        self.tile = check_number("tile", self.tile)
        self.overlap = check_number("overlap", self.overlap)
        if self.overlap >= self.tile:
            raise InputError("The tile overlap must be smaller than the tile.")
        self.threshold = check_number("threshold", self.threshold)
        self.eta = check_optional("eta", self.eta)
        if self.sampler is not None:
            check_choice("sampler", self.sampler, SAMPLERS)
        if len(self.origin) != 2 or min(self.origin) < 0:
            raise InputError("The origin of a chunk cannot be negative.")
        check_precision(self.precision)


@dataclass
class Progress:
    done: int
    total: int
    message: str


class Throttle:
    """Whether to show progress now: at most once every ``seconds``, and always for the last report (a widget's
    every update repaints the window; a terminal's every line scrolls)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock, self.shown = seconds, clock, -np.inf

    def __call__(self, last: bool = False) -> bool:
        now = self.clock()
        if not last and now - self.shown < self.seconds:
            return False
        self.shown = now
        return True


class TimeLeft:
    """How long a job still needs, extrapolated from its progress so far; call it with each progress report.

    A new ``total`` starts a new phase (self-supervised learning, then the reconstruction), timed afresh. There is
    no estimate until a phase has run ``min_seconds`` and done ``min_fraction`` of its work: the first planes
    include warm-up and would promise too much or too little.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, min_seconds: float = 3.0,
                 min_fraction: float = 0.02):
        self.clock, self.min_seconds, self.min_fraction = clock, min_seconds, min_fraction
        self.total = self.first = self.started = None

    def __call__(self, done: int, total: int) -> float | None:
        now = self.clock()
        if total != self.total:
            self.total, self.first, self.started = total, done, now
        fraction = (done - self.first) / (total - self.first) if total > self.first else 0.0
        elapsed = now - self.started
        if elapsed < self.min_seconds or fraction < self.min_fraction:
            return None
        return elapsed * (1 - fraction) / fraction


def time_left_text(seconds: float | None) -> str:
    """``"about 3 min left"``, rounded as a person would say it; empty without an estimate."""
    if seconds is None:
        return ""
    if seconds < 10:
        return "a few seconds left"
    if seconds < 90:
        return f"about {5 * round(seconds / 5):.0f} s left"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60:02d} min left"


@dataclass
class Restoration:
    image: np.ndarray  # in the input's dtype and intensity range
    uncertainty: np.ndarray | None  # float32 predictive_spread, normalised [0, 1] units; see gives_uncertainty
    difficulty: np.ndarray | None  # float32 phi, normalised units, when asked for
    info: dict = field(default_factory=dict)


def uncertainty_score(uncertainty: np.ndarray) -> float:
    """The image-level summary of the std map: its 99th percentile."""
    return float(np.percentile(uncertainty, 99))


class ResultError(InputError):
    """The model gave values that are not finite (NaN or infinity): nothing of it may be written or called reliable."""


NOT_FINITE_RESULT = ("The model gave NaN or infinite values, so nothing was written; check the model file and the "
                     "sampler settings (steps, eta).")


def check_finite_result(*maps: np.ndarray | None) -> None:
    """Refuse a result (or one plane or chunk of it) with a value that is not finite."""
    if any(m is not None and not np.isfinite(m).all() for m in maps):
        raise ResultError(NOT_FINITE_RESULT)


def is_reliable(score: float, threshold: float) -> bool:
    """The verdict: a finite score at most the threshold (a NaN score is never reliable)."""
    return bool(np.isfinite(score) and score <= threshold)


def verdict(score: float, threshold: float) -> str:
    """The reliability verdict, with both numbers printed to as many decimals as it takes for them to compare as
    the values do (0.12018 against 0.12 prints as 0.12018 > 0.12000, never 0.120 > 0.120)."""
    reliable = is_reliable(score, threshold)
    digits = 3
    while digits < 9 and np.isfinite(score) and (round(score, digits) <= round(threshold, digits)) != reliable:
        digits += 1
    shown, limit = f"{score:.{digits}f}", f"{threshold:.{digits}f}"
    if reliable:
        return f"reliable: uncertainty score {shown} ≤ {limit}"
    return f"NOT reliable: uncertainty score {shown} > {limit}; check the flagged areas"


def pick_device(name: str = "auto"):
    import torch

    from .triton_guard import keep_triton_out

    keep_triton_out()  # every job starts here: no torch work of ours may load triton where it would crash

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA GPU is available.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("Apple MPS was requested but is not available.")
    if name not in ("cpu", "cuda", "mps"):
        raise InputError(f"Unknown device '{name}' (use auto, cpu, cuda or mps).")
    return torch.device(name)


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise InputError(f"Unknown precision '{name}' (use {', '.join(PRECISIONS)}).")
    return name


def native_bfloat16_cpu() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX); elsewhere bfloat16 is emulated."""
    import torch

    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def pick_precision(name: str, device) -> str:
    """The precision of the network's evaluations on ``device``: ``"float32"`` or ``"bfloat16"``.

    ``auto`` is bfloat16 only on CPUs that compute it natively, where it cuts the time by a third (2-core EPYC,
    denoising 1600 x 1600: 12.6 -> 8.7 s) for a change far below the models' error (real SEM pair: 32.071 ->
    32.070 dB); float32 everywhere else, GPUs included: on an H200 these small networks gained nothing from it
    (denoising 1600 x 1600: 0.80 s float32, 0.79 s bfloat16; super-resolution 0.59 vs 0.79 s). The choice depends
    on the machine alone, so the same seed still gives the same result on it. Sampling itself always runs in float32.
    """
    import torch

    if check_precision(name) == "auto":
        return "bfloat16" if device.type == "cpu" and native_bfloat16_cpu() else "float32"
    if name == "bfloat16" and (device.type == "mps" or device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        raise InputError(f"bfloat16 is not available on this {device.type.upper()} device; use float32.")
    return name


def drive(job: Generator, on_progress: Callable[[Progress], None] | None = None):
    """The synchronous shell: run a job to the end and return its result.

    When ``on_progress`` raises (to cancel) or the user interrupts, the job is closed at once, so its clean-up
    (e.g. a chunked run stopping its tasks) runs before the exception goes on.
    """
    try:
        while True:
            try:
                item = next(job)
            except StopIteration as stop:
                return stop.value
            if on_progress is not None:
                on_progress(item)
    finally:
        job.close()


def sample_plane(model, cond: np.ndarray, start: np.ndarray, settings: Settings, device, tile: int, batch: int,
                 label: int | None = None) -> Generator[int, None, tuple]:
    """Draw ``settings.samples`` samples for one plane, conditioned on ``cond`` (C, H, W) in normalised units.

    Sampling starts at ``start`` (H, W) plus noise: the degraded image brought to the output grid.
    Returns the per-pixel mean, the uncertainty (:func:`predictive_spread`) and phi (when asked for), all (H, W),
    and notes on memory fallbacks.
    """
    import torch

    from .diffusion import SAMPLERS, difficulty_in_image_units
    from .tiling import NoiseField, TiledDenoiser, pad_to, padded_size

    h, w = start.shape
    ph, pw, _ = padded_size(h, w, tile, model.net.config.multiple)
    to_model = lambda a: pad_to(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) * 2 - 1, ph, pw)  # noqa: E731
    cond_t = to_model(cond[None])
    start_t = to_model(start[None, None])
    k = settings.samples
    sampling = model.sampling
    sigmas = sampling_sigmas(model, settings)
    sampler = SAMPLERS[settings.sampler or sampling["sampler"]]
    dtype = torch.bfloat16 if pick_precision(settings.precision, device) == "bfloat16" else None
    denoiser = TiledDenoiser(model.net, cond_t, tile, settings.overlap, batch, device, label, settings.origin, dtype)
    noise = NoiseField(settings.seed, k, ph, pw, settings.origin)  # one field for the whole image
    # a residual model diffuses only the difference from the start (e.g. from the linear interpolation between
    # two sections): a small correction, learnt much faster than the whole image (self-supervised training)
    base = start_t if model.meta.get("residual") else torch.zeros_like(start_t)
    x = (start_t - base).expand(k, 1, ph, pw) + sigmas[0] * noise()
    eta = settings.eta if settings.eta is not None else sampling["eta"]
    result = (yield from sampler(denoiser, x, sigmas, noise, eta=eta)) + base
    samples = (result[..., :h, :w].numpy() + 1) / 2
    phis = None
    if denoiser.first_log_phi is not None:
        phis = difficulty_in_image_units(denoiser.first_log_phi[..., :h, :w], sigmas[0]).numpy()
    phi = phis.mean(0)[0] if settings.difficulty and phis is not None else None
    return samples.mean(0)[0], predictive_spread(samples, phis)[0], phi, denoiser.notes


def sampling_sigmas(model, settings: Settings) -> list[float]:
    """The noise levels the sampler visits: ``steps`` levels from the model's ``sigma_max`` down to its
    ``sigma_end``, or, for the authors' own sampler, every level of their test schedule."""
    from .diffusion import karras_sigmas

    if (settings.sampler or model.sampling["sampler"]) == "authors":
        if "schedule" not in model.meta:
            raise InputError(f"The authors' sampler needs one of the authors' models; '{model.name}' is not one.")
        from .guided_unet import authors_sigmas

        return authors_sigmas(model.meta)
    sampling = model.sampling
    return karras_sigmas(settings.steps or sampling["steps"], sampling["sigma_end"], sampling["sigma_max"])


def step_count(model, settings: Settings) -> int:
    return len(sampling_sigmas(model, settings))


def gives_uncertainty(model, settings: Settings) -> bool:
    """Two samples or more, or one from a model that predicts its own spread (a difficulty head)."""
    return settings.samples > 1 or model.net.config.difficulty_head


def predictive_spread(samples: np.ndarray, phis: np.ndarray | None) -> np.ndarray:
    """Per-pixel standard deviation of the model's prediction, from K samples (K, ...) and their difficulty maps.

    Each sample is a mean of the model's per-pixel Gaussian (the difficulty-aware loss trains phi as its standard
    deviation, at the first and noisiest step: the spread of the whole posterior), so by the law of total variance
    the prediction's variance is the variance between the samples plus the mean phi^2. A few-step sampler draws
    samples that differ far less than the posterior does; phi restores the missing spread, which makes the map
    follow the actual error (real SEM pair, 16 x 16 patches: Spearman 0.36 -> 0.44) at the error's own scale.
    Population variance between samples, as the paper's threshold assumes. Without phi: the samples' std alone.
    """
    variance = samples.var(0)
    if phis is not None:
        variance = variance + (phis.astype(np.float64) ** 2).mean(0)
    return np.sqrt(variance).astype(np.float32)


def plan_tiles(model, shape: tuple[int, int], settings: Settings, device) -> tuple[int, int, int, str | None]:
    """Tile size and batch that fit in memory for an output plane of ``shape``, the evaluations per plane, a note."""
    from .memory import fit_to_memory
    from .tiling import padded_size, tile_plan

    multiple = model.net.config.multiple
    ph, pw, tile = padded_size(*shape, settings.tile, multiple)
    batch = 16 if device.type != "cpu" else 2  # small batches on CPU: no speed lost, finer progress and cancel
    tile, batch, note = fit_to_memory(ph, pw, settings.samples, tile, batch, device, multiple)
    tiles = len(tile_plan(ph, pw, tile, settings.overlap, settings.origin)[0])
    evaluations = step_count(model, settings) * -(-settings.samples * tiles // batch)
    return tile, batch, evaluations, note


@dataclass
class PlaneJob:
    """One output plane to sample: its condition (C, H, W) and start (H, W), normalised, the model label, and
    where it goes in the result (its index along z)."""

    cond: np.ndarray
    start: np.ndarray
    label: int | None
    index: int
    where: str  # for progress messages, e.g. " slice 3/40"
    brightness: float | None = None  # keep the start's brightness at this scale (output pixels): see keep_brightness


class PlaneResults:
    """A job's result, allocated once and filled plane by plane: the output in the input's dtype and range (each
    plane mapped back by ``norm`` as it arrives) and the float32 maps.

    A stack's result can be many times the input (x4: 16 times, R = 10 along z: 10 times), so it is checked against
    the free memory before any work, and it is never held twice (per-plane lists stacked at the end had needed
    about 40 bytes per output voxel; an 8-bit result with its uncertainty map needs 5, 9 while it is scored).
    """

    def __init__(self, shape: tuple[int, ...], norm: Normalizer, uncertainty: bool, difficulty: bool):
        from .memory import check_result_fits, result_bytes

        check_result_fits(result_bytes(shape, norm.dtype, uncertainty + difficulty))
        self.norm = norm
        self.image = np.zeros(shape, norm.dtype)
        self.uncertainty = np.zeros(shape, np.float32) if uncertainty else None
        self.difficulty = np.zeros(shape, np.float32) if difficulty else None

    def put(self, index: int, mean: np.ndarray, std: np.ndarray, phi: np.ndarray | None) -> None:
        """Store one plane, refusing it if any value is not finite (clipping would hide NaN as zeros)."""
        check_finite_result(mean, std if self.uncertainty is not None else None,
                            phi if self.difficulty is not None else None)
        self.image[index] = self.norm.inverse(mean)
        if self.uncertainty is not None:
            self.uncertainty[index] = std
        if self.difficulty is not None:
            self.difficulty[index] = phi


def task_model(model, task: str, device):
    """``model`` (a name, a file or None for the bundled default) loaded onto ``device``; a loaded Model as it is
    (fine-tuning passes the model it is training)."""
    from .models import Model, default_model, load_model

    if isinstance(model, Model):
        return model
    return load_model(model or default_model(task), device=device, task=task)


def prepare(image, model, settings: Settings, task: str, norm: Normalizer | None = None):
    """Check the input, pick the device, load the model and fit the normalisation (unless given, e.g. for a chunk
    of a larger volume, whose percentiles must be the whole volume's)."""
    image = check_image(image)
    device = pick_device(settings.device)
    return image, device, task_model(model, task, device), norm or Normalizer.fit(image)


def sample_planes(model, jobs, count: int, results: PlaneResults, settings: Settings, device,
                  task: str) -> Generator[Progress, None, tuple]:
    """Sample ``count`` planes from the :class:`PlaneJob` iterable ``jobs`` into ``results``.

    Returns the tile size used and notes on memory fallbacks. Every plane uses the same seed, so the stochastic
    detail is coherent from one plane to the next.
    """
    tile, batch, per_plane, note = plan_tiles(model, results.image.shape[-2:], settings, device)
    notes = [note] if note else []
    total, done = per_plane * count, 0
    yield Progress(0, total, f"{task}: starting on {device.type}")
    try:
        for plane in jobs:
            job = sample_plane(model, plane.cond, plane.start, settings, device, tile, batch, plane.label)
            while True:
                try:
                    next(job)
                    done += 1
                except StopIteration as stop:
                    mean, std, phi, plane_notes = stop.value
                    notes += [n for n in plane_notes if n not in notes]
                    break
                yield Progress(done, total, f"{task}{plane.where}")
            if plane.brightness:
                mean = keep_brightness(mean, plane.start, plane.brightness)
            results.put(plane.index, mean, std, phi)
    finally:
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
    yield Progress(total, total, f"{task}: done")
    return tile, notes


BRIGHTNESS_SIGMA = 8.0  # input pixels: far above the scale of any structure a model restores, far below a field


def keeps_input_brightness(model) -> bool:
    """Whether ``model``'s results keep the input's brightness (all models, unless one was fine-tuned to adopt its
    target acquisition's, on request)."""
    return model.meta.get("brightness", "input") == "input"


def keep_brightness(mean: np.ndarray, reference: np.ndarray, sigma: float) -> np.ndarray:
    """``mean`` with its local brightness (a Gaussian average of ``sigma`` pixels) made ``reference``'s.

    Noise averages out at that scale, so the degraded image itself says how bright the field is; a model need not
    know it, and may have learnt otherwise: the bundled denoiser, trained on a pair whose long-dwell image is 3 grey
    levels darker, darkened unseen real SEM by as much. Only the local mean moves (detail, and the uncertainty, are
    the model's); a chunk's halo of one tile is many sigmas wide, so chunked and whole-plane results still agree.
    """
    from scipy.ndimage import gaussian_filter

    return mean + gaussian_filter(reference, sigma, mode="nearest") - gaussian_filter(mean, sigma, mode="nearest")


def summarise(task: str, model, settings: Settings, device, uncertainty: np.ndarray | None, tile: int,
              notes: list[str], started: float, **extra) -> dict:
    """The result's ``info``: what was run, and the uncertainty score and verdict of ``uncertainty``."""
    from .. import __version__

    score = uncertainty_score(uncertainty) if uncertainty is not None else float("nan")
    return {
        "task": task,
        "model": model.name,
        "samples": settings.samples,
        "steps": step_count(model, settings),
        "sampler": settings.sampler or model.sampling["sampler"],
        "eta": settings.eta if settings.eta is not None else model.sampling["eta"],
        "seed": settings.seed,
        "device": device.type,
        "precision": pick_precision(settings.precision, device),
        "threshold": settings.threshold,
        "uncertainty_score": score,
        "reliable": is_reliable(score, settings.threshold) if uncertainty is not None else None,
        "flagged_fraction": float((uncertainty > settings.threshold).mean()) if uncertainty is not None else None,
        "tile": tile,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 3),
        "software": f"napari-emdiffuse {__version__}",
        **extra,
    }


def restore(image, model, settings: Settings, task: str,
            condition: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
            out_shape: Callable[[tuple[int, int]], tuple[int, int]] = lambda s: s,
            variant: str | None = None, norm: Normalizer | None = None) -> Generator[Progress, None, Restoration]:
    """Restore a 2D image or each plane of a 3D stack.

    ``condition(plane)`` maps a normalised input plane to ``(cond, start)`` on the output grid. The stack is
    normalised as a whole (consistent intensities along z). The result keeps the start's brightness (see
    :func:`keep_brightness`) unless the model was tuned to adopt another acquisition's. ``variant`` picks the label of models that serve
    several settings (e.g. the scale factor ``"2"`` of a super-resolution model).
    """
    started = time.perf_counter()
    image, device, model, norm = prepare(image, model, settings, task, norm)
    label = model_label(model, variant)
    planes = image[None] if image.ndim == 2 else image
    plane_shape = out_shape(planes.shape[-2:])
    results = new_results(model, settings, (len(planes), *plane_shape), norm)
    brightness = BRIGHTNESS_SIGMA * plane_shape[0] / planes.shape[-2] if keeps_input_brightness(model) else None

    def jobs():
        for z, plane in enumerate(planes):
            cond, start = condition(norm(plane))
            yield PlaneJob(cond, start, label, z, f" slice {z + 1}/{len(planes)}" if len(planes) > 1 else "",
                           brightness)

    tile, notes = yield from sample_planes(model, jobs(), len(planes), results, settings, device, task)
    squeeze = (lambda a: a if a is None or image.ndim == 3 else a[0])  # noqa: E731
    info = summarise(task, model, settings, device, squeeze(results.uncertainty), tile, notes, started)
    return Restoration(squeeze(results.image), squeeze(results.uncertainty), squeeze(results.difficulty), info)


def result_maps(model, settings: Settings) -> tuple[bool, bool]:
    """Which maps a run of ``model`` with ``settings`` gives: (uncertainty, difficulty)."""
    return gives_uncertainty(model, settings), settings.difficulty and model.net.config.difficulty_head


def new_results(model, settings: Settings, shape: tuple[int, ...], norm: Normalizer) -> PlaneResults:
    """The result's arrays, of ``shape``, for ``model`` run with ``settings``."""
    return PlaneResults(shape, norm, *result_maps(model, settings))


def model_label(model, variant: str | None) -> int | None:
    """The integer label a multi-variant model needs for ``variant``; None for single-variant models."""
    labels = model.meta.get("labels")
    if not labels:
        return None
    if variant not in labels:
        raise InputError(f"The model '{model.name}' supports {', '.join(sorted(labels))}, not {variant}.")
    return int(labels[variant])


def denoise(image, model: str | None = None, settings: Settings | None = None,
            norm: Normalizer | None = None) -> Generator[Progress, None, Restoration]:
    """EMDiffuse-n: restore a noisy (short-dwell) acquisition; the noisy image is both condition and start."""
    return (yield from restore(image, model, settings or Settings(), "denoise", lambda plane: (plane[None], plane),
                               norm=norm))


def upsample(plane: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic upsampling onto the finer grid (pixel centres aligned as a detector with larger pixels sees them)."""
    import torch
    from torch.nn import functional as F

    t = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None]
    return F.interpolate(t, scale_factor=factor, mode="bicubic", align_corners=False)[0, 0].numpy()


SUPERRES_SCALES = (2, 4)


def superres(image, model: str | None = None, settings: Settings | None = None,
             scale: int = 2, norm: Normalizer | None = None) -> Generator[Progress, None, Restoration]:
    """EMDiffuse-r: joint denoising and super-resolution by ``scale``; the output is ``scale`` times larger in y, x.

    The condition (and the start of sampling) is the noisy low-resolution image upsampled bicubically. A model
    without a x4 variant (the bundled one) makes x4 as two x2 steps, the second restoring the first's output: on
    held-out FIB-SEM that beat the direct x4 of a model trained for both (strong noise: 21.75 vs 20.87 dB).
    """
    settings = settings or Settings()
    if scale not in SUPERRES_SCALES:
        raise InputError(f"The super-resolution factor must be 2 or 4, not {scale}.")
    model = task_model(model, "superres", pick_device(settings.device))  # its variants decide how x4 is made
    if superres_steps(model, scale) == (2, 2):
        return (yield from _superres_in_two_steps(image, model, settings, norm))

    def condition(plane):
        up = upsample(plane, scale)
        return up[None], up

    result = yield from restore(image, model, settings, "superres", condition,
                                lambda shape: (shape[0] * scale, shape[1] * scale), variant=str(scale), norm=norm)
    result.info["scale"] = scale
    return result


def superres_steps(model, scale: int) -> tuple[int, ...]:
    """The upsampling steps ``model`` makes ``scale`` in: x4 is two x2 steps unless the model has a x4 variant."""
    return (2, 2) if scale == 4 and "4" not in (model.meta.get("labels") or {"4": 0}) else (scale,)


def _superres_in_two_steps(image, model, settings: Settings, norm: Normalizer | None):
    """x4 as x2 twice. Uncertainties add in quadrature (the first step's brought to the final grid)."""
    import dataclasses

    from .memory import check_result_fits, result_bytes

    started = time.perf_counter()
    image = check_image(image)
    norm = norm or Normalizer.fit(image)  # one intensity mapping for both steps
    maps = sum(result_maps(model, settings))
    grid = image.shape[:-2]
    check_result_fits(sum(result_bytes((*grid, image.shape[-2] * f, image.shape[-1] * f), image.dtype, maps)
                          for f in (2, 4)))  # both steps' results, before the first step's work
    first_grid = dataclasses.replace(settings, origin=(settings.origin[0] // 2, settings.origin[1] // 2))
    first = yield from _share_of_progress(superres(image, model, first_grid, 2, norm), 0, 20)
    second = yield from _share_of_progress(superres(first.image, model, settings, 2, norm), 20, 100)

    def combined(a, b):  # into b, plane by plane: no temporaries of the final size
        if a is None or b is None:
            return b
        for pa, pb in zip(*((a[None], b[None]) if a.ndim == 2 else (a, b))):
            up = np.clip(upsample(pa, 2), 0, None)
            np.sqrt(up * up + pb * pb, out=pb)
        return b

    uncertainty = combined(first.uncertainty, second.uncertainty)
    info = summarise("superres", model, settings, pick_device(settings.device), uncertainty, second.info["tile"],
                     first.info["notes"] + second.info["notes"], started, scale=4, passes=2)
    return Restoration(second.image, uncertainty, combined(first.difficulty, second.difficulty), info)


def relayed(job: Generator, report: Callable[[Progress], Progress]) -> Generator:
    """Run ``job`` inside another job: yield ``report(p)`` for each of its progress reports, return its result."""
    try:
        while True:
            try:
                p = next(job)
            except StopIteration as stop:
                return stop.value
            yield report(p)
    finally:
        job.close()  # cancelled between two yields: stop the inner job too


def _share_of_progress(job: Generator, start: int, end: int):
    """Run ``job``, reporting its progress as the part from ``start`` to ``end`` of 100."""
    return relayed(job, lambda p: Progress(start + round((end - start) * p.done / max(p.total, 1)), 100, p.message))
