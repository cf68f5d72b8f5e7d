"""Model files and the model registry.

A model is one ``.npz`` file: the network weights (float16) plus a JSON metadata record (task, network
configuration, sampling defaults, normalisation, provenance). It is read with ``numpy.load(allow_pickle=False)``,
so opening a model file can never run code, unlike a pickled PyTorch checkpoint.

Models are found by name among the bundled ones (shipped in the package) and the user's own (a per-user folder,
``$EMDIFFUSE_MODELS_DIR`` if set), or by path.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .files import atomic_path

FORMAT = "napari-emdiffuse-model"
META_KEY = "__meta__"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models"
TASKS = ("denoise", "superres", "isotropic")
CHECKPOINT_SUFFIXES = (".pth", ".pt")  # the EMDiffuse authors' checkpoints (core.guided_unet)
SAMPLING_DEFAULTS = {"steps": 6, "sampler": "euler_ancestral", "eta": 1.0, "sigma_max": 3.0, "sigma_end": 0.02}


_listeners: list = []


def on_models_changed(callback) -> None:
    """Call ``callback()`` whenever a user model is saved, imported or removed (held weakly for bound methods)."""
    import weakref

    _listeners.append(weakref.WeakMethod(callback) if hasattr(callback, "__self__") else (lambda: callback))


def models_changed() -> None:
    for ref in list(_listeners):
        callback = ref()
        if callback is None:
            _listeners.remove(ref)
        else:
            callback()


class ModelFileError(ValueError):
    """A model file is missing, damaged or not a napari-emdiffuse model; the message says which."""


def user_models_dir() -> Path:
    if os.environ.get("EMDIFFUSE_MODELS_DIR"):
        return Path(os.environ["EMDIFFUSE_MODELS_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "napari-emdiffuse" / "models"


@dataclass
class ModelEntry:
    name: str
    task: str  # empty for an unreadable file
    path: Path
    bundled: bool
    description: str = ""
    error: str = ""  # why the file is unreadable (it is listed, and can be removed, but never used)


@dataclass
class Model:
    """A loaded network with its metadata."""

    net: object  # core.network.UNet; typed loosely so this module imports without torch
    meta: dict
    name: str
    path: Path | None = None
    sampling: dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def scale(self) -> int:
        return int(self.meta.get("scale", 1))


# Bounds on what reading a model file may cost, checked from the zip directory before anything is inflated (a
# 7.5 MB file can inflate to gigabytes): the bundled models hold ~100 arrays, 9.6 MB inflated.
MAX_MEMBERS = 2000
MAX_META_BYTES = 1 << 20
MAX_WEIGHT_BYTES = 1 << 30  # all arrays together
MAX_PARAMETERS = 250_000_000
NETWORK_LIMITS = {"in_channels": 16, "cond_channels": 16, "base": 512, "blocks": 8, "num_labels": 100_000,
                  "positions": 64,
                  "patch": 8}


def _npy_header(stream, name: str, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an .npy header, refusing object arrays (pickles) and Fortran order."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_2_0 if version >= (2, 0) else np.lib.format.read_array_header_1_0
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ModelFileError(f"{name} contains pickled objects and is refused (model files hold plain arrays "
                             "only, so loading one can never run code).")
    if fortran or dtype.kind not in "fiub":
        raise ModelFileError(f"{name} holds an array of an unusable layout or type ({member}: {dtype}).")
    return tuple(int(s) for s in shape), dtype


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str,
                 expected: tuple[tuple[int, ...], str] | None = None) -> np.ndarray:
    """One array of the archive, its header checked (and against ``expected`` shape and dtype kind) before its data
    is inflated; never more bytes than the header promises."""
    with archive.open(info) as stream:
        shape, dtype = _npy_header(stream, name, info.filename)
        if expected is not None and (shape != tuple(expected[0]) or dtype.kind != expected[1]):
            raise ModelFileError(f"{name} does not match its network description ({info.filename[:-4]} is "
                                 f"{dtype} {shape}, expected {expected[0]}).")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size > info.file_size:
            raise ModelFileError(f"{name} is damaged ({info.filename} is shorter than its header says).")
        data = stream.read(size)
    if len(data) != size:
        raise ModelFileError(f"{name} is not a readable model file (damaged or truncated?).")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _open_archive(path: Path) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """The model file's zip directory (members by array name), its sizes checked; nothing inflated yet."""
    if not path.is_file():
        raise ModelFileError(f"Model file not found: {path}")
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        raise ModelFileError(f"{path.name} is not a readable model file (damaged or truncated?).") from err
    if len(infos) > MAX_MEMBERS or sum(i.file_size for i in infos) > MAX_WEIGHT_BYTES + MAX_META_BYTES:
        archive.close()
        raise ModelFileError(f"{path.name} is refused: it would inflate to {sum(i.file_size for i in infos):,} "
                             f"bytes in {len(infos)} arrays, more than any model needs.")
    members = {i.filename[:-4]: i for i in infos if i.filename.endswith(".npy")}
    if len(members) != len(infos):
        archive.close()
        raise ModelFileError(f"{path.name} is not a napari-emdiffuse model file (it holds files other than arrays).")
    return archive, members


