"""The one place that decides what the tool may write, replace or delete.

EM volumes are irreplaceable, so the rule is narrow: an output may replace only a regular file or a Zarr store that
this tool made (its run summary in the attributes, nothing but its own arrays inside), never an input of the same
run nor anything that contains one, never a folder, link, FIFO or device of someone else. Every output location is
checked (free or replaceable, writable, not named twice) before any work, so a long run never fails at its end.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .normalize import InputError

RUN_ATTRIBUTE = "emdiffuse"  # a store made by the chunked runner records its run under this attribute
OWN_STORE_ENTRIES = {"zarr.json", "0", "uncertainty", "difficulty", "run"}  # what such a store holds, no more


class UnsafeOutput(InputError):
    """An output location that may not be written (a refusal before any work; the message is one sentence)."""


def _absolute(path: str | os.PathLike) -> Path:
    """The absolute path without resolving the last component (a link at the output path is itself checked)."""
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / path.name


def own_store(path: str | os.PathLike) -> bool:
    """A Zarr store made by this tool: our run summary in its attributes and only our own arrays inside."""
    import json

    path = Path(path)
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        entries = {entry.name for entry in os.scandir(path)}
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        return entries <= OWN_STORE_ENTRIES and "run" in meta.get("attributes", {}).get(RUN_ATTRIBUTE, {})
    except (OSError, ValueError, AttributeError):
        return False


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 store: bool = False) -> Path:
    """Refuse (:class:`UnsafeOutput`, one sentence) an output ``path`` that may not be written; return it.

    Free paths may be written if their folder is writable. An existing path may be replaced only with
    ``overwrite``, and only if it is a regular file or a store of ours (:func:`own_store`), and never if it is, or
    contains, one of ``inputs``. ``store``: the output is a Zarr store (a folder), else a file.
    """
    path = Path(path)
    target = _absolute(path)
    for source in inputs:
        source_path = _absolute(source)
        resolved = Path(source).resolve() if Path(source).exists() else source_path
        if _contains(target, source_path) or _contains(target, resolved) or (
                target.exists() and Path(source).exists() and os.path.samefile(target, source)):
            raise UnsafeOutput(f"The output {path} is or contains the input {source}; choose another name.")
        if _contains(source_path, target) and Path(source).is_file():
            raise UnsafeOutput(f"The output {path} would lie inside the input file {source}.")
    if os.path.lexists(target):
        mode = os.lstat(target).st_mode
        if stat.S_ISLNK(mode):
            raise UnsafeOutput(f"{path} is a symbolic link; give the path of the file itself, or another name.")
        if stat.S_ISDIR(mode):
            if not (store and own_store(target)):
                raise UnsafeOutput(f"{path} is a folder that napari-emdiffuse did not make; it is never replaced: "
                                   "choose another name.")
        elif not stat.S_ISREG(mode):
            raise UnsafeOutput(f"{path} is not a regular file (a FIFO, socket or device); choose another name.")
        if not overwrite:
            raise UnsafeOutput(f"{path} exists; use --overwrite (or allow overwriting) to replace it.")
    check_writable(target.parent)
    return path


def check_outputs(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike] = (),
                  overwrite: bool = False, stores: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """:func:`check_output` for every output of a run (or of a whole batch) against every input, and no location
    named twice (``-o X --uncertainty X``). ``stores``: the outputs that are Zarr stores; an existing one of ours
    passes here even without ``overwrite``, as the chunked runner resumes it if it is the same run (and refuses it
    otherwise)."""
    outputs = [Path(p) for p in outputs if p is not None]
    inputs, stores = list(inputs), {_absolute(s) for s in stores}
    seen: dict[Path, Path] = {}
    for path in outputs:
        key = _absolute(path)
        if key in seen:
            raise UnsafeOutput(f"{path} is given twice as an output; each output needs its own name.")
        seen[key] = path
    return [check_output(path, inputs, overwrite or _absolute(path) in stores, store=_absolute(path) in stores)
            for path in outputs]


def check_writable(folder: str | os.PathLike) -> None:
    """A file can be created in ``folder`` (or in its nearest existing parent, which the write would create it in):
    tried, not guessed from the permission bits, which do not bind every user."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UnsafeOutput(f"Cannot write into {folder}: {existing} is not a folder.")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".emdiffuse-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UnsafeOutput(f"Cannot write into {existing}: {err.strerror or err}.") from err


def remove_own(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Delete an output that may be replaced (checked again here, whoever calls): a regular file or our store."""
    import shutil

    path = Path(path)
    check_output(path, inputs, overwrite=True, store=True)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
