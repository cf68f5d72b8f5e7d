"""Issue 32, data safety: the tool deletes or replaces only what it made, never writes or calls reliable a result
that is not finite, refuses bad numbers and model files before any work, keeps its cluster on loopback, and every
route ends a failure in one sentence (exit 2) with nothing left behind. README, *Reliability*, maps each class to
the tests here."""

import errno
import json
import os
import shutil
import stat
import zipfile

import numpy as np
import pytest
import tifffile

from napari_emdiffuse.cli import main
from napari_emdiffuse.core.io import read_tiff

zarr = pytest.importorskip("zarr")


def run_cli(capsys, *args):
    """The exit code and stderr's lines of one command."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def refused(capsys, *args, says: str = "") -> str:
    """The command exits 2 with exactly one line on stderr (containing ``says``)."""
    code, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1, err
    assert says in err[0] and "Traceback" not in err[0], err
    return err[0]


def listing(folder) -> dict:
    """Every path under ``folder`` with its bytes (or None for folders and special files): what a run left."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = (open(path, "rb").read() if os.path.isfile(path)
                                                    and not os.path.islink(path) else None)
    return found


@pytest.fixture
def image_tif(tmp_path):
    path = tmp_path / "in.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((40, 48)) * 200).astype(np.uint8))
    return path


def write_volume(path, data, chunks, scale=None, axes_unit="micrometer"):
    """A Zarr array, or an OME-Zarr 0.4 group (``s0``) with ``scale``."""
    if scale is None:
        zarr.create_array(str(path), data=data, chunks=chunks)
        return path
    root = zarr.open_group(str(path), mode="w")
    root.create_array("s0", data=data, chunks=chunks)
    axes = [{"name": n, "type": "space", "unit": axes_unit} for n in "zyx"[-data.ndim:]]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}]}]
    return path


FAST = ("--steps", "1", "--tile", "64", "--quiet")


# 1. Deleting data: only a regular file or a store of ours is ever replaced, never an input or what contains one

def test_overwrite_never_deletes_a_store_holding_the_input_and_other_data(tmp_path, tiny_model, capsys):
    store = tmp_path / "data.zarr"
    root = zarr.open_group(str(store), mode="w")
    root.create_array("raw", data=np.random.default_rng(0).random((2, 32, 32)).astype(np.float32), chunks=(1, 32, 32))
    root.create_array("labels", data=np.ones((2, 32, 32), np.uint8), chunks=(1, 32, 32))
    before = listing(store)
    refused(capsys, "denoise", store / "raw", "-o", store, "--model", tiny_model, "--overwrite", *FAST,
            says="is or contains the input")
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    refused(capsys, "denoise", store / "raw", "-o", other, "--model", tiny_model, "--overwrite", *FAST,
            says="did not make")
    assert listing(store) == before and listing(other) == before


def test_overwrite_never_deletes_a_folder_holding_a_tiff(tmp_path, image_tif, tiny_model, capsys):
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    shutil.copy(image_tif, folder / "precious.tif")
    refused(capsys, "denoise", image_tif, "-o", folder, "--model", tiny_model, "--overwrite", *FAST,
            says="did not make")
    refused(capsys, "denoise", folder / "precious.tif", "-o", folder, "--model", tiny_model, "--overwrite", *FAST)
    assert (folder / "precious.tif").read_bytes() == image_tif.read_bytes()


def test_a_batch_with_overwrite_never_replaces_an_input(tmp_path, image_tif, tiny_model, capsys):
    second = tmp_path / "in_denoised.tif"  # what the first input's result would be called
    tifffile.imwrite(second, np.full((40, 48), 7, np.uint8))
    before = listing(tmp_path)
    refused(capsys, "denoise", image_tif, second, "-o", tmp_path, "--model", tiny_model, "--overwrite", *FAST,
            says="is or contains the input")
    assert listing(tmp_path) == before  # checked before any work: nothing written, nothing replaced