def _read_meta(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], name: str) -> dict:
    info = members.get(META_KEY)
    if info is None:
        raise ModelFileError(f"{name} is not a napari-emdiffuse model file (no metadata).")
    if info.file_size > MAX_META_BYTES:
        raise ModelFileError(f"{name} is refused: its metadata is {info.file_size:,} bytes, more than any model has.")
    raw = _read_member(archive, info, name)
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{name} has unreadable metadata.") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("task") not in TASKS:
        raise ModelFileError(f"{name} is not a napari-emdiffuse model file.")
    check_meta(meta, name)
    return meta


def check_meta(meta: dict, name: str) -> None:
    """A model's sampling settings within the limits every front end enforces (core/limits.py), and a network
    description of a sane size; a ModelFileError naming the file otherwise (a file asking for 10^7 steps ran
    without end)."""
    from .diffusion import SAMPLERS
    from .limits import check_number
    from .normalize import InputError

    sampling = meta.get("sampling", {})
    network = meta.get("network", {})
    if not isinstance(sampling, dict) or not isinstance(network, dict):
        raise ModelFileError(f"{name} has malformed metadata (sampling or network is not a record).")
    sampling = {**SAMPLING_DEFAULTS, **sampling}
    try:
        for key in ("steps", "eta", "sigma_max", "sigma_end"):
            check_number(key, sampling[key], f"{name}'s sampling setting {key}")
        for key, most in NETWORK_LIMITS.items():
            value = network.get(key, 1)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
                raise InputError(f"{name}'s network setting {key} must be a whole number from 0 to {most}, "
                                 f"not {value!r}.")
        mults = network.get("mults", [1])
        if not (isinstance(mults, list) and 1 <= len(mults) <= 8 and all(
                isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= 16 for m in mults)):
            raise InputError(f"{name}'s network setting mults is unusable ({mults!r}).")
    except InputError as err:
        raise ModelFileError(str(err)) from err
    if sampling["sigma_end"] > sampling["sigma_max"]:
        raise ModelFileError(f"{name}'s sampling settings are unusable: sigma_end must not exceed sigma_max.")
    if sampling["sampler"] not in SAMPLERS:
        raise ModelFileError(f"{name} asks for an unknown sampler {sampling['sampler']!r} (known: "
                             f"{', '.join(SAMPLERS)}).")


