"""Conditional U-Net in the spirit of EMDiffuse's UDiM, sized for CPUs.

The network sees the noisy estimate ``x`` concatenated with the condition image (the degraded acquisition),
is told the noise level ``sigma`` (and optionally an integer label such as a slice index, or a position such as where
between two sections a slice lies), and returns two maps:
the denoised estimate's raw output ``F`` and ``log phi``, the per-pixel difficulty of the paper's
difficulty-aware loss.

Design choices (measured on a 2-core CPU, see ``benchmarks/``):
- no GroupNorm: per-tile statistics make tiles disagree, which shows as seams; residual branches start at zero
  instead, which keeps training stable without normalisation;
- self-attention only at the lowest resolution, where tokens are few;
- FiLM (scale and shift) conditioning from one embedding vector, as the reference does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class UNetConfig:
    """Everything needed to rebuild the network; stored in every model file."""

    in_channels: int = 1  # the noisy estimate
    cond_channels: int = 1  # the degraded image(s) it is conditioned on
    base: int = 24
    mults: tuple[int, ...] = (1, 2, 3, 4)
    blocks: int = 1  # residual blocks per level
    attention: bool = True  # one self-attention block at the lowest resolution
    num_labels: int = 0  # >0 adds an integer embedding (e.g. which slice between two acquired ones)
    positions: int = 0  # >0 adds an embedding of a position (gap up to this many pixels, fraction): see
    # position_embedding
    difficulty_head: bool = True
    patch: int = 2  # pixel-unshuffle factor of the stem: full-resolution convolutions are the CPU's main cost

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mults"] = list(self.mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "mults" in known:
            known["mults"] = tuple(known["mults"])
        return cls(**known)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return self.patch * 2 ** (len(self.mults) - 1)


def _frequencies(dim: int) -> torch.Tensor:
    half = dim // 2
    return torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)


def _fourier(c: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    args = c.float()[:, None] * freqs.float()[None] * 100.0
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def position_embedding(table: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The embedding of positions ``(gap, fraction)`` (batch, 2): a slice ``fraction`` (0 to 1) of the way between
    two sections ``gap`` lateral pixels apart. ``table`` (n, n + 1, dim) holds embeddings at whole gaps 1 .. n and
    fractions in steps of 1 / n; any real position gets the bilinear blend of its four nearest, so positions
    between those trained on get embeddings between theirs (a network extrapolating an embedding can be
    confidently wrong), not only the slots of whole factors."""
    n = table.shape[0]
    gap = position[:, 0].float().clamp(1, n) - 1
    fraction = position[:, 1].float().clamp(0, 1) * n
    g0 = gap.floor().clamp(max=n - 2).long()
    f0 = fraction.floor().clamp(max=n - 1).long()
    wg, wf = (gap - g0)[:, None], (fraction - f0)[:, None]
    return ((1 - wg) * ((1 - wf) * table[g0, f0] + wf * table[g0, f0 + 1])
            + wg * ((1 - wf) * table[g0 + 1, f0] + wf * table[g0 + 1, f0 + 1]))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(x))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(h * (1 + scale) + shift)
        return self.skip(x) + self.conv2(h)


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3 * self.heads, c // self.heads, h * w).transpose(-1, -2).chunk(3, dim=1)
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        emb = 4 * cfg.base
        self.emb_dim = emb
        # a buffer, not made in forward: it follows the network to its device, also in a TorchScript trace
        self.register_buffer("frequencies", _frequencies(cfg.base), persistent=False)
        self.noise_mlp = nn.Sequential(nn.Linear(cfg.base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(cfg.num_labels, emb) if cfg.num_labels else None
        self.position_table = (nn.Parameter(torch.zeros(cfg.positions, cfg.positions + 1, emb))
                               if cfg.positions else None)
        widths = [cfg.base * m for m in cfg.mults]
        self.stem = nn.Conv2d((cfg.in_channels + cfg.cond_channels) * cfg.patch**2, widths[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = []
        ch = widths[0]
        for level, w in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.blocks):
                blocks.append(ResBlock(ch, w, emb))
                ch = w
            self.down.append(blocks)
            skips.append(ch)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid1 = ResBlock(ch, ch, emb)
        self.attn = Attention(ch) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(widths))):
            w = widths[level]
            blocks = nn.ModuleList()
            for i in range(cfg.blocks):
                blocks.append(ResBlock(ch + (skips[level] if i == 0 else 0), w, emb))
                ch = w
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.outputs = 2 if cfg.difficulty_head else 1
        self.head = nn.Conv2d(ch, self.outputs * cfg.patch**2, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, c_noise: torch.Tensor,
                label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(F, log_phi)``; ``log_phi`` is None without a difficulty head."""
        emb = self.noise_mlp(_fourier(c_noise, self.frequencies))
        if self.label_emb is not None:
            if label is None:
                raise ValueError("this model needs a label (e.g. the slice index)")
            emb = emb + self.label_emb(label)
        if self.position_table is not None:
            if label is None:
                raise ValueError("this model needs a position (gap, fraction)")
            emb = emb + position_embedding(self.position_table, label)
        h = self.stem(F.pixel_unshuffle(torch.cat([x, cond], dim=1), self.config.patch))
        skips = []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = F.pixel_shuffle(self.head(F.silu(h)), self.config.patch)
        if self.config.difficulty_head:
            return out[:, :1], out[:, 1:]
        return out, None


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
