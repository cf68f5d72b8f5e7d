"""The one validation of every number a user (or a model file) gives: the CLI, the chunked runner, fine-tuning and
the widgets all call :func:`check_number`, so a value is refused with the same sentence everywhere, before any work.

A refused value raises :class:`InputError` (the CLI exits 2 with its one sentence; a widget shows it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .normalize import InputError


@dataclass(frozen=True)
class Limit:
    """What a number means (the start of the refusal's sentence) and the range it must lie in."""

    what: str
    low: float
    high: float
    whole: bool = True  # a whole number
    low_open: bool = False  # ``low`` itself excluded


LIMITS = {
    "samples": Limit("The number of samples", 1, 64),
    "steps": Limit("The number of sampling steps", 1, 1000),
    "seed": Limit("The seed", 0, 2**63 - 1),
    "tile": Limit("The tile size", 32, 8192),
    "overlap": Limit("The tile overlap", 0, 4096),
    "eta": Limit("The sampler's stochasticity eta", 0.0, 1.0, whole=False),
    "threshold": Limit("The uncertainty threshold", 0.0, 1.0, whole=False, low_open=True),
    "halo": Limit("The halo", 0, 8192),
    "workers": Limit("The number of workers", 1, 512),
    "chunk": Limit("A chunk size", 1, 65536),
    "iterations": Limit("The number of training iterations", 1, 10_000_000),
    "minutes": Limit("The training time in minutes", 0.0, 7 * 24 * 60, whole=False, low_open=True),
    "factor": Limit("The z factor R", 1, 32, whole=False),
    "gap": Limit("The section spacing in pixels", 1, 1000, whole=False),
    "output_spacing": Limit("The output z spacing", 0.0, 1e9, whole=False, low_open=True),
    "scale": Limit("The super-resolution factor", 2, 4),
    "sigma_max": Limit("The model's largest noise level sigma_max", 0.0, 1000.0, whole=False, low_open=True),
    "sigma_end": Limit("The model's smallest noise level sigma_end", 0.0, 10.0, whole=False, low_open=True),
}


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def check_number(name: str, value, what: str | None = None):
    """``value`` as an int (whole numbers) or float if it is finite and within ``LIMITS[name]``; else InputError.

    ``what`` replaces the limit's own description (e.g. for a model file's setting)."""
    limit = LIMITS[name]
    what = what or limit.what
    low = f"above {_shown(limit.low)}" if limit.low_open else f"from {_shown(limit.low)}"
    wanted = f"{'a whole number' if limit.whole else 'a number'} {low} to {_shown(limit.high)}"
    try:
        number = float(value)
        finite = not isinstance(value, (bool, str)) and math.isfinite(number)
    except (TypeError, ValueError, OverflowError):
        finite = False
    if not finite or (limit.whole and number != int(number)):
        raise InputError(f"{what} must be {wanted}, not {_shown(value)}.")
    if number < limit.low or number > limit.high or (limit.low_open and number == limit.low):
        raise InputError(f"{what} must be {wanted}, not {_shown(value)}.")
    return int(number) if limit.whole else number


def check_optional(name: str, value, what: str | None = None):
    """:func:`check_number`, letting ``None`` (use the default) through."""
    return None if value is None else check_number(name, value, what)


def check_budget(minutes: float | None, iterations: int | None) -> None:
    """A training budget: a positive, finite time or number of iterations (a zero or negative one trained forever)."""
    check_optional("minutes", minutes)
    check_optional("iterations", iterations)


def check_choice(what: str, value, choices) -> str:
    if value not in choices:
        raise InputError(f"Unknown {what} {_shown(value)} (use {', '.join(choices)}).")
    return value


SCHEDULER_ADDRESS = re.compile(r"^(tcp|tls|ucx|ws|wss)://[A-Za-z0-9.\-_\[\]:]+:\d{1,5}$")


def check_scheduler(name: str) -> str:
    """``threads``, ``local`` or the address of a running Dask scheduler (``tcp://host:8786``)."""
    if name in ("threads", "local") or SCHEDULER_ADDRESS.match(str(name)):
        return name
    raise InputError(f"Unknown scheduler {_shown(name)} (use threads, local or the address of a running Dask "
                     "scheduler, e.g. tcp://host:8786).")


def check_voxel(scale, source: str) -> tuple[float, ...]:
    """Pixel sizes read from a file's metadata: positive and finite, or a sentence naming the file."""
    try:
        values = tuple(float(s) for s in scale)
    except (TypeError, ValueError) as err:
        raise InputError(f"{source} gives a pixel size that is not a number ({scale!r}).") from err
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{source} gives an unusable pixel size ({' x '.join(_shown(v) for v in values)}): "
                         "every size must be positive and finite.")
    return values