@pytest.mark.parametrize("kind", ["fifo", "device", "socket", "dangling link", "link to a file", "foreign folder"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_only_regular_files_and_own_stores_are_replaced(tmp_path, image_tif, tiny_model, capsys, kind, overwrite):
    out = tmp_path / "out.tif"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "device":  # one of our own (never /dev/null: the old code replaced it with a regular file)
        try:
            os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root")
    elif kind == "socket":
        import socket

        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(out))
        listener.close()
    elif kind == "dangling link":
        out.symlink_to(tmp_path / "nowhere.tif")
    elif kind == "link to a file":
        (tmp_path / "target.tif").write_bytes(b"precious")
        out.symlink_to(tmp_path / "target.tif")
    else:  # a Zarr output path (a folder is a batch's output folder otherwise)
        out = tmp_path / "out.zarr"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    mode = os.lstat(out).st_mode
    refused(capsys, "denoise", image_tif, "-o", out, "--model", tiny_model, *FAST,
            *(["--overwrite"] if overwrite else []))
    assert os.lstat(out).st_mode == mode  # still the FIFO, device, link or folder it was
    assert not (tmp_path / "nowhere.tif").exists()
    if kind == "link to a file":
        assert (tmp_path / "target.tif").read_bytes() == b"precious"


def test_a_store_of_ours_is_resumed_or_replaced_with_overwrite(tmp_path, tiny_model, capsys):
    source = write_volume(tmp_path / "in.zarr", np.random.default_rng(0).random((2, 32, 32)).astype(np.float32),
                          (1, 32, 32))
    out = tmp_path / "out.zarr"
    assert main(["denoise", str(source), "-o", str(out), "--model", tiny_model, *FAST]) == 0
    refused(capsys, "denoise", source, "-o", out, "--model", tiny_model, *FAST, "--samples", "3", says="exists")
    assert main(["denoise", str(source), "-o", str(out), "--model", tiny_model, *FAST, "--samples", "3",
                 "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 3


def test_the_safety_rule_in_one_place(tmp_path):
    from napari_emdiffuse.core.safety import UnsafeOutput, check_output, check_outputs, own_store

    folder = tmp_path / "project"
    folder.mkdir()
    source = folder / "raw.tif"
    source.write_bytes(b"data")
    with pytest.raises(UnsafeOutput, match="is or contains the input"):
        check_output(tmp_path, [source], overwrite=True, store=True)
    with pytest.raises(UnsafeOutput, match="is or contains the input"):
        check_output(folder / ".." / "project" / "raw.tif", [source], overwrite=True)
    os.link(source, tmp_path / "hard.tif")
    with pytest.raises(UnsafeOutput, match="is or contains the input"):  # the same file by another name
        check_output(tmp_path / "hard.tif", [source], overwrite=True)
    with pytest.raises(UnsafeOutput, match="twice"):
        check_outputs([tmp_path / "a.tif", tmp_path / "." / "a.tif"], [source])
    assert check_output(tmp_path / "new" / "deeper" / "x.tif", [source]) == tmp_path / "new" / "deeper" / "x.tif"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert not own_store(folder) and not own_store(source)


# 2. Garbage is never written nor called reliable; every chunk is checked; a resume needs the same input

def test_nan_late_in_a_chunked_volume_stops_the_run_and_leaves_nothing(tmp_path, tiny_model, capsys):
    volume = np.random.default_rng(0).random((40, 32, 32)).astype(np.float32)
    volume[39, 5, 20] = np.nan  # a plane the normalisation's sample skips, outside the fingerprint's windows
    source = write_volume(tmp_path / "in.zarr", volume, (1, 32, 32))
    out = tmp_path / "out.zarr"
    refused(capsys, "denoise", source, "-o", out, "--model", tiny_model, *FAST, "--samples", "1", says="NaN")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]
    volume[39, 5, 20] = 0.5  # fixed: the rerun starts afresh and ends finite
    shutil.rmtree(source)
    write_volume(tmp_path / "in.zarr", volume, (1, 32, 32))
    assert main(["denoise", str(source), "-o", str(out), "--model", tiny_model, *FAST, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert np.isfinite(zarr.open_group(str(out), mode="r")["0"][...]).all() and np.isfinite(
        summary["uncertainty_score"])


def test_a_resume_needs_the_same_input_whatever_its_path(tmp_path, tiny_model, capsys, monkeypatch):
    volume = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    source = write_volume(tmp_path / "in.zarr", volume, (1, 32, 32))
    out = tmp_path / "out.zarr"
    assert main(["denoise", str(source), "-o", str(out), "--model", tiny_model, *FAST, "--chunk", "1,32,32"]) == 0
    zarr.open_group(str(out), mode="r+")["run/done"][1:] = 0  # as if interrupted after the first plane
    monkeypatch.chdir(tmp_path)
    assert main(["denoise", "in.zarr", "-o", "out.zarr", "--model", tiny_model, *FAST, "--chunk", "1,32,32",
                 "--json"]) == 0
    assert "resumed: 1 of 3 chunks" in capsys.readouterr().err
    zarr.open_group(str(out), mode="r+")["run/done"][1:] = 0
    shutil.rmtree(source)
    write_volume(tmp_path / "in.zarr", volume[::-1] * 3, (1, 32, 32))  # same shape and dtype, other content
    before = listing(out)
    refused(capsys, "denoise", "in.zarr", "-o", "out.zarr", "--model", tiny_model, *FAST, "--chunk", "1,32,32",
            says="not an unfinished run of this input")
    assert listing(out) == before


def test_a_stored_normaliser_is_never_used_for_other_intensities(tmp_path, tiny_model):
    from napari_emdiffuse.core.chunked import ChunkedTask, restore_volume
    from napari_emdiffuse.core.normalize import InputError
    from napari_emdiffuse.core.tasks import Settings, drive

    volume = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    out = tmp_path / "out.zarr"
    settings = Settings(samples=1, steps=1, tile=32, overlap=8)
    drive(restore_volume(volume, out, ChunkedTask("denoise"), tiny_model, settings, chunk=(1, 32, 32)))
    zarr.open_group(str(out), mode="r+")["run/done"][1:] = 0
    changed = volume.copy()
    changed[1] *= 5  # the fingerprint's windows see plane 1 only at its corners and centre: the normaliser sees all
    changed[1, :16, :16] = volume[1, :16, :16]
    changed[1, 16:, 16:] = volume[1, 16:, 16:]
    with pytest.raises(InputError):
        drive(restore_volume(changed, out, ChunkedTask("denoise"), tiny_model, settings, chunk=(1, 32, 32)))


def test_a_result_that_is_not_finite_is_never_written(tmp_path, image_tif, tiny_model, capsys, monkeypatch):
    import torch

    from napari_emdiffuse.core import diffusion

    def broken(denoiser, x, sigmas, noise, eta=1.0):
        yield 0
        return torch.full_like(x, float("nan"))

    monkeypatch.setitem(diffusion.SAMPLERS, "euler_ancestral", broken)
    out, unc = tmp_path / "out.tif", tmp_path / "unc.tif"
    refused(capsys, "denoise", image_tif, "-o", out, "--uncertainty", unc, "--model", tiny_model, *FAST,
            says="NaN or infinite")
    assert not out.exists() and not unc.exists()
    refused(capsys, "denoise", image_tif, "-o", tmp_path / "out.zarr", "--model", tiny_model, *FAST,
            says="NaN or infinite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_a_nan_score_is_never_reliable():
    from napari_emdiffuse.core.tasks import is_reliable, verdict

    assert not is_reliable(float("nan"), 0.12) and verdict(float("nan"), 0.12).startswith("NOT reliable")
    assert is_reliable(0.05, 0.12) and not is_reliable(float("inf"), 0.12)


# 3. Bad values are refused before any work, by one validation

@pytest.mark.parametrize("option", [
    ("--eta", "nan"), ("--eta", "2"), ("--eta", "-0.1"), ("--eta", "inf"), ("--threshold", "inf"),
    ("--threshold", "-1"), ("--threshold", "nan"), ("--samples", "0"), ("--samples", "-3"), ("--samples", "100000"),
    ("--steps", "0"), ("--steps", "10000000"), ("--tile", "8"), ("--tile", "-256"), ("--tile", "1000000"),
    ("--halo", "-1"), ("--workers", "0"), ("--chunk", "0,32,32"), ("--chunk", "1,2"), ("--scheduler", "bogus"),
    ("--seed", "-1"), ("--samples", "two"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, image_tif, tiny_model, capsys, option):
    for out in (tmp_path / "out.tif", tmp_path / "out.zarr"):
        refused(capsys, "denoise", image_tif, "-o", out, "--model", tiny_model, *option)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


@pytest.mark.parametrize("budget", [("--iterations", "0"), ("--iterations", "-5"), ("--minutes", "0"),
                                    ("--minutes", "-1"), ("--minutes", "nan"), ("--minutes", "inf")])
def test_a_training_budget_must_be_positive_and_finite(tmp_path, image_tif, capsys, budget):
    refused(capsys, "finetune", "--task", "denoise", "--input", image_tif, "--target", image_tif, "-o",
            tmp_path / "m.npz", *budget, says="must be")
    refused(capsys, "isotropic", image_tif, "-o", tmp_path / "o.tif", "--self-supervised", "--factor", "4",
            "--train-minutes", budget[1], says="must be")
    assert not (tmp_path / "m.npz").exists()


def test_the_same_validation_serves_the_widgets_and_the_core():
    from napari_emdiffuse.core.limits import check_number
    from napari_emdiffuse.core.normalize import InputError
    from napari_emdiffuse.core.tasks import Settings

    with pytest.raises(InputError, match="eta must be a number from 0 to 1, not nan"):
        Settings(eta=float("nan"))
    with pytest.raises(InputError, match="sampler"):
        Settings(sampler="magic")
    with pytest.raises(InputError, match="The number of samples must be a whole number from 1 to 64, not 2.5"):
        Settings(samples=2.5)
    assert check_number("halo", 3.0) == 3 and isinstance(check_number("eta", 1), float)


def test_a_z_factor_a_model_does_not_serve_is_refused_not_clamped(tmp_path, tiny_isotropic, tiny_isotropic_labels,
                                                                   capsys):
    path, far = tmp_path / "sections.tif", tmp_path / "far.tif"
    tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint8), imagej=True, resolution=(1 / 4, 1 / 4),
                     metadata={"unit": "nm", "spacing": 50.0})
    tifffile.imwrite(far, np.zeros((3, 32, 32), np.uint8), imagej=True, resolution=(1 / 4, 1 / 4),
                     metadata={"unit": "nm", "spacing": 160.0})
    refused(capsys, "isotropic", path, "-o", tmp_path / "o.tif", "--model", tiny_isotropic_labels, *FAST,
            says="whole z factors only (2 to 10), not a slice 0.08 of the way between sections 12.5 pixels apart")
    refused(capsys, "isotropic", far, "-o", tmp_path / "o.tif", "--model", tiny_isotropic, *FAST,
            says="gives a z factor of 40, outside the 1 to 32 made; give the z factor R")
    refused(capsys, "isotropic", path, "-o", tmp_path / "o.tif", "--model", tiny_isotropic, "--bad-sections", "2",
            *FAST, says="Section 2 cannot be regenerated: it has no good neighbour after it")
    refused(capsys, "isotropic", path, "-o", tmp_path / "o.tif", "--model", tiny_isotropic, "--output-spacing", "0",
            *FAST, says="The output z spacing must be a number above 0 to 1e+09, not 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.tif", "sections.tif"]


def test_output_locations_are_checked_before_the_run(tmp_path, image_tif, tiny_model, capsys):
    same = tmp_path / "x.tif"
    refused(capsys, "denoise", image_tif, "-o", same, "--uncertainty", same, "--model", tiny_model, says="twice")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    refused(capsys, "denoise", image_tif, "-o", blocker / "out.tif", "--model", tiny_model, says="not a folder")
    refused(capsys, "finetune", "--task", "denoise", "--input", image_tif, "--target", image_tif, "-o",
            blocker / "m.npz", "--iterations", "1", says="not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.tif"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_folder_is_refused_before_the_run(tmp_path, image_tif, tiny_model, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        refused(capsys, "denoise", image_tif, "-o", folder / "out.tif", "--model", tiny_model, says="Cannot write")
    finally:
        folder.chmod(stat.S_IRWXU)


def test_an_unwritable_location_is_refused_before_the_run(tmp_path, image_tif, tiny_model, capsys):
    if os.access("/sys", os.W_OK) and os.geteuid() != 0:
        pytest.skip("/sys is writable here")
    refused(capsys, "denoise", image_tif, "-o", "/sys/emdiffuse-out.tif", "--model", tiny_model,
            says="Cannot write")


# 4. Model files: metadata alone to list, bounded reads, checked weights, names are names

def npz_with(path, meta, **arrays):
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    return path


def zip_bomb(path, meta_source, inflated=1_200_000_000):
    """A valid model's metadata plus one array whose zeros inflate to more than a gigabyte (a few MB on disk)."""
    with zipfile.ZipFile(meta_source) as good, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("__meta__.npy", good.read("__meta__.npy"))
        header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.uint8))
        header["shape"] = (inflated,)
        with bomb.open("w.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            block = bytes(64 << 20)
            for _ in range(inflated // len(block) + 1):
                f.write(block)
    return path


@pytest.fixture
def models_folder(tmp_path, monkeypatch, tiny_model):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "tiny.npz")
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(folder))
    return folder


def test_bad_model_files_are_listed_as_unreadable_and_break_nothing(tmp_path, models_folder, image_tif, capsys):
    from napari_emdiffuse.core.models import read_metadata

    meta = read_metadata(models_folder / "tiny.npz")
    npz_with(models_folder / "listmeta.npz", [1, 2])
    npz_with(models_folder / "badnet.npz", {**meta, "network": {"base": "x"}})
    npz_with(models_folder / "endless.npz", {**meta, "sampling": {"steps": 10_000_000}})
    (models_folder / "junk.npz").write_bytes(b"PK\x03\x04 not really")
    with zipfile.ZipFile(models_folder / "script.npz", "w") as z:
        z.writestr("run.py", "print('hi')")
    assert main(["models", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    bad = ["badnet", "endless", "junk", "listmeta", "script"]
    assert all(entries[name]["unreadable"] and entries[name]["task"] is None for name in bad)
    assert "10000000" in entries["endless"]["unreadable"] and "tiny" in entries and "unreadable" not in entries["tiny"]
    assert main(["denoise", str(image_tif), "-o", str(tmp_path / "o.tif"), "--model", "tiny", *FAST]) == 0
    refused(capsys, "denoise", image_tif, "-o", tmp_path / "p.tif", "--model", "endless", *FAST, says="10000000")
    for name in bad:
        assert main(["models", "--remove", name]) == 0
    assert sorted(p.name for p in models_folder.iterdir()) == ["tiny.npz"]


def test_a_zip_bomb_is_refused_from_its_directory_without_inflating(models_folder, capsys):
    import time
    import tracemalloc

    from napari_emdiffuse.core.models import ModelFileError, list_models, load_model

    bomb = zip_bomb(models_folder / "bomb.npz", models_folder / "tiny.npz")
    assert bomb.stat().st_size < 20_000_000
    tracemalloc.start()
    started = time.perf_counter()
    entries = {e.name: e for e in list_models()}
    with pytest.raises(ModelFileError, match="inflate"):
        load_model(bomb)
    seconds, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "inflate" in entries["bomb"].error and peak < 50_000_000 and seconds < 5
    assert main(["models", "--remove", "bomb"]) == 0 and not bomb.exists()


def test_weights_are_checked_before_use(tmp_path, tiny_model):
    from napari_emdiffuse.core.models import (
        ModelFileError,
        check_state_dict,
        expected_state,
        load_model,
        read_metadata,
    )
    from napari_emdiffuse.core.network import UNetConfig

    meta = read_metadata(tiny_model)
    arrays = {k: v for k, v in np.load(tiny_model).items() if k != "__meta__"}
    expected = expected_state(UNetConfig.from_dict(meta["network"]))
    check_state_dict(arrays, expected, "tiny.npz")  # the good one passes: the check is reusable on its own
    key = next(k for k, v in arrays.items() if v.ndim == 4)
    for name, change, message in [
        ("nan", lambda a: a.__setitem__(key, np.full_like(a[key], np.nan)), "NaN"),
        ("shape", lambda a: a.__setitem__(key, a[key][:1]), "does not match"),
        ("dtype", lambda a: a.__setitem__(key, a[key].astype(np.int16)), "does not match"),
        ("missing", lambda a: a.pop(key), "does not match"),
    ]:
        changed = dict(arrays)
        change(changed)
        with pytest.raises(ModelFileError, match=message):
            check_state_dict(changed, expected, "x.npz")
        path = npz_with(tmp_path / f"{name}.npz", meta, **changed)
        with pytest.raises(ModelFileError, match=message):
            load_model(path)
    with pytest.raises(ModelFileError, match="larger than any"):
        expected_state(UNetConfig(base=512, mults=(16,) * 8))


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", "..", ".hidden", "", "a\\b", "x" * 101, "nul\0"])
def test_a_model_name_is_a_name_not_a_path(tmp_path, models_folder, image_tif, capsys, name):
    from napari_emdiffuse.core.models import ModelFileError, check_model_name, free_name

    with pytest.raises(ModelFileError, match="cannot be a model name"):
        check_model_name(name)
    with pytest.raises(ModelFileError):
        free_name(name)
    if name and "\0" not in name:
        refused(capsys, "isotropic", image_tif, "-o", tmp_path / "o.tif", "--self-supervised", "--factor", "4",
                "--save-model", name)
        refused(capsys, "models", "--remove", name)
    assert check_model_name("my model-2.1_b") == "my model-2.1_b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "models"]


def test_finetune_writes_exactly_where_asked_or_refuses(tmp_path, image_tif, tiny_model, capsys):
    refused(capsys, "finetune", "--task", "denoise", "--input", image_tif, "--target", image_tif, "-o",
            tmp_path / "model.pt", "--iterations", "1", "--base", tiny_model, says=".npz")
    existing = tmp_path / "model.npz"
    existing.write_bytes(b"precious")
    refused(capsys, "finetune", "--task", "denoise", "--input", image_tif, "--target", image_tif, "-o", existing,
            "--iterations", "1", "--base", tiny_model, says="exists")
    assert existing.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["in.tif",
                                                                                                     "model.npz"]
    from napari_emdiffuse.core.models import ModelFileError, export_model

    with pytest.raises(ModelFileError, match=".npz"):
        export_model(tiny_model, tmp_path / "copy.pt")
    with pytest.raises(ModelFileError, match="exists"):
        export_model(tiny_model, existing)
    os.mkfifo(tmp_path / "pipe.npz")
    with pytest.raises(ModelFileError, match="not a regular file"):
        export_model(tiny_model, tmp_path / "pipe.npz", overwrite=True)
    assert existing.read_bytes() == b"precious"


# 5. Network exposure: a local cluster listens on loopback only, with no dashboard unless asked

LOOPBACK = {"127.0.0.1", "::1"}


def listening_addresses(process) -> set:
    import psutil

    pids = {process.pid} | {child.pid for child in process.children(recursive=True)}
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def test_a_chunked_run_listens_on_loopback_only(tmp_path, tiny_model):
    import psutil

    from napari_emdiffuse.core.chunked import ChunkedTask, restore_volume
    from napari_emdiffuse.core.tasks import Settings, drive

    me = psutil.Process()
    before = listening_addresses(me)
    seen = set()
    source = write_volume(tmp_path / "in.zarr", np.random.default_rng(0).random((3, 32, 32)).astype(np.float32),
                          (1, 32, 32))
    drive(restore_volume(str(source), tmp_path / "out.zarr", ChunkedTask("denoise"), tiny_model,
                         Settings(samples=1, steps=1, tile=32, overlap=8), chunk=(1, 32, 32)),
          lambda p: seen.update(listening_addresses(me) - before))
    assert seen, "the threads scheduler's servers were seen"
    assert {ip for ip, _ in seen} <= LOOPBACK


def test_a_local_cluster_listens_on_loopback_only_and_serves_no_dashboard():
    import urllib.request

    import psutil

    from napari_emdiffuse.core.chunked import dask_client

    me = psutil.Process()
    before = listening_addresses(me)
    with dask_client("local", 1) as client:
        opened = listening_addresses(me) - before
        assert opened and {ip for ip, _ in opened} <= LOOPBACK
        for _, port in opened:  # no dashboard, no worker logs or call stacks on any of them
            for page in ("status", "info/main/workers.html"):
                try:
                    served = urllib.request.urlopen(f"http://127.0.0.1:{port}/{page}", timeout=2).status
                except Exception:  # 404, or not HTTP at all (the cluster's own protocol)
                    served = None
                assert served is None, f"port {port} serves /{page}"
        assert client.status == "running"


# 6. Every route: the same checks, one sentence, exit 2, nothing left behind

def test_the_rgb_check_holds_on_the_zarr_route(tmp_path, tiny_model, capsys):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((64, 64, 3), np.uint8))
    refused(capsys, "denoise", rgb, "-o", tmp_path / "out.zarr", "--model", tiny_model, *FAST, says="RGB")
    source = write_volume(tmp_path / "rgb.zarr", np.zeros((64, 64, 3), np.uint8), (64, 64, 3))
    refused(capsys, "denoise", source, "-o", tmp_path / "out2.zarr", "--model", tiny_model, *FAST, says="RGB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.tif", "rgb.zarr"]


@pytest.mark.parametrize("multiscales, message", [
    ([{"datasets": "s0"}], "malformed"),
    ([{"datasets": [{"no_path": 1}]}], "malformed"),
    ([{"datasets": [{"path": "missing"}]}], "malformed"),
    ([{"axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
       "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": ["a", 1, 1]}]}]}],
     "malformed"),
    ([{"axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
       "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [0, 4, 4]}]}]}],
     "pixel size"),
    ([{"axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
       "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1e400, 4, 4]}]}]}],
     "pixel size"),
])
def test_malformed_ome_zarr_metadata_gives_one_sentence(tmp_path, tiny_model, capsys, multiscales, message):
    source = write_volume(tmp_path / "in.zarr", np.zeros((2, 32, 32), np.float32), (1, 32, 32), scale=(1, 1, 1))
    root = zarr.open_group(str(source), mode="r+")
    root.attrs["multiscales"] = multiscales
    refused(capsys, "denoise", source, "-o", tmp_path / "out.zarr", "--model", tiny_model, *FAST, says=message)
    refused(capsys, "isotropic", source, "-o", tmp_path / "out.zarr", "--model", tiny_model, *FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_zero_or_infinite_voxel_sizes_in_a_tiff_give_one_sentence(tmp_path, tiny_isotropic, capsys):
    path = tmp_path / "sections.tif"
    tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint8), imagej=True, resolution=(1 / 4, 1 / 4),
                     metadata={"unit": "nm", "spacing": float("inf")})
    refused(capsys, "isotropic", path, "-o", tmp_path / "o.tif", "--model", tiny_isotropic, *FAST, says="pixel size")


def test_a_corrupt_chunk_gives_one_sentence_and_leaves_nothing(tmp_path, tiny_model, capsys):
    source = write_volume(tmp_path / "in.zarr", np.random.default_rng(0).random((3, 32, 32)).astype(np.float32),
                          (1, 32, 32))
    chunk = next(p for p in (source / "c").rglob("*") if p.is_file() and p.parts[-3] == "2")
    chunk.write_bytes(b"\x00garbage" * 10)
    out = tmp_path / "out.zarr"
    refused(capsys, "denoise", source, "-o", out, "--model", tiny_model, *FAST, "--chunk", "1,32,32",
            says="could not be read")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_a_full_disk_gives_one_sentence_and_leaves_nothing(tmp_path, image_tif, tiny_model, capsys, monkeypatch):
    from napari_emdiffuse.core import chunked

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tifffile, "imwrite", full)
    refused(capsys, "denoise", image_tif, "-o", tmp_path / "out.tif", "--uncertainty", tmp_path / "unc.tif",
            "--model", tiny_model, *FAST, says="No space left on device")
    monkeypatch.setattr(chunked, "uncertainty_histogram", full)  # fails while a chunk is written
    refused(capsys, "denoise", image_tif, "-o", tmp_path / "out.zarr", "--model", tiny_model, *FAST,
            says="No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_a_batch_refused_before_work_leaves_no_folder(tmp_path, image_tif, tiny_model, capsys):
    second = tmp_path / "b.tif"
    shutil.copy(image_tif, second)
    refused(capsys, "denoise", image_tif, second, "-o", tmp_path / "made", "--model", tiny_model, "--eta", "nan")
    broken = tmp_path / "c.tif"
    tifffile.imwrite(broken, np.full((9, 9), np.nan, np.float32))
    code, _ = run_cli(capsys, "denoise", broken, "-o", tmp_path / "made", "--model", tiny_model, *FAST)
    assert code == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["b.tif", "c.tif", "in.tif"]


# The property: any combination of numbers and small inputs ends finite and right (exit 0) or refused (exit 2)

def test_any_numbers_give_a_finite_result_or_one_refusal(tmp_path_factory, tiny_model):
    import contextlib
    import io

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    anything = st.one_of(st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True, width=32))
    outcomes = {0: 0, 2: 0}

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(shape=st.one_of(st.tuples(st.integers(1, 40), st.integers(1, 40)),
                           st.tuples(st.integers(1, 3), st.integers(5, 24), st.integers(5, 24))),
           dtype=st.sampled_from(["uint8", "uint16", "float32"]),
           samples=st.sampled_from(["1", "2", "3", "0", "-1", "65"]), steps=st.sampled_from(["1", "2", "0", "1001"]),
           eta=st.one_of(st.floats(0, 1), anything), threshold=st.one_of(st.floats(0.001, 1), anything),
           tile=st.sampled_from(["32", "48", "31", "0", "9000"]), route=st.sampled_from(["tif", "zarr"]))
    def check(shape, dtype, samples, steps, eta, threshold, tile, route):
        folder = tmp_path_factory.mktemp("prop")
        source = folder / "in.tif"
        data = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
        tifffile.imwrite(source, data, photometric="minisblack")  # a stack of 3 planes, not an RGB image
        out = folder / ("out.tif" if route == "tif" else "out.zarr")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["denoise", str(source), "-o", str(out), "--model", tiny_model, "--samples", samples,
                         "--steps", steps, "--eta", str(eta), "--threshold", str(threshold), "--tile", tile,
                         "--quiet"])
        lines = err.getvalue().strip().splitlines()
        if code == 0:
            result = read_tiff(out).data if route == "tif" else zarr.open_group(str(out), mode="r")["0"][...]
            expected = read_tiff(source).data  # as read: a stack of one plane is one image
            assert result.shape == expected.shape and result.dtype == data.dtype
            assert np.isfinite(result.astype(np.float64)).all()
        else:
            assert code == 2 and len(lines) == 1, lines
            assert sorted(p.name for p in folder.iterdir()) == ["in.tif"]
        outcomes[code] += 1

    check()
    assert outcomes[0] and outcomes[2], outcomes  # both ends were reached
