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
    task: str
    path: Path
    bundled: bool
    description: str = ""


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


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if not path.is_file():
        raise ModelFileError(f"Model file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as err:  # numpy refuses object arrays, i.e. pickles
        raise ModelFileError(f"{path.name} contains pickled objects and is refused (model files hold plain arrays "
                             "only, so loading one can never run code).") from err
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as err:
        raise ModelFileError(f"{path.name} is not a readable model file (damaged or truncated?).") from err
    if META_KEY not in arrays:
        raise ModelFileError(f"{path.name} is not a napari-emdiffuse model file (no metadata).")
    try:
        meta = json.loads(arrays.pop(META_KEY).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path.name} has unreadable metadata.") from err
    if meta.get("format") != FORMAT or meta.get("task") not in TASKS:
        raise ModelFileError(f"{path.name} is not a napari-emdiffuse model file.")
    return meta, arrays


def read_metadata(path: str | os.PathLike) -> dict:
    return _read(Path(path))[0]


def save_model(net, meta: dict, path: str | os.PathLike) -> Path:
    """Write weights (float16) and metadata atomically: a crash never leaves a half-written model file.

    ``meta`` may be another model's metadata as read: the file format and the network description are always
    this writer's and this network's."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
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
    """Bundled models first, then the user's, each group sorted by name; unreadable files are skipped."""
    entries = []
    for folder, bundled in ((BUNDLED_DIR, True), (user_models_dir(), False)):
        for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
            try:
                meta = read_metadata(path)
            except ModelFileError:
                continue
            if task is None or meta["task"] == task:
                entries.append(ModelEntry(path.stem, meta["task"], path, bundled, meta.get("description", "")))
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
            return entry.path
    known = ", ".join(e.name for e in list_models(task)) or "none"
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

    from .network import UNet, UNetConfig

    meta, arrays = _read(Path(path))
    try:
        if meta.get("architecture") == "emdiffuse-guided":
            from .guided_unet import GuidedConfig, GuidedUNet

            net = GuidedUNet(GuidedConfig.from_dict(meta["network"]))
        else:
            net = UNet(UNetConfig.from_dict(meta["network"]))
        state = net.state_dict()
        if set(arrays) != set(state):
            raise ModelFileError(f"{Path(path).name} does not match its network description (weights differ).")
        net.load_state_dict({k: torch.from_numpy(arrays[k]).to(state[k].dtype) for k in state})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{Path(path).name} does not match its network description ({err}).") from err
    return _ready(net, meta, Path(path), device)


def _ready(net, meta: dict, path: Path, device: str) -> Model:
    import torch

    net = net.eval().to(device).to(memory_format=torch.channels_last)
    sampling = {**SAMPLING_DEFAULTS, **meta.get("sampling", {})}
    return Model(net=net, meta=meta, name=meta.get("name", path.stem), path=path, sampling=sampling)


@lru_cache(maxsize=2)
def _load_checkpoint_cached(path: str, mtime_ns: int, size: int, device: str, task: str) -> Model:
    from .guided_unet import load_checkpoint

    net, meta = load_checkpoint(path, task)
    return _ready(net, meta, Path(path), device)


def _user_entry(name: str) -> ModelEntry:
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
    path = user_models_dir() / f"{name}.npz"
    if path.exists() and not overwrite:
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


def export_model(name_or_path: str, destination: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy a model to a file of the user's choice (atomically; never over an existing file unless asked)."""
    source = resolve(name_or_path)
    read_metadata(source)  # refuse to export something that is not a model
    destination = Path(destination)
    if destination.suffix != ".npz":
        destination = destination.with_suffix(".npz")
    if destination.exists() and not overwrite:
        raise ModelFileError(f"{destination} exists; choose another name.")
    with atomic_path(destination) as tmp:
        tmp.write_bytes(source.read_bytes())
    return destination


def import_model(path: str | os.PathLike, name: str | None = None, task: str | None = None) -> Path:
    """Check a model file (plain arrays only, matching network) and copy it into the user's folder.

    An EMDiffuse authors' checkpoint (``.pth``) is converted into a model file; it needs ``task``, which the
    checkpoint does not record (for our own files, ``task`` if given must be the file's)."""
    path = Path(path)
    if path.suffix in CHECKPOINT_SUFFIXES:
        if task is None:
            raise ModelFileError(f"{path.name} is an EMDiffuse checkpoint, which does not say its task: give it "
                                 "(denoise, superres or isotropic).")
        from .guided_unet import load_checkpoint

        net, meta = load_checkpoint(path, task)
        return install_model(net, meta, name or path.stem)
    meta, _ = _read(path)
    if task is not None and meta["task"] != task:
        raise ModelFileError(f"{path.name} is a {meta['task']} model, not a {task} model.")
    name = name or Path(path).stem
    model = _load_cached(str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size, "cpu")
    return install_model(model.net, meta, name)