def check_state_dict(arrays: dict[str, np.ndarray], expected: dict, name: str) -> None:
    """Weights against what the network needs: the same names, each of the expected shape, a numeric dtype of the
    expected kind (float, int) and finite values. ``expected``: name -> ``(shape, dtype kind)`` (see
    :func:`expected_state`) or a tensor/array with ``shape`` and ``dtype``. Reusable for any imported weights."""
    wanted = {k: _shape_and_kind(v) for k, v in expected.items()}
    missing, extra = sorted(set(wanted) - set(arrays)), sorted(set(arrays) - set(wanted))
    if missing or extra:
        raise ModelFileError(f"{name} does not match its network description (weights differ: "
                             f"{len(missing)} missing, e.g. {missing[:1]}, {len(extra)} unexpected, e.g. {extra[:1]}).")
    for key, (shape, kind) in wanted.items():
        array = np.asarray(arrays[key])
        if tuple(array.shape) != tuple(shape) or array.dtype.kind != kind:
            raise ModelFileError(f"{name} does not match its network description ({key} is {array.dtype} "
                                 f"{tuple(array.shape)}, expected {tuple(shape)}).")
        if kind == "f" and not np.isfinite(array).all():
            raise ModelFileError(f"{name} is damaged: its weights contain NaN or infinite values ({key}).")


def _shape_and_kind(value) -> tuple[tuple[int, ...], str]:
    if isinstance(value, tuple):
        return value
    kind = "f" if getattr(value, "is_floating_point", lambda: np.dtype(value.dtype).kind == "f")() else "i"
    return tuple(value.shape), kind


def build_network(meta: dict):
    """The untrained network a model's metadata describes: ours, or the authors' (``architecture``
    ``"emdiffuse-guided"``, imported from their checkpoints). Built under ``torch.device("meta")`` it costs no memory."""
    if meta.get("architecture") == "emdiffuse-guided":
        from .guided_unet import GuidedConfig, GuidedUNet

        return GuidedUNet(GuidedConfig.from_dict(meta["network"]))
    from .network import UNet, UNetConfig

    return UNet(UNetConfig.from_dict(meta.get("network", {})))


def expected_state(config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype kind of every weight of a network of ``config`` (a UNetConfig, or a model's metadata: see
    :func:`build_network`), built without memory (torch's meta device); refused if the network would be larger than
    any model we read."""
    import torch

    from .network import UNet

    with torch.device("meta"):
        state = (build_network(config) if isinstance(config, dict) else UNet(config)).state_dict()
    if sum(t.numel() for t in state.values()) > MAX_PARAMETERS:
        raise ModelFileError("The model's network is larger than any napari-emdiffuse model (refused).")
    return {k: _shape_and_kind(t) for k, t in state.items()}


def _read(path: Path, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Metadata (and, with ``weights``, the checked weights) of a model file; ModelFileError for anything else.

    Sizes come from the zip directory and each array's header before any data is inflated; metadata alone is one
    small member."""
    archive, members = _open_archive(path)
    try:
        meta = _read_meta(archive, members, path.name)
        if not weights:
            return meta, {}
        try:
            expected = expected_state(meta)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ModelFileError(f"{path.name} does not match its network description ({err}).") from err
        arrays = {key: _read_member(archive, info, path.name, expected.get(key))
                  for key, info in members.items() if key != META_KEY}
        check_state_dict(arrays, expected, path.name)
        return meta, arrays
    except ModelFileError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, KeyError, RuntimeError) as err:  # zlib, CRC, headers
        raise ModelFileError(f"{path.name} is not a readable model file (damaged or truncated?).") from err
    finally:
        archive.close()


def read_metadata(path: str | os.PathLike) -> dict:
    """A model file's metadata alone: its zip directory and one small member (bounded time and memory)."""
    return _read(Path(path), weights=False)[0]


NAME_PATTERN = re.compile(r"^[\w][\w.+ -]{0,99}$")


def check_model_name(name: str) -> str:
    """A model name is a name, not a path: letters, digits, ``_.+- `` and spaces, no separators, no leading dot."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name != name.strip() or name.endswith("."):
        raise ModelFileError(f"{name!r} cannot be a model name: use letters, digits, '-', '_', '.' and spaces "
                             "(no folders, at most 100 characters).")
    return name


def save_model(net, meta: dict, path: str | os.PathLike) -> Path:
    """Write weights (float16) and metadata atomically: a crash never leaves a half-written model file.

    ``meta`` may be another model's metadata as read: the file format and the network description are always
    this writer's and this network's."""
    path = Path(path)
    if path.suffix != ".npz":  # written exactly where asked, or refused (never quietly elsewhere)
        raise ModelFileError(f"Model files end in .npz; {path.name} does not.")
    meta = {**meta, "format": FORMAT, "version": 1, "network": net.config.to_dict()}
    if meta.get("task") not in TASKS:
        raise ValueError(f"task must be one of {TASKS}")
    keep = meta.get("weights_dtype") == "float32"  # the authors' weights stay as trained
    arrays = {k: v.detach().cpu().to(dtype=v.dtype if keep else _storage_dtype(v)).numpy()
              for k, v in net.state_dict().items()}
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def _storage_dtype(tensor):
    import torch

    return torch.float16 if tensor.is_floating_point() else tensor.dtype


def list_models(task: str | None = None) -> list[ModelEntry]:
    """Bundled models first, then the user's, each group sorted by name. Only metadata is read (bounded: see
    :func:`read_metadata`). An unreadable file is listed, with ``error`` saying why, when no ``task`` is asked for
    (``emdiffuse models``, removal); one of a task never includes it."""
    entries = []
    for folder, bundled in ((BUNDLED_DIR, True), (user_models_dir(), False)):
        for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
            try:
                meta = read_metadata(path)
            except ModelFileError as err:
                if task is None:
                    entries.append(ModelEntry(path.stem, "", path, bundled, error=str(err)))
                continue
            if task is None or meta["task"] == task:
                description = meta.get("description", "")
                entries.append(ModelEntry(path.stem, meta["task"], path, bundled,
                                          description if isinstance(description, str) else ""))
    return entries


def resolve(name_or_path: str | os.PathLike, task: str | None = None) -> Path:
    """Path of a model given by name (bundled or user) or by file path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".npz", *CHECKPOINT_SUFFIXES) or candidate.exists():
        if not candidate.is_file():
            raise ModelFileError(f"Model file not found: {candidate}")
        return candidate
    for entry in list_models(task):
        if entry.name == str(name_or_path):
            if entry.error:
                raise ModelFileError(f"The model '{entry.name}' is unreadable: {entry.error}")
            return entry.path
    unreadable = next((e for e in list_models() if e.name == str(name_or_path) and e.error), None)
    if unreadable is not None:
        raise ModelFileError(f"The model '{unreadable.name}' is unreadable: {unreadable.error}")
    known = ", ".join(e.name for e in list_models(task) if not e.error) or "none"
    raise ModelFileError(f"No model named '{name_or_path}' (available: {known}).")


