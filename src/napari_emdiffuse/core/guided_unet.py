"""The authors' EMDiffuse networks (Lu et al. 2024), our implementation, and their ``.pth`` checkpoints.

The reference code (github Luchixiang/EMDiffuse, MIT) trains a guided-diffusion U-Net as a DDPM epsilon model:
``y_t = sqrt(g) y0 + sqrt(1 - g) n`` with ``g`` the cumulative product of the alphas (they call it gamma), the
network sees ``[condition, y_t]`` and ``g`` itself (a sinusoidal embedding of the continuous value, not of a step
index) and predicts ``n``. Two kinds:

- **EMDiffuse-n / -r** (denoising, x2 super-resolution): 2 input channels (the degraded image, brought to the output
  grid, and ``y_t``);
- **vEMDiffuse-i / -a** (isotropic reconstruction, "3D-2D"): 3 input channels (the slice after the gap, the slice
  before it, ``y_t``) and a second embedding, of the index ``c`` (0 .. R-2) of the slice generated in the gap,
  concatenated to the noise-level embedding.

Their checkpoints are ``torch.save`` of the wrapping module's ``state_dict()``: ``denoise_fn.`` + the U-Net's names,
plus the noise schedule's buffers. We read them with ``torch.load(weights_only=True)`` (plain tensors only; a file
whose pickle would build any other object is refused before anything runs), infer the configuration from the tensor
names and shapes, and check every tensor against it.

Our samplers work on noise levels sigma (``x = y0 + sigma n``, see :mod:`.diffusion`). ``x = y_t / sqrt(g)`` maps
one onto the other with ``sigma = sqrt((1 - g) / g)``, so :meth:`GuidedUNet.denoise` wraps the epsilon model as a
denoiser over sigmas: every sampler runs on it, on any of the noise levels the network was trained on
(``TRAIN_SCHEDULE``), and :func:`.diffusion.authors_ancestral` reproduces the authors' own sampler on their test
schedule (``TEST_SCHEDULE``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .models import ModelFileError

ARCHITECTURE = "emdiffuse-guided"
TRAIN_SCHEDULE = {"n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2}
TEST_SCHEDULE = {"n_timestep": 1000, "linear_start": 1e-4, "linear_end": 0.09}
MAX_CHECKPOINT_BYTES = 2 << 30  # the full-width networks are 63 MB; nothing sensible comes near this
# buffers of the authors' wrapping module (their noise schedule), saved with the weights; not part of the network
SCHEDULE_BUFFERS = ("gammas", "sqrt_recip_gammas", "sqrt_recipm1_gammas", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


class CheckpointError(ModelFileError):
    """A ``.pth`` file is not a checkpoint of the authors' networks that we can use; the message says why."""


@dataclass
class GuidedConfig:
    """The authors' ``unet`` configuration (their defaults), as far as it changes the weights or the function."""

    in_channel: int = 2  # condition channels + 1
    inner_channel: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    res_blocks: int = 2
    attn_res: tuple[int, ...] = (16,)  # downsampling factors with attention (besides the middle block's)
    num_head_channels: int = 32
    dropout: float = 0.2
    slice_embedding: bool = False  # the 3D-2D variant (vEMDiffuse)
    # what our pipeline asks of every network
    difficulty_head: bool = field(default=False, init=False)

    def __post_init__(self):  # bounds that keep a crafted description from allocating a giant network
        if (self.in_channel not in (2, 3) or not 16 <= self.inner_channel <= 256 or self.inner_channel % 16
                or not 1 <= len(self.channel_mults) <= 6 or not all(1 <= m <= 16 for m in self.channel_mults)
                or not 1 <= self.res_blocks <= 4 or not 8 <= self.num_head_channels <= 256
                or not 0 <= self.dropout < 1 or self.slice_embedding != (self.in_channel == 3)):
            raise ValueError(f"not a configuration of the authors' networks: {self.to_dict()}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("difficulty_head")
        d.update(channel_mults=list(self.channel_mults), attn_res=list(self.attn_res))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GuidedConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "difficulty_head"}
        for key in ("channel_mults", "attn_res"):
            if key in known:
                known[key] = tuple(int(v) for v in known[key])
        return cls(**known)

    @property
    def cond_channels(self) -> int:
        return self.in_channel - 1

    @property
    def groups(self) -> int:
        return 16 if self.inner_channel == 16 else 32  # the authors' rule

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mults) - 1)


