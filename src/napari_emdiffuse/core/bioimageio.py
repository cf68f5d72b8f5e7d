"""BioImage.io model packages (format 0.5) of our models, and adding such a package back (no Qt, no napari).

A package holds the whole restoration as one TorchScript forward: percentile normalisation as our pipeline fits it,
the condition (the noisy image, or its bicubic upsampling for super-resolution), the model's few-step sampler with a
fixed seed, K samples in the pipeline's mirror orientations and antithetic noise pairs, and back to the input's
intensities. It returns the restored image (the mean of the samples) and the uncertainty map (their spread with the
difficulty head's phi, :func:`tasks.predictive_spread`), so any BioImage.io consumer (bioimageio.core, deepImageJ,
ilastik, ...) runs it without this plugin.

The sampler is not re-implemented: every sampler in :mod:`diffusion` is linear in the current estimate, the
denoised estimates and the noise, so running it once on basis vectors (:func:`linear_plan`) gives the coefficients
of each step, which the TorchScript forward applies to images. The noise is a hash of (seed, step, sample pair,
pixel position): reproducible on any machine and device without a random-number generator.

Isotropic reconstruction is exported differently: its sections' motion is estimated and interpolated before
sampling, so its package holds the network's state dict and names :func:`isotropic_restorer` (this module) as the
architecture; its forward is the plugin's own pipeline (:func:`isotropic.isotropic`) at a z factor fixed at export,
and the package lists napari-emdiffuse as its dependency.

The package also carries the model's own ``.npz`` file. Adding a package back reads that file, with every check an
``.npz`` gets (plain arrays only, weights matching the network): nothing in a package is executed on import.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .models import SAMPLING_DEFAULTS, ModelFileError, read_metadata, resolve

FORMAT = "bioimageio"
MODEL_FILE = "napari-emdiffuse-model.npz"  # the package's attachment that the plugin adds back
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
MAX_MODEL_BYTES = 256 * 2**20  # a model file in a package larger than this is refused (ours are a few MB)
CITATION = ("Lu, C., Chen, K., Qiu, H., Chen, X., Chen, G., Qi, X. & Jiang, H. Diffusion-based deep learning method "
            "for augmenting ultrastructural imaging and volume electron microscopy. Nat. Commun. 15, 4677 (2024).")
DOI = "10.1038/s41467-024-49125-z"
TEST_SIZE = 64  # pixels across the synthetic test image
# Run-to-run variation of the outputs for a fixed seed (benchmarks/bioimageio_reproducibility.py, bundled models on
# the test image; 1 vs 2 threads, with and without oneDNN): at most 3.1e-5 grey levels (relative 7.1e-7) in the
# restored image, 1.1e-7 (relative 9.8e-7) in the uncertainty. The tolerances are ten times that.
TOLERANCES = {"restored": {"relative_tolerance": 1e-5, "absolute_tolerance": 3e-4},
              "uncertainty": {"relative_tolerance": 1e-5, "absolute_tolerance": 1e-6}}
# the isotropic package (the pipeline's own forward, motion estimation included) on its 4 test sections: at most
# 4.6e-5 grey levels (relative 1.6e-6) in the reconstruction, 1.1e-7 (relative 2e-6) in the uncertainty
ISOTROPIC_TOLERANCES = {"restored": {"relative_tolerance": 2e-5, "absolute_tolerance": 5e-4},
                        "uncertainty": {"relative_tolerance": 2e-5, "absolute_tolerance": 1.2e-6}}
MISMATCHED_PER_MILLION = 100  # pixels allowed beyond them (bioimageio's default)


class BioImageIOError(ModelFileError):
    """A package cannot be made from a model, or a file is not a package this plugin can add back."""


# ----------------------------------------------------------------------------------------------------------------
# The sampler as coefficients


def linear_plan(sampler: str, sigmas: list[float], eta: float):
    """Coefficients of the sampler ``sampler`` (a name in :data:`diffusion.SAMPLERS`) over ``sigmas``.

    With the basis ``[x_start, D_0 .. D_{S-1}, n_1 .. n_{S-1}]`` (the start, the denoised estimate of each step, the
    fresh noise of each step), returns ``inputs`` (S, 1 + 2S): the network input of step i, and ``result``
    (1 + 2S,): the sampler's result, both as combinations of the basis.
    """
    import torch

    from .diffusion import SAMPLERS
    from .tasks import drive

    steps = len(sigmas)
    basis = torch.eye(1 + 2 * steps, dtype=torch.float64)
    inputs, drawn = [], []

    def denoiser(x, sigma):
        inputs.append(x.clone())
        return basis[len(inputs)]
        yield  # a generator, as the samplers expect

    def noise():
        drawn.append(None)
        return basis[steps + len(drawn)]

    result = drive(SAMPLERS[sampler](denoiser, basis[0].clone(), sigmas, noise, eta=eta))
    return torch.stack(inputs).float(), result.float()


# ----------------------------------------------------------------------------------------------------------------
# The TorchScript forward


def _restorer_class():
    """The module class, defined when torch is imported (this module imports without torch)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    @torch.jit.script
    def hash32(x: torch.Tensor) -> torch.Tensor:
        """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values in [0, 2^32)."""
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @torch.jit.script
    def hashed_noise(seed: int, step: int, samples: int, height: int, width: int,
                     device: torch.device) -> torch.Tensor:
        """Gaussian noise (samples, 1, height, width), a function of (seed, step, pixel): antithetic pairs, as the
        pipeline's ``NoiseField`` draws them (sample 2j + 1 gets the negated noise of sample 2j)."""
        pairs = (samples + 1) // 2
        key = hash32(hash32(torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64, device=device)) ^ step)
        pair = hash32(key ^ torch.arange(pairs, dtype=torch.int64, device=device))[:, None, None]
        y = torch.arange(height, dtype=torch.int64, device=device)[None, :, None]
        x = torch.arange(width, dtype=torch.int64, device=device)[None, None, :]
        h = hash32(pair ^ hash32(y * 65537 + hash32(x)))
        u1 = (hash32(h ^ 0x5BD1E995).double() + 0.5) / 4294967296.0
        u2 = (hash32(h ^ 0x27D4EB2F).double() + 0.5) / 4294967296.0
        drawn = (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).float()
        return torch.stack([drawn, -drawn], dim=1).reshape(2 * pairs, 1, height, width)[:samples]

    class Restorer(nn.Module):
        """raw (batch, 1, y, x) in any intensity range -> restored image (input intensities) and uncertainty
        (normalised units, the unit of the 0.12 threshold), each (batch, 1, Y, X)."""

        def __init__(self, net, samples: int, seed: int, scale: int, multiple: int, residual: bool,
                     sigmas: list[float], inputs, result, difficulty: bool):
            super().__init__()
            self.net = net
            self.samples, self.seed, self.scale, self.multiple = samples, seed, scale, multiple
            self.residual, self.difficulty = residual, difficulty
            self.sigmas = sigmas
            self.register_buffer("inputs", inputs)
            self.register_buffer("result", result)

        def percentiles(self, image: torch.Tensor) -> tuple[float, float]:
            """As ``Normalizer.fit``: the 0.5 and 99.5 percentiles of at most 2 million regularly spaced values."""
            flat = image.reshape(-1).double()
            if flat.numel() > 2_000_000:
                flat = flat[:: flat.numel() // 2_000_000]
            q = torch.quantile(flat, torch.tensor([0.005, 0.995], dtype=torch.float64, device=flat.device))
            low, high = float(q[0]), float(q[1])
            if high - low <= max(1e-12, abs(low) * 1e-9):
                high = low + max(1.0, abs(low) * 1e-6)
            return low, high

        def denoise(self, x: torch.Tensor, cond: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            """The preconditioned network's estimate D for each sample, evaluated in the sample's mirror
            orientation (as the pipeline's ``TiledDenoiser``), and log phi."""
            sigma = self.sigmas[step]
            total = math.sqrt(sigma**2 + 0.25)
            c_skip, c_out, c_in = 0.25 / total**2, sigma * 0.5 / total, 1 / total
            flips = [[-4], [-1], [-2], [-2, -1]]  # [-4]: no flip (an empty list does not script)
            xs, cs = [], []
            for k in range(x.shape[0]):
                dims = flips[k % 4]
                xs.append(x[k] if dims[0] == -4 else x[k].flip(dims))
                cs.append(cond[0] if dims[0] == -4 else cond[0].flip(dims))
            c_noise = torch.full((x.shape[0],), math.log(sigma) / 4, device=x.device)
            f, log_phi = self.net(c_in * torch.stack(xs), torch.stack(cs), c_noise)
            fs, phis = [], []
            for k in range(x.shape[0]):
                dims = flips[k % 4]
                fs.append(f[k] if dims[0] == -4 else f[k].flip(dims))
                phis.append(log_phi[k] if dims[0] == -4 else log_phi[k].flip(dims))
            return c_skip * x + c_out * torch.stack(fs), torch.stack(phis)

        def restore(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            low, high = self.percentiles(image)
            norm = ((image.double() - low) / (high - low)).float()
            if self.scale > 1:
                norm = F.interpolate(norm[None, None], scale_factor=float(self.scale), mode="bicubic",
                                     align_corners=False)[0, 0]
            h, w = norm.shape[0], norm.shape[1]
            ph, pw = -(-h // self.multiple) * self.multiple, -(-w // self.multiple) * self.multiple
            start = norm[None, None] * 2 - 1
            if ph != h or pw != w:
                mode = "reflect" if ph - h < h and pw - w < w else "replicate"
                start = F.pad(start, [0, pw - w, 0, ph - h], mode=mode)
            cond = start
            base = start if self.residual else torch.zeros_like(start)
            steps = len(self.sigmas)
            k = self.samples
            device = image.device
            basis = [(start - base).expand(k, 1, ph, pw) + self.sigmas[0] * hashed_noise(self.seed, 0, k, ph, pw,
                                                                                         device)]
            basis += [torch.zeros(k, 1, ph, pw, device=device) for _ in range(steps)]
            basis += [hashed_noise(self.seed, j, k, ph, pw, device) for j in range(1, steps)]
            first_log_phi = torch.zeros(k, 1, ph, pw, device=device)
            for i in range(steps):
                x = torch.zeros(k, 1, ph, pw, device=device)
                for j in range(len(basis)):
                    c = float(self.inputs[i, j])
                    if c != 0.0:
                        x = x + c * basis[j]
                basis[1 + i], log_phi = self.denoise(x, cond, i)
                if i == 0:
                    first_log_phi = log_phi
            result = torch.zeros(k, 1, ph, pw, device=device)
            for j in range(len(basis)):
                c = float(self.result[j])
                if c != 0.0:
                    result = result + c * basis[j]
            samples = ((result + base)[:, :, :h, :w] + 1) / 2
            variance = samples.var(0, unbiased=False)
            if self.difficulty:  # phi at the first step, in image units (diffusion.difficulty_in_image_units)
                sigma = self.sigmas[0]
                phi = first_log_phi[:, :, :h, :w].double().exp() * (sigma * 0.5 / math.sqrt(sigma**2 + 0.25)) / 2
                variance = variance + (phi**2).mean(0).float()
            mean = samples.mean(0)
            return (mean.double() * (high - low) + low).float(), torch.sqrt(variance)

        def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            images, spreads = [], []
            with torch.no_grad():
                for b in range(raw.shape[0]):
                    image, spread = self.restore(raw[b, 0])
                    images.append(image)
                    spreads.append(spread)
            return torch.stack(images), torch.stack(spreads)

    return Restorer


def _traceable(net, label: int | None):
    """The network as a function of (x, cond, c_noise) only, with its label fixed and log phi always a tensor."""
    import torch

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("label", torch.tensor([label if label is not None else 0]))  # moves with the net

        def forward(self, x, cond, c_noise):
            f, log_phi = self.net(x, cond, c_noise, None if label is None else self.label.expand(x.shape[0]))
            return f, (log_phi if log_phi is not None else torch.zeros_like(f))

    return Call()


def restorer(model, samples: int, seed: int, scale: int = 1):
    """The TorchScript module of ``model`` (a loaded :class:`models.Model`) with ``samples`` samples and ``seed``."""
    import copy

    import torch

    from .diffusion import karras_sigmas
    from .tasks import model_label

    sampling = {**SAMPLING_DEFAULTS, **model.sampling}
    sigmas = karras_sigmas(sampling["steps"], sampling["sigma_end"], sampling["sigma_max"])
    inputs, result = linear_plan(sampling["sampler"], sigmas, sampling["eta"])
    net = copy.deepcopy(model.net).float().cpu().eval().to(memory_format=torch.contiguous_format)
    for p in net.parameters():
        p.requires_grad_(False)
    label = model_label(model, str(scale)) if model.task == "superres" else None
    multiple = net.config.multiple
    example = (torch.zeros(samples, 1, 2 * multiple, 2 * multiple), torch.zeros(samples, 1, 2 * multiple,
                                                                                2 * multiple),
               torch.zeros(samples))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, which bioimageio lacks
        traced = torch.jit.trace(_traceable(net, label), example, check_trace=False)
        module = _restorer_class()(traced, samples, seed, scale if model.task == "superres" else 1, multiple,
                                   bool(model.meta.get("residual")), sigmas, inputs, result,
                                   net.config.difficulty_head)
        return torch.jit.script(module.eval())


def isotropic_restorer(meta: dict, factor: int, samples: int, seed: int):
    """The architecture of an exported isotropic model (BioImage.io ``pytorch_state_dict`` weights): a module whose
    forward takes sections (batch, 1, z, y, x) in any intensity range and returns the reconstruction (batch, 1,
    (z - 1) factor + 1, y, x) in the input's intensities and its uncertainty (normalised units), by the plugin's own
    pipeline with ``samples`` samples and ``seed``, in float32 on the device the weights are on."""
    import torch

    from .models import check_meta

    check_meta(meta, str(meta.get("name", "the package's model")))  # as strictly as a model file's metadata

    class IsotropicRestorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            from .models import build_network

            self.net = build_network(meta)

        def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            from .isotropic import isotropic
            from .models import _ready
            from .tasks import Settings, drive

            device = next(self.net.parameters()).device
            model = _ready(self.net, meta, Path(str(meta.get("name", "model"))), str(device))
            settings = Settings(samples=samples, seed=seed, device=device.type, precision="float32")
            images, spreads = [], []
            with torch.no_grad():
                for volume in raw[:, 0].detach().float().cpu().numpy():
                    made = drive(isotropic(volume, model, settings, factor, check_alignment=False))
                    images.append(torch.from_numpy(np.asarray(made.image, np.float32)))
                    spreads.append(torch.from_numpy(np.asarray(made.uncertainty, np.float32)))
            return torch.stack(images)[:, None].to(raw.device), torch.stack(spreads)[:, None].to(raw.device)

    return IsotropicRestorer()


# ----------------------------------------------------------------------------------------------------------------
# Export


def _need_spec() -> None:
    """bioimageio.spec, or a clear error where it is not installed (an optional dependency)."""
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError as err:
        raise BioImageIOError("BioImage.io packages need bioimageio.spec: pip install "
                              "'napari-emdiffuse[bioimageio]'.") from err


def _environment() -> str:
    """The conda environment an isotropic package runs in: its forward is napari-emdiffuse's pipeline."""
    return ("name: napari-emdiffuse\nchannels:\n  - conda-forge\ndependencies:\n  - python>=3.10\n  - pip\n"
            "  - pytorch\n  - pip:\n      - napari-emdiffuse\n")


def _isotropic_documentation(model, samples: int, seed: int, sampling: dict, factor: int) -> str:
    from .tasks import UNCERTAINTY_THRESHOLD

    return f"""# {model.name}: vEMDiffuse isotropic reconstruction (z factor {factor}) with uncertainty

Exported from napari-emdiffuse, an implementation of EMDiffuse and vEMDiffuse (Lu et al., Nat. Commun. 15, 4677,
2024, doi:{DOI}) for napari: model `{model.name}`. {model.meta.get('description', '')}

## What it does

The input is a stack of serial sections (or every {factor}th slice of a volume) whose z spacing is {factor} times
its pixel size. The output has {factor} times as many planes along z, (z - 1) x {factor} + 1 for z sections: the
acquired sections are kept exactly (planes 0, {factor}, {2 * factor}, ...) and the {factor - 1} planes between each
pair are generated. Each generated plane starts from a motion-compensated interpolation of its two sections (the
structures' motion between them estimated by Lucas-Kanade optical flow) and the network, told where the plane
lies between its sections, corrects it.

## A stochastic model

vEMDiffuse is a conditional diffusion model: it *samples* plausible planes given the sections. This package runs
the model's sampler ({sampling['sampler']}, {sampling['steps']} step(s), from noise level {sampling['sigma_max']})
{samples} times with a **fixed seed ({seed})**: the same input gives the same output; another seed would give
(slightly) different detail wherever the sections do not determine it.

## Input and outputs

- **input** `raw`: sections (batch, channel 1, z, y, x), at least 2, any intensity range. They are normalised as a
  whole (0.5 and 99.5 percentiles to 0 and 1).
- **output** `restored`: the reconstruction, the mean of the {samples} samples, in the input's intensities
  (float32), (z - 1) x {factor} + 1 planes.
- **output** `uncertainty`: the per-pixel standard deviation of the prediction in normalised units: the variance
  between the samples plus the mean of phi², the error the network's difficulty head predicts (the law of total
  variance). It is 0 on the acquired sections. A reconstruction is called reliable when the 99th percentile over
  the generated planes is at most {UNCERTAINTY_THRESHOLD}.

## Running it

The weights are a PyTorch state dict; the architecture is `napari_emdiffuse.core.bioimageio.isotropic_restorer`,
whose forward is napari-emdiffuse's own pipeline (tiling with one noise field, motion estimation, sampling), so the
package needs napari-emdiffuse installed (`environment.yaml`). In napari, add the package (*Add a model file…* in
a task widget's model menu, or `emdiffuse models --import FILE.zip`) to reconstruct at any z factor the model
serves, with bad sections, alignment and Zarr/Dask processing.

## Validation

The package passes `bioimageio test` (bioimageio.core), offline. Its test input is 4 synthetic sections
({TEST_SIZE} x {TEST_SIZE} pixels, 8-bit values, every {factor}th slice of a synthetic volume); the test outputs
are this package's own outputs for it. Tolerances: relative {ISOTROPIC_TOLERANCES['restored']['relative_tolerance']},
absolute {ISOTROPIC_TOLERANCES['restored']['absolute_tolerance']} (restored) and
{ISOTROPIC_TOLERANCES['uncertainty']['absolute_tolerance']} (uncertainty), ten times the largest difference measured
between runs with other thread counts (`benchmarks/bioimageio_reproducibility.py`).

## Citation

{CITATION} https://doi.org/{DOI}
"""


def _documentation(model, samples: int, seed: int, scale: int, sampling: dict, factor: int = 1) -> str:
    from .tasks import UNCERTAINTY_THRESHOLD

    if model.task == "isotropic":
        return _isotropic_documentation(model, samples, seed, sampling, factor)
    task = {"denoise": "denoising", "superres": f"joint denoising and x{scale} super-resolution"}[model.task]
    return f"""# {model.name}: EMDiffuse {task} with uncertainty

Exported from napari-emdiffuse, an implementation of EMDiffuse (Lu et al., Nat. Commun. 15, 4677, 2024,
doi:{DOI}) for napari: model `{model.name}`. {model.meta.get('description', '')}

## A stochastic model

EMDiffuse is a conditional diffusion model: it does not compute one answer but *samples* plausible clean images
given the acquisition. This package runs the model's few-step sampler ({sampling['sampler']}, {sampling['steps']}
steps, noise levels from {sampling['sigma_max']} down to {sampling['sigma_end']}) {samples} times with a **fixed
seed ({seed})**: the same input always gives the same output, but another seed would give (slightly) different
detail wherever the input does not determine it. The noise is a hash of the seed, step and pixel position, so it is
the same on every machine and device.

## Input and outputs

- **input** `raw`: one greyscale EM image (batch, channel 1, y, x), any intensity range (e.g. 8- or 16-bit values
  as float32). It is normalised inside the model as napari-emdiffuse does: its 0.5 and 99.5 percentiles map to 0
  and 1.{' It is then upsampled bicubically by ' + str(scale) + ', the condition and start of sampling.' if scale > 1
  else ''}
- **output** `restored`: the mean of the {samples} samples, mapped back to the input's intensities
  (float32{', ' + str(scale) + ' times the input size in y and x' if scale > 1 else ''}).
- **output** `uncertainty`: the per-pixel standard deviation of the prediction in normalised intensity units
  (0-1 = the input's 0.5-99.5 percentile range). It is computed as napari-emdiffuse does, by the law of total
  variance: the population variance between the {samples} samples (each sample is evaluated in its own mirror
  orientation and samples come in antithetic noise pairs) plus the mean over the samples of phi², where phi is the
  per-pixel error the network's difficulty head predicts at the first, noisiest step. The paper calls an image
  reliable when the 99th percentile of this map is at most {UNCERTAINTY_THRESHOLD}; larger values flag regions to
  check.

The whole image is restored at once; for large images, process tiles with a margin of at least 32 pixels. Inside
napari, the plugin does this with one noise field for the whole image and blends the tiles at every step: add this
package there (*Add a model file…* in a task widget's model menu, or `emdiffuse models --import FILE.zip`) to get
the plugin's own tiling, Zarr/Dask processing and uncertainty overlays. The plugin runs the same network and
sampler; its noise comes from another generator, so its samples differ from this package's by the model's own
sampling spread.

## Validation

The package passes `bioimageio test` (bioimageio.core), offline. Its test input is a synthetic noisy EM image
({TEST_SIZE} x {TEST_SIZE} pixels, 8-bit values), and the test outputs are this package's own outputs for it. The
tolerances (relative {TOLERANCES['restored']['relative_tolerance']}; absolute
{TOLERANCES['restored']['absolute_tolerance']} for `restored`, {TOLERANCES['uncertainty']['absolute_tolerance']} for
`uncertainty`; at most {MISMATCHED_PER_MILLION} mismatched pixels per million) are ten times the largest difference
measured between runs on one CPU with other thread counts and convolution back-ends
(`benchmarks/bioimageio_reproducibility.py` in napari-emdiffuse); with the seed fixed, the sampling itself adds
none. The model's quality on real EM data is documented with napari-emdiffuse (README, *Measured*).

## Citation

{CITATION} https://doi.org/{DOI}
"""


def _cover(path: Path, left: np.ndarray, right: np.ndarray) -> None:
    """A PNG of two images side by side (2:1), each scaled to 8 bits on its own range."""
    import imageio.v3 as iio

    def eight_bit(a):
        from scipy.ndimage import zoom

        a = zoom(a.astype(np.float32), 256 / a.shape[0], order=1)
        lo, hi = np.percentile(a, [0.5, 99.5])
        return (np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)

    iio.imwrite(path, np.concatenate([eight_bit(left), eight_bit(right)], axis=1))


def synthetic_input(scale: int = 1) -> np.ndarray:
    """The synthetic noisy EM image a package is tested on (float32 values of an 8-bit acquisition)."""
    from .simulate import SEMNoise, synthetic_em

    clean = synthetic_em((TEST_SIZE // scale, TEST_SIZE // scale), seed=7)
    noisy = SEMNoise(electrons=40, read=0.02)(clean, np.random.default_rng(7))
    return np.clip(noisy * 180 + 40, 0, 255).round().astype(np.float32)


def synthetic_sections(factor: int) -> np.ndarray:
    """The synthetic sections an isotropic package is tested on: every ``factor``-th slice of a small synthetic
    volume, float32 values of an 8-bit acquisition (4 sections)."""
    from .isotropic import decimate
    from .simulate import SEMNoise, synthetic_volume

    rng = np.random.default_rng(7)
    clean = decimate(synthetic_volume((3 * factor + 1, TEST_SIZE, TEST_SIZE), seed=7), factor)
    return np.stack([np.clip(SEMNoise(electrons=400, read=0.01)(plane, rng) * 200 + 30, 0, 255).round()
                     for plane in clean]).astype(np.float32)


def _isotropic_factor(model, factor) -> int:
    """The whole z factor an isotropic package is made for: one the model serves (its output is isotropic, so the
    sections are ``factor`` pixels apart)."""
    from .isotropic import check_positions
    from .normalize import InputError

    if factor is None or not math.isfinite(float(factor)) or float(factor) != int(factor) or int(factor) < 2:
        raise BioImageIOError(f"An isotropic package is made for one whole z factor of 2 or more, not {factor}: a "
                              "package's output size must be a whole multiple of its input's.")
    try:
        check_positions(model, 2, int(factor))
    except InputError as err:
        raise BioImageIOError(str(err)) from err
    return int(factor)


def export_package(name_or_path: str | os.PathLike, destination: str | os.PathLike, samples: int | None = None,
                   seed: int = 0, scale: int = 2, overwrite: bool = False, factor: int = 4) -> Path:
    """Write ``name_or_path`` (a model name or ``.npz`` file) as a BioImage.io model package (a ``.zip``); a
    super-resolution model for ``scale``, an isotropic one for the z ``factor``."""
    import torch

    from .files import atomic_path
    from .io import write_tiff
    from .models import load_model
    from .normalize import InputError
    from .safety import check_output
    from .tasks import Settings

    source = resolve(name_or_path)
    meta = read_metadata(source)
    destination = Path(destination)
    if destination.suffix != ".zip":  # written exactly where asked, or refused
        raise BioImageIOError(f"BioImage.io packages end in .zip; {destination.name} does not.")
    try:
        check_output(destination, [source], overwrite)  # what may be replaced: core/safety.py decides
    except InputError as err:
        raise BioImageIOError(str(err)) from err
    model = load_model(source, device="cpu")
    samples = samples or Settings().samples
    if samples < 2 and not model.net.config.difficulty_head:
        raise BioImageIOError("One sample of a model without a difficulty head gives no uncertainty; use two or more.")
    scale = scale if model.task == "superres" else 1
    isotropic = model.task == "isotropic"
    factor = _isotropic_factor(model, factor) if isotropic else 1
    meta = {k: v for k, v in meta.items() if k != "training"}  # the architecture's arguments: how it was made stays
    # in the attached model file
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = folder / ("weights.pt" if isotropic else "restorer.pt")
        if isotropic:
            torch.save({f"net.{k}": v.contiguous() for k, v in model.net.state_dict().items()}, weights)
            loaded = isotropic_restorer(meta, factor, samples, seed)  # the outputs of the file, as a consumer's
            loaded.load_state_dict(torch.load(weights, weights_only=True))
            raw = synthetic_sections(factor)[None, None]
        else:
            restorer(model, samples, seed, scale).save(str(weights))
            loaded = torch.jit.load(str(weights))  # the outputs of the file, as a consumer loads it
            raw = synthetic_input(scale)[None, None]
        restored, spread = (t.numpy() for t in loaded(torch.from_numpy(raw)))
        for tensor_id, values in (("input", raw), ("restored", restored), ("uncertainty", spread)):
            np.save(folder / f"test_{tensor_id}.npy", values)
            write_tiff(folder / f"sample_{tensor_id}.tif", values[0, 0], unit="pixel")  # the same, for viewers
        # isotropic: the section below and a generated plane halfway to the next
        shown = (raw[0, 0, 1], restored[0, 0, factor + factor // 2], spread[0, 0, factor + factor // 2]) \
            if isotropic else (raw[0, 0], restored[0, 0], spread[0, 0])
        _cover(folder / "cover.png", shown[0], shown[1])
        _cover(folder / "cover_uncertainty.png", shown[1], shown[2])
        (folder / "README.md").write_text(_documentation(model, samples, seed, scale, {**SAMPLING_DEFAULTS,
                                                                                         **model.sampling}, factor))
        (folder / MODEL_FILE).write_bytes(source.read_bytes())
        if isotropic:
            (folder / "environment.yaml").write_text(_environment())
        descr = _describe(model, folder, samples, seed, scale, factor, meta)
        with atomic_path(destination) as out:
            _save(descr, out)
    return destination


def _describe(model, folder: Path, samples: int, seed: int, scale: int, factor: int = 1, meta: dict | None = None):
    import torch

    _need_spec()
    from bioimageio.spec.model import v0_5

    isotropic = model.task == "isotropic"
    multiple = model.net.config.multiple
    size = v0_5.ParameterizedSize(min=max(multiple, 32 if isotropic else 0), step=multiple)
    unit = 1.0 / scale
    raw = v0_5.TensorId("raw")
    sections = [v0_5.SpaceInputAxis(id=v0_5.AxisId("z"), size=v0_5.ParameterizedSize(min=2, step=1))] \
        if isotropic else []
    inputs = [v0_5.InputTensorDescr(
        id=raw, description="sections (z) of EM, any intensity range" if isotropic else
        "a greyscale EM image, any intensity range",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=[v0_5.Identifier("raw")]), *sections,
              v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=size), v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=size)],
        test_tensor=v0_5.FileDescr(source=folder / "test_input.npy"),
        sample_tensor=v0_5.FileDescr(source=folder / "sample_input.tif"),
        data=v0_5.IntervalOrRatioDataDescr(type="float32"))]

    def output(tensor_id: str, description: str):
        axes = [v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=[v0_5.Identifier(tensor_id)])]
        if isotropic:  # (z - 1) factor + 1 planes: z * 1 / (1 / factor) + 1 - factor
            axes.append(v0_5.SpaceOutputAxis(id=v0_5.AxisId("z"), scale=1.0 / factor, size=v0_5.SizeReference(
                tensor_id=raw, axis_id=v0_5.AxisId("z"), offset=1 - factor)))
        axes += [v0_5.SpaceOutputAxis(id=v0_5.AxisId(a), scale=unit,
                                      size=v0_5.SizeReference(tensor_id=raw, axis_id=v0_5.AxisId(a)))
                 for a in "yx"]
        return v0_5.OutputTensorDescr(id=v0_5.TensorId(tensor_id), description=description, axes=axes,
                                      test_tensor=v0_5.FileDescr(source=folder / f"test_{tensor_id}.npy"),
                                      sample_tensor=v0_5.FileDescr(source=folder / f"sample_{tensor_id}.tif"),
                                      data=v0_5.IntervalOrRatioDataDescr(type="float32"))

    task = {"denoise": "denoising", "superres": f"x{scale} super-resolution",
            "isotropic": f"isotropic reconstruction (z factor {factor})"}[model.task]
    version = v0_5.Version(torch.__version__.split("+")[0])
    if isotropic:
        weights = v0_5.WeightsDescr(pytorch_state_dict=v0_5.PytorchStateDictWeightsDescr(
            source=folder / "weights.pt", pytorch_version=version,
            architecture=v0_5.ArchitectureFromLibraryDescr(
                callable=v0_5.Identifier("isotropic_restorer"), import_from="napari_emdiffuse.core.bioimageio",
                kwargs={"meta": meta, "factor": factor, "samples": samples, "seed": seed}),
            dependencies=v0_5.FileDescr(source=folder / "environment.yaml")))
    else:
        weights = v0_5.WeightsDescr(torchscript=v0_5.TorchscriptWeightsDescr(source=folder / "restorer.pt",
                                                                            pytorch_version=version))
    tolerances = ISOTROPIC_TOLERANCES if isotropic else TOLERANCES
    return v0_5.ModelDescr(
        name=f"EMDiffuse {task} {model.name}"[:128],
        description=(f"EMDiffuse (Lu et al. 2024) {task} of electron-microscopy images with a per-pixel uncertainty "
                     f"map: the model's {model.sampling['steps']}-step sampler, {samples} samples, seed {seed} "
                     "(exported from napari-emdiffuse)."),
        authors=[v0_5.Author(name="napari-emdiffuse developers")],
        cite=[v0_5.CiteEntry(text=CITATION, doi=v0_5.Doi(DOI))],
        license="MIT",
        tags=["electron-microscopy", "diffusion", "uncertainty", "pytorch", "emdiffuse"]
        + (["isotropic-reconstruction", "volume-em", "3d"] if isotropic else ["denoising", "2d"])
        + (["super-resolution"] if scale > 1 else []),
        documentation=v0_5.FileDescr(source=folder / "README.md"),
        covers=[v0_5.FileDescr(source=folder / name) for name in ("cover.png", "cover_uncertainty.png")],
        attachments=[v0_5.FileDescr(source=folder / MODEL_FILE)],
        inputs=inputs,
        outputs=[output("restored", "the restored image (mean of the samples), in the input's intensities"),
                 output("uncertainty", "per-pixel std of the prediction, normalised units (threshold 0.12)")],
        weights=weights,
        config=v0_5.Config(
            bioimageio=v0_5.BioimageioConfig(reproducibility_tolerance=[
                v0_5.ReproducibilityTolerance(output_ids=[v0_5.TensorId(tensor_id)], **tolerance,
                                              mismatched_elements_per_million=MISMATCHED_PER_MILLION)
                for tensor_id, tolerance in tolerances.items()]),
            **{"napari-emdiffuse": {"model": model.name, "task": model.task, "samples": samples, "seed": seed,
                                    "scale": scale, "factor": factor, "model_file": MODEL_FILE}}),
    )


def _save(descr, path: Path) -> None:
    from bioimageio.spec import save_bioimageio_package

    save_bioimageio_package(descr, output_path=path)


# ----------------------------------------------------------------------------------------------------------------
# Import


def is_package(path: str | os.PathLike) -> bool:
    """A zip file with a BioImage.io description at its top level (our ``.npz`` files are zips without one)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n in RDF_NAMES for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_package(path: str | os.PathLike) -> tuple[dict, bytes]:
    """What a package made by :func:`export_package` says about its model (our ``config`` entry) and its model file,
    once bioimageio.spec has validated the package, with the checksums of its files (offline)."""
    path = Path(path)
    if not is_package(path):
        raise BioImageIOError(f"{path.name} is not a BioImage.io package (a zip file with an rdf.yaml).")
    descr = _validated(path)
    config = (descr.config.model_extra or {}).get("napari-emdiffuse")
    member = config.get("model_file") if isinstance(config, dict) else None
    attached = [str(getattr(a.source, "path", "")) for a in descr.attachments]
    if member != MODEL_FILE or member not in attached:
        raise BioImageIOError(f"{path.name} is a BioImage.io package but not one of napari-emdiffuse (it holds no "
                              "napari-emdiffuse model file); only EMDiffuse models exported by napari-emdiffuse can be "
                              "added.")
    try:
        with zipfile.ZipFile(path) as z:
            if z.getinfo(member).file_size > MAX_MODEL_BYTES:
                raise BioImageIOError(f"{path.name} holds a model file too large to be one of ours.")
            return config, z.read(member)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise BioImageIOError(f"{path.name} is damaged ({type(err).__name__}).") from err


def _validated(path: Path):
    """The package's description, validated by bioimageio.spec with the checksums of its files, offline."""
    _need_spec()
    from bioimageio.spec import ValidationContext, load_model_description

    try:
        with ValidationContext(perform_io_checks=True):
            descr = load_model_description(path, format_version="latest")
    except Exception as err:  # bioimageio.spec raises many types, e.g. for a file whose checksum does not match
        reason = next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), type(err).__name__)
        raise BioImageIOError(f"{path.name} is not a valid BioImage.io model ({reason[:300]}).") from err
    if not hasattr(descr, "weights"):  # an InvalidDescr
        errors = [f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in descr.validation_summary.errors][:2]
        raise BioImageIOError(f"{path.name} is not a valid BioImage.io model ({'; '.join(errors) or 'invalid'}).")
    return descr


def import_package(path: str | os.PathLike, name: str | None = None) -> Path:
    """Add a package made by :func:`export_package`: its model file is checked as any ``.npz`` and installed."""
    from .models import import_model

    path = Path(path)
    _, data = read_package(path)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / f"{name or path.stem}.npz"
        model_file.write_bytes(data)
        return import_model(model_file, name or path.stem)