def default_model(task: str) -> str:
    bundled = [e for e in list_models(task) if e.bundled]
    if not bundled:
        raise ModelFileError(f"No bundled model for the task '{task}'.")
    return bundled[0].name


def load_model(name_or_path: str | os.PathLike, device="cpu", task: str | None = None) -> Model:
    path = resolve(name_or_path, task)
    stat = path.stat()
    if path.suffix in CHECKPOINT_SUFFIXES:  # the file does not say its task: the caller does
        if task is None:
            raise ModelFileError(f"{path.name} is an EMDiffuse checkpoint: say which task it is for.")
        return _load_checkpoint_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device), task)
    model = _load_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device))
    if task is not None and model.task != task:
        raise ModelFileError(f"The model '{model.name}' is a {model.task} model, not a {task} model.")
    return model


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int, device: str) -> Model:
    import torch

    meta, arrays = _read(Path(path))  # checked: sizes, shapes, dtypes, finite values, sampling settings
    try:
        net = build_network(meta)
        state = net.state_dict()
        net.load_state_dict({k: torch.from_numpy(arrays[k].copy()).to(state[k].dtype) for k in state})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{Path(path).name} does not match its network description ({err}).") from err
    return _ready(net, meta, Path(path), device)


def _ready(net, meta: dict, path: Path, device: str) -> Model:
    import torch

    net = net.eval().to(device).to(memory_format=torch.channels_last)
    sampling = {**SAMPLING_DEFAULTS, **meta.get("sampling", {})}
    sampling["steps"] = int(sampling["steps"])  # checked whole by check_meta
    return Model(net=net, meta=meta, name=meta.get("name", path.stem), path=path, sampling=sampling)


