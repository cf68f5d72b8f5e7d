"""Damaged and missing sections of a serial-section stack: the user's list of bad sections (``12,40-41``, counted
from 0 as napari's slider counts the input's sections) and a detector that proposes suspect sections to confirm.

A bad section is regenerated from its good neighbours, so every accepted list leaves a good section on both sides of
each run of bad ones, and no run longer than the model can bridge. The detector proposes only sections that can be
regenerated (never the first or last) and says why in a short phrase; where the damage is local it gives the
damaged region's mask so that only that region need be regenerated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .normalize import InputError, check_image

_ITEM = re.compile(r"(\d+)(?:\s*[-\u2013]\s*(\d+))?", re.ASCII)  # a hyphen or an en dash


def _runs(indices) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, last)`` of sorted unique indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def format_sections(indices) -> str:
    """The compact text of a set of sections, e.g. ``12, 40-41``: what :func:`parse_sections` reads back."""
    unique = sorted({int(i) for i in indices})
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in _runs(unique))


def parse_sections(text: str, count: int, max_run: int | None = None) -> tuple[int, ...]:
    """The bad sections a user lists (``"12,40-41"``: 0-based, ranges inclusive, spaces allowed) in a stack of
    ``count`` sections, sorted and unique; empty text gives none. Refused with one sentence (:class:`InputError`):
    anything malformed, negative or reversed, a section outside the stack, the first or last section, all sections,
    and runs of more than ``max_run`` consecutive bad sections (regenerated from their good neighbours)."""
    count = int(count)
    if not text.strip():
        return ()
    chosen: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if re.fullmatch(r"(\d+\s*)?-\s*-?\d+", item) and not _ITEM.fullmatch(item):
            raise InputError(f"Bad sections are counted from 0; {item!r} is negative.")
        match = _ITEM.fullmatch(item)
        if not match:
            shown = "an empty item" if not item else repr(item)
            raise InputError(f"Cannot read {shown} in the bad sections {text.strip()!r}; write them like 12, 40-41.")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise InputError(f"The range {item!r} of bad sections runs backwards; write it as {last}-{first}.")
        if last >= count:
            raise InputError(f"Bad section {last} is outside the stack, whose {count} sections are 0 to {count - 1}.")
        chosen.update(range(first, last + 1))
    if len(chosen) == count:
        raise InputError("Every section is marked bad; at least the first and last must be good to regenerate.")
    for end, side in ((0, "before"), (count - 1, "after")):
        if end in chosen:
            raise InputError(f"Section {end} cannot be regenerated: it has no good neighbour {side} it.")
    if max_run is not None:
        for a, b in _runs(sorted(chosen)):
            if b - a + 1 > max_run:
                raise InputError(f"The {b - a + 1} consecutive bad sections {a}-{b} are too many to regenerate; "
                                 f"at most {max_run} in a row can be.")
    return tuple(sorted(chosen))