def sinusoidal(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The authors' embedding of a continuous value (the noise level g, or a slice index): cosines, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float().reshape(-1, 1) * freqs
    out = torch.cat([angles.cos(), angles.sin()], dim=1)
    return F.pad(out, (0, dim % 2))


def _mlp(width: int, emb: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with FiLM (scale and shift of the second norm) from the embedding; optionally
    halves (``resample="down"``, average pooling) or doubles (``"up"``, nearest) the resolution after the first norm."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int, dropout: float, resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        if cin != cout:
            self.skip_connection = nn.Conv2d(cin, cout, 1)

    def _resampled(self, t: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(t, 2)
        if self.resample == "up":
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        return t

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = conv(self._resampled(act(norm(x))))
        x = self._resampled(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        norm, act, drop, conv = self.out_layers
        h = conv(drop(act(norm(h) * (1 + scale) + shift)))
        skip = self.skip_connection(x) if hasattr(self, "skip_connection") else x
        return skip + h


class Attention(nn.Module):
    """Self-attention over all positions; heads of ``head_channels``, q/k/v interleaved per head."""

    def __init__(self, ch: int, head_channels: int, groups: int):
        super().__init__()
        if ch % head_channels:
            raise ValueError(f"{ch} channels do not split into heads of {head_channels}")
        self.heads = ch // head_channels
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat)).reshape(b * self.heads, 3, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(1, 2) for i in range(3))  # (b*heads, tokens, channels)
        att = F.scaled_dot_product_attention(q, k, v)
        out = self.proj_out(att.transpose(1, 2).reshape(b, c, h * w))
        return (flat + out).reshape(b, c, h, w)


class Stage(nn.ModuleList):
    """Blocks applied in turn, each given the embedding."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self:
            h = block(h, emb)
        return h


class StemConv(nn.Conv2d):
    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class GuidedUNet(nn.Module):
    """The authors' U-Net (guided-diffusion layout), with their state-dict names so their weights load unchanged."""

    def __init__(self, config: GuidedConfig | None = None):
        super().__init__()
        self.config = cfg = config or GuidedConfig()
        base, groups, drop = cfg.inner_channel, cfg.groups, cfg.dropout
        emb = 4 * base
        self.cond_embed = _mlp(base, emb)
        if cfg.slice_embedding:
            self.channel_embed = _mlp(base, emb)
            emb *= 2

        def block(cin, cout, resample=None):
            return ResBlock(cin, cout, emb, groups, drop, resample)

        ch = base * cfg.channel_mults[0]
        self.input_blocks = nn.ModuleList([Stage([StemConv(cfg.in_channel, ch, 3, padding=1)])])
        skips, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.res_blocks):
                layers = [block(ch, base * mult)]
                ch = base * mult
                if ds in cfg.attn_res:
                    layers.append(Attention(ch, cfg.num_head_channels, groups))
                self.input_blocks.append(Stage(layers))
                skips.append(ch)
            if level < len(cfg.channel_mults) - 1:
                self.input_blocks.append(Stage([block(ch, ch, "down")]))
                skips.append(ch)
                ds *= 2
        self.middle_block = Stage([block(ch, ch), Attention(ch, cfg.num_head_channels, groups), block(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for i in range(cfg.res_blocks + 1):
                layers = [block(ch + skips.pop(), base * mult)]
                ch = base * mult
                if ds in cfg.attn_res:
                    layers.append(Attention(ch, cfg.num_head_channels, groups))
                if level and i == cfg.res_blocks:
                    layers.append(block(ch, ch, "up"))
                    ds //= 2
                self.output_blocks.append(Stage(layers))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, gammas: torch.Tensor, slice_index: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted noise for ``x`` = [condition channels, y_t] at noise levels ``gammas`` (one per row)."""
        emb = self.cond_embed(sinusoidal(gammas, self.config.inner_channel))
        if self.config.slice_embedding:
            if slice_index is None:
                raise ValueError("this network needs the index of the slice it generates")
            emb = torch.cat([emb, self.channel_embed(sinusoidal(slice_index, self.config.inner_channel))], dim=1)
        skips = []
        h = x
        for stage in self.input_blocks:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def denoise(self, x: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor,
                label: torch.Tensor | None = None) -> torch.Tensor:
        """Our denoiser ``D(x, sigma)``: the estimate of the clean image, clipped to the data range as the
        authors' sampler clips it. ``cond`` is ours: (below, above) for the 3D-2D variant, which wants them the
        other way round; ``label`` is the slice index for that variant and unused by the 2D one."""
        sigma = sigma.float().reshape(-1, 1, 1, 1)
        g = 1 / (1 + sigma**2)
        y = x.float() * g.sqrt()
        if self.config.slice_embedding:
            cond = cond.flip(1)
        eps = self(torch.cat([cond.to(y.dtype), y], dim=1), g.flatten(), label)
        return (x.float() - sigma * eps.float()).clamp(-1.0, 1.0)


def linear_gammas(schedule: dict) -> np.ndarray:
    """The cumulative products of the alphas of a linear beta schedule (float64)."""
    betas = np.linspace(schedule["linear_start"], schedule["linear_end"], int(schedule["n_timestep"]),
                        dtype=np.float64)
    return np.cumprod(1 - betas)


def gamma_to_sigma(gammas) -> np.ndarray:
    gammas = np.asarray(gammas, np.float64)
    return np.sqrt((1 - gammas) / gammas)


def trained_sigma_range(meta: dict) -> tuple[float, float]:
    """The smallest and largest sigma the network saw in training."""
    sigmas = gamma_to_sigma(linear_gammas(meta.get("schedule", {}).get("train", TRAIN_SCHEDULE)))
    return float(sigmas[0]), float(sigmas[-1])


def authors_sigmas(meta: dict) -> list[float]:
    """The authors' test schedule as our noise levels, from the noisiest down (their sampler's every step)."""
    return [float(s) for s in gamma_to_sigma(linear_gammas(meta.get("schedule", {}).get("test", TEST_SCHEDULE)))[::-1]]


# --- checkpoints ---------------------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` file, without running anything in it: ``torch.load(weights_only=True)`` unpickles
    tensors and plain containers only and refuses anything else (e.g. a pickle that would call a function)."""
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path.name} is too large for an EMDiffuse checkpoint.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path.name} holds more than tensors and is refused (loading it could run code).") \
            from err
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint (damaged or truncated?).") from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                         for k, v in data.items()):
        raise CheckpointError(f"{path.name} is not a state dict (a mapping of names to tensors).")
    return data


def network_tensors(state: dict[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The U-Net's tensors of an authors' state dict: prefixes of their wrapper (``denoise_fn.``) and of
    DataParallel (``module.``) dropped, the schedule's buffers set aside."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "denoise_fn."):
            key = key.removeprefix(prefix)
        if key in SCHEDULE_BUFFERS:
            continue
        out[key] = value
    if "input_blocks.0.0.weight" not in out:
        raise CheckpointError(f"{name} is not an EMDiffuse (guided-diffusion U-Net) checkpoint.")
    return out


def infer_config(tensors: dict[str, torch.Tensor], name: str = "checkpoint") -> GuidedConfig:
    """The configuration that has exactly these tensors (the heads' width is not stored: the authors' 32)."""
    try:
        base = tensors["cond_embed.0.weight"].shape[1]
        in_channel = tensors["input_blocks.0.0.weight"].shape[1]
        out_blocks = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("output_blocks.")})
        # the deepest level's last output block is the first with an upsampling block after its residual block
        first_up = next(i for i in out_blocks if any(k.startswith(f"output_blocks.{i}.") and
                                                     k.endswith("in_layers.2.weight") and k.split(".")[2] != "0"
                                                     for k in tensors))
        res_blocks = first_up
        levels = len(out_blocks) // (res_blocks + 1)
        mults, attn = [], []
        for level in range(levels):
            first = 1 + level * (res_blocks + 1)
            width = tensors[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]
            mults.append(width // base)
            if f"input_blocks.{first}.1.qkv.weight" in tensors:
                attn.append(2**level)
        return GuidedConfig(in_channel=in_channel, inner_channel=base, channel_mults=tuple(mults),
                            res_blocks=res_blocks, attn_res=tuple(attn),
                            slice_embedding="channel_embed.0.weight" in tensors)
    except (KeyError, StopIteration, IndexError, ValueError, ZeroDivisionError) as err:
        raise CheckpointError(f"{name} does not have the layout of the authors' U-Net.") from err


def network_from_tensors(tensors: dict[str, torch.Tensor], config: GuidedConfig,
                         name: str = "checkpoint") -> GuidedUNet:
    """A network of ``config`` holding ``tensors``, each checked: the same names, shapes, floating point, finite."""
    try:
        net = GuidedUNet(config)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{name}: {err}") from err
    expected = net.state_dict()
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        some = sorted(missing or extra)[:3]
        raise CheckpointError(f"{name} does not match the authors' network ({'missing' if missing else 'unexpected'}"
                              f" tensors, e.g. {', '.join(some)}).")
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape:
            raise CheckpointError(f"{name}: {key} has shape {tuple(got.shape)}, expected {tuple(want.shape)}.")
        if not got.is_floating_point():
            raise CheckpointError(f"{name}: {key} is not a floating-point tensor.")
        if not torch.isfinite(got).all():
            raise CheckpointError(f"{name}: {key} contains NaN or infinite values.")
    net.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    return net.eval()


TASK_KIND = {"denoise": False, "superres": False, "isotropic": True}  # task -> needs the 3D-2D variant


def checkpoint_meta(config: GuidedConfig, task: str, name: str, source: str = "") -> dict:
    """Our model metadata for an authors' network: its task, schedules, variants and sampling defaults."""
    meta = {
        "task": task,
        "name": name,
        "architecture": ARCHITECTURE,
        "description": f"EMDiffuse authors' {task} network" + (f" ({source})" if source else ""),
        "schedule": {"train": dict(TRAIN_SCHEDULE), "test": dict(TEST_SCHEDULE)},
        "weights_dtype": "float32",  # kept as trained: the authors' schedule reproduces their results
        "sampling": dict(SAMPLING),
    }
    if task == "superres":
        meta["labels"] = {"2": 0}  # x2 only: x4 runs as two x2 steps
    if task == "isotropic":  # slice j of a gap of R is their slice index j - 1, for the R the model was trained for
        meta["labels"] = {f"{r}:{j}": j - 1 for r in range(2, 11) for j in range(1, r)}
        meta["start"] = "linear"
    return meta


# default sampling of the authors' networks on our samplers, chosen by benchmarks/authors_steps.py (real SEM pair,
# EMDiffuse-n architecture trained here): ancestral steps from the noisy image plus noise at sigma 20 matched the
# authors' 1000-step schedule from 5 steps on (PSNR 28.2 vs 26.9 dB, SSIM 0.79 vs 0.73, FSIM 0.89 vs 0.88, 240 times
# faster) and gained nothing from more; starting from pure noise (sigma 148) lost 2-3 dB at any number of steps
SAMPLING = {"steps": 5, "sampler": "euler_ancestral", "eta": 1.0, "sigma_max": 20.0, "sigma_end": 0.01}


def load_checkpoint(path: str | os.PathLike, task: str) -> tuple[GuidedUNet, dict]:
    """An authors' ``.pth`` checkpoint as a checked network and our metadata, for ``task`` (the file does not say
    it). The network kind must suit the task: 2 input channels for denoise/superres, 3 for isotropic."""
    path = Path(path)
    if task not in TASK_KIND:
        raise CheckpointError(f"Unknown task '{task}' (use denoise, superres or isotropic).")
    tensors = network_tensors(read_state_dict(path), path.name)
    config = infer_config(tensors, path.name)
    if config.slice_embedding != TASK_KIND[task] or config.in_channel != (3 if TASK_KIND[task] else 2):
        kind = ("a vEMDiffuse (isotropic) network" if config.slice_embedding
                else f"an EMDiffuse-n/-r network with {config.in_channel} input channels")
        raise CheckpointError(f"{path.name} is {kind}; it cannot do {task}.")
    net = network_from_tensors(tensors, config, path.name)
    return net, checkpoint_meta(config, task, path.stem, source=path.name)