@lru_cache(maxsize=2)
def _load_checkpoint_cached(path: str, mtime_ns: int, size: int, device: str, task: str) -> Model:
    from .guided_unet import load_checkpoint

    net, meta = load_checkpoint(path, task)
    return _ready(net, meta, Path(path), device)


def _user_entry(name: str) -> ModelEntry:
    check_model_name(name)
    for entry in list_models():
        if entry.name == name and not entry.bundled:
            return entry
    if any(e.name == name for e in list_models()):
        raise ModelFileError(f"'{name}' is a bundled model; only your own models can be removed.")
    raise ModelFileError(f"No user model named '{name}'.")


def dated_name(prefix: str) -> str:
    """A name for a model saved without one being given: ``prefix`` and the date and time."""
    import time

    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def free_name(name: str, overwrite: bool = False) -> Path:
    """Where a new user model ``name`` goes; an error if the name is taken (check it before a long training)."""
    path = user_models_dir() / f"{check_model_name(name)}.npz"
    if os.path.lexists(path) and not overwrite:
        raise ModelFileError(f"A model named '{name}' exists already; choose another name.")
    if any(e.name == name and e.bundled for e in list_models()):
        raise ModelFileError(f"'{name}' is the name of a bundled model; choose another name.")
    return path


def install_model(net, meta: dict, name: str, overwrite: bool = False) -> Path:
    """Save a model into the user's folder under ``name`` and tell the model pickers."""
    path = free_name(name, overwrite)
    save_model(net, {**meta, "name": name}, path)
    models_changed()
    return path


def remove_model(name: str) -> Path:
    path = _user_entry(name).path
    path.unlink()
    models_changed()
    return path


def export_model(name_or_path: str, destination: str | os.PathLike, overwrite: bool = False, factor: int = 4) -> Path:
    """Copy a model to a file of the user's choice (atomically; never over an existing file unless asked); to a
    ``.zip``: as a BioImage.io model package (an isotropic model's for the whole z ``factor``)."""
    from .normalize import InputError
    from .safety import check_output

    if Path(destination).suffix == ".zip":
        from .bioimageio import export_package

        return export_package(name_or_path, destination, overwrite=overwrite, factor=factor)
    source = resolve(name_or_path)
    read_metadata(source)  # refuse to export something that is not a model
    destination = Path(destination)
    if destination.suffix != ".npz":  # written exactly where asked, or refused
        raise ModelFileError(f"Model files end in .npz (BioImage.io packages in .zip); {destination.name} does not.")
    try:
        check_output(destination, [source], overwrite)
    except InputError as err:  # one kind of error from this module
        raise ModelFileError(str(err)) from err
    with atomic_path(destination) as tmp:
        tmp.write_bytes(source.read_bytes())
    return destination


def import_model(path: str | os.PathLike, name: str | None = None, task: str | None = None) -> Path:
    """Check a model file (plain arrays only, matching network) and copy it into the user's folder.

    From a BioImage.io package of ours: its model file, with the same checks. An EMDiffuse authors' checkpoint
    (``.pth``) is converted into a model file; it needs ``task``, which the checkpoint does not record (for our own
    files, ``task`` if given must be the file's)."""
    from .bioimageio import import_package, is_package

    path = Path(path)
    if name is not None:
        check_model_name(name)
    if is_package(path):
        return import_package(path, name)
    if path.suffix in CHECKPOINT_SUFFIXES:
        if task is None:
            raise ModelFileError(f"{path.name} is an EMDiffuse checkpoint, which does not say its task: give it "
                                 "(denoise, superres or isotropic).")
        from .guided_unet import load_checkpoint

        net, meta = load_checkpoint(path, task)
        return install_model(net, meta, check_model_name(name or path.stem))
    meta, _ = _read(path)
    if task is not None and meta["task"] != task:
        raise ModelFileError(f"{path.name} is a {meta['task']} model, not a {task} model.")
    name = check_model_name(name or Path(path).stem)
    model = _load_cached(str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size, "cpu")
    return install_model(model.net, meta, name)
