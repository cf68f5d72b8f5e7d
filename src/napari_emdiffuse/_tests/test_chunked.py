"""Chunked (out-of-core) restoration: chunk borders are invisible, outputs are OME-Zarr, runs resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_emdiffuse._tests.standards import assert_valid_ome_zarr
from napari_emdiffuse.core.chunked import ChunkedTask, fit_normalizer, plan_blocks, restore_volume
from napari_emdiffuse.core.isotropic import isotropic
from napari_emdiffuse.core.normalize import InputError
from napari_emdiffuse.core.tasks import Settings, denoise, drive, superres, uncertainty_score
from napari_emdiffuse.core.tiling import NoiseField, tile_starts
from napari_emdiffuse.core.zarr_io import open_volume

zarr = pytest.importorskip("zarr")

# Measured: with one tile of halo the tiny model's chunked result equals the in-memory one to float rounding
# (max 2e-7 in normalised units); chunk borders would show as differences of 1e-2 and more.
# (max 2e-7 in normalised units); chunk borders would show as differences of 1e-2 and more. In float32: bfloat16
# convolutions round differently for different batch compositions (4e-5), which would blur that distinction.
TOLERANCE = 1e-5
SETTINGS = Settings(samples=2, seed=3, tile=32, overlap=8, precision="float32")


def write_zarr(path, data, chunks, scale_um=None):
    """A plain Zarr array, or an OME-Zarr 0.4-style group with pixel sizes in micrometres."""
    if scale_um is None:
        zarr.create_array(str(path), data=data, chunks=chunks)
        return str(path)
    root = zarr.open_group(str(path), mode="w")
    root.create_array("s0", data=data, chunks=chunks)
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"[-data.ndim:]]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": list(scale_um)}]}]}]
    return str(path)


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(3, 70, 90)), axis=2)
    return (smooth - smooth.min() + rng.normal(scale=2, size=smooth.shape)).astype(np.float32)


def max_difference(chunked, whole, norm):
    return float(np.abs(chunked.astype(np.float64) - whole).max() / (norm.high - norm.low))


def test_noise_is_a_function_of_the_position_in_the_full_plane():
    whole = NoiseField(7, 2, 150, 130)
    window = NoiseField(7, 2, 70, 50, origin=(61, 33))
    for _ in range(2):  # every sampling step draws a new field, consistently
        a, b = whole(), window()
        assert torch.equal(a[..., 61:131, 33:83], b)
    assert not torch.equal(NoiseField(8, 2, 150, 130)(), NoiseField(7, 2, 150, 130)())


def test_tiles_of_a_window_sit_where_the_full_image_has_them():
    full = tile_starts(1000, 256, 32)
    window = tile_starts(500, 256, 32, origin=300)
    assert {s + 300 for s in window[1:-1]} <= set(full)  # inner tiles: the full image's own
    assert window[0] == 0 and window[-1] == 500 - 256


@pytest.mark.parametrize("factor", [3, 2.5, 12.5, 5.6])
def test_blocks_cover_the_output_once(factor):
    task = ChunkedTask("isotropic", factor)
    blocks = plan_blocks((6, 50, 41), task, (2, 20, 16), halo=8, align=4)
    covered = np.zeros(task.output_shape((6, 50, 41)), int)
    for b in blocks:
        covered[b.write] += 1
        assert b.read[1].start % 4 == 0 and b.read[2].start % 4 == 0
        assert 0 <= task.plane_offset(b) < 1  # the block's first plane lies in its first gap
    assert (covered == 1).all()


def test_chunked_denoise_equals_in_memory_and_writes_ome_zarr(tmp_path, tiny_model, volume):
    source = write_zarr(tmp_path / "in.zarr", volume, (1, 32, 32), scale_um=(0.05, 0.01, 0.01))
    norm = fit_normalizer(open_volume(source).data)
    whole = drive(denoise(volume, tiny_model, SETTINGS, norm=norm))
    progress = []
    info = drive(restore_volume(source, tmp_path / "out.zarr", ChunkedTask("denoise"), tiny_model, SETTINGS,
                                chunk=(1, 24, 40)), progress.append)
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert max_difference(out["0"][...], whole.image, norm) < TOLERANCE
    assert np.abs(out["uncertainty/0"][...] - whole.uncertainty).max() < TOLERANCE
    assert info["uncertainty_score"] == pytest.approx(uncertainty_score(whole.uncertainty), abs=2e-4)
    assert progress[-1].done == progress[-1].total == info["chunks"] == 3 * 3 * 3
    for path in (tmp_path / "out.zarr", tmp_path / "out.zarr" / "uncertainty"):  # pixel sizes, read back in nm
        assert open_volume(path).scale == pytest.approx((50, 10, 10))
    assert_valid_ome_zarr(tmp_path / "out.zarr", unit="nanometer")  # the input's micrometres, in nm
    assert out.attrs["emdiffuse"]["result"]["uncertainty_score"] == info["uncertainty_score"]


def test_chunked_superres_and_isotropic_equal_in_memory(tmp_path, tiny_superres, tiny_superres_x2, tiny_isotropic,
                                                       volume):
    source = write_zarr(tmp_path / "in.zarr", volume[:, :40, :44], (1, 16, 16))
    norm = fit_normalizer(open_volume(source).data)
    for task, model, job in ((ChunkedTask("superres", 2), tiny_superres, lambda v: superres(v, tiny_superres,
                              SETTINGS, scale=2, norm=norm)),
                             (ChunkedTask("superres", 4), tiny_superres_x2, lambda v: superres(  # two x2 steps
                                 v, tiny_superres_x2, SETTINGS, scale=4, norm=norm)),
                             (ChunkedTask("isotropic", 2), tiny_isotropic, lambda v: isotropic(v, tiny_isotropic,
                              SETTINGS, factor=2, norm=norm)),
                             (ChunkedTask("isotropic", 2.5, 5), tiny_isotropic, lambda v: isotropic(  # not whole
                                 v, tiny_isotropic, SETTINGS, factor=2.5, gap=5, norm=norm))):
        whole = drive(job(volume[:, :40, :44]))
        output = tmp_path / f"{task.name}{task.factor}.zarr"
        drive(restore_volume(source, output, task, model, SETTINGS, chunk=(1, 20, 24)))
        image = zarr.open_group(str(output), mode="r")["0"][...]
        assert image.shape == whole.image.shape
        assert max_difference(image, whole.image, norm) < TOLERANCE, task


def test_every_store_validates_as_ome_zarr_with_or_without_units(tmp_path, tiny_superres, volume):
    """2D and 3D, every map (the difficulty map too), units only where the input had them."""
    settings = Settings(samples=2, tile=32, overlap=8, steps=1, difficulty=True)
    maps = ("image", "uncertainty", "difficulty")
    for source, unit in ((write_zarr(tmp_path / "um.zarr", volume[:, :32, :40], (1, 16, 16), scale_um=(0.05, 0.01,
                                                                                                        0.01)),
                          "nanometer"),
                         (write_zarr(tmp_path / "plain.zarr", volume[0, :32, :40], (16, 16)), None)):
        output = tmp_path / f"out-{Path(source).stem}.zarr"
        drive(restore_volume(source, output, ChunkedTask("superres", 2), tiny_superres, settings, chunk=(1, 16, 16)))
        assert_valid_ome_zarr(output, maps, unit)
        assert open_volume(output).scale == pytest.approx((50, 5, 5) if unit else (0.5, 0.5))


def test_a_memory_mapped_tiff_is_processed_in_chunks(tmp_path, tiny_model, volume, monkeypatch):
    from napari_emdiffuse.core import io

    monkeypatch.setattr(io, "MEMMAP_ABOVE_BYTES", 0)
    assert isinstance(io.read_tiff(io.write_tiff(tmp_path / "in.tif", volume, (40.0, 4.0, 4.0))).data, np.memmap)
    info = drive(restore_volume(tmp_path / "in.tif", tmp_path / "out.zarr", ChunkedTask("denoise"), tiny_model,
                                Settings(samples=1, tile=32, overlap=8), chunk=(2, 40, 40)))
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert out["0"].shape == volume.shape
    assert "uncertainty" in out and info["reliable"] is not None  # one sample: the model's predicted spread
    assert open_volume(tmp_path / "out.zarr").scale == pytest.approx((40.0, 4.0, 4.0))


def test_an_unfinished_run_resumes_and_another_run_is_refused(tmp_path, tiny_model, volume):
    source = write_zarr(tmp_path / "in.zarr", volume, (1, 35, 45))
    output = tmp_path / "out.zarr"
    run = lambda settings=SETTINGS: restore_volume(source, output, ChunkedTask("denoise"), tiny_model,  # noqa: E731
                                                   settings, chunk=(1, 35, 45))
    reference = drive(run())
    expected = zarr.open_group(str(output), mode="r")["0"][...]
    done = zarr.open_array(str(output / "run" / "done"), mode="r+")
    done[1:] = 0  # as if the run had been killed after the first plane
    info = drive(run())
    assert info["resumed_chunks"] == 4 and info["notes"][0].startswith("resumed: 4 of 12")
    assert np.array_equal(zarr.open_group(str(output), mode="r")["0"][...], expected)
    assert info["uncertainty_score"] == reference["uncertainty_score"]
    with pytest.raises(InputError, match="exists"):
        drive(run(Settings(samples=2, seed=4, tile=32, overlap=8)))


def test_an_in_memory_array_needs_the_threads_scheduler(tmp_path, tiny_model, volume):
    with pytest.raises(InputError, match="threads"):
        drive(restore_volume(volume, tmp_path / "o.zarr", ChunkedTask("denoise"), tiny_model, scheduler="local"))


@pytest.mark.slow
def test_local_cluster_of_two_processes_matches_in_memory_and_a_killed_run_resumes(tmp_path, tiny_model, volume):
    """Two worker processes; the run is killed (SIGKILL, whole process group) half way and started again."""
    source = write_zarr(tmp_path / "in.zarr", np.concatenate([volume] * 2), (1, 16, 16))
    norm = fit_normalizer(open_volume(source).data)
    settings = Settings(samples=2, seed=3, tile=64, precision="float32")  # what the command line below asks for
    whole = drive(denoise(np.concatenate([volume] * 2), tiny_model, settings, norm=norm))
    output = tmp_path / "out.zarr"
    command = [sys.executable, "-m", "napari_emdiffuse", "denoise", source, "-o", str(output), "--model", tiny_model,
               "--seed", "3", "--tile", "64", "--precision", "float32", "--chunk", "1,24,24", "--scheduler", "local",
               "--workers", "2", "--quiet"]
    total = 6 * 3 * 4

    def done_count():
        try:
            return int(zarr.open_array(str(output / "run" / "done"), mode="r")[...].sum())
        except Exception:  # not created yet
            return 0

    killed = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while done_count() < 20 and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    first = done_count()
    assert 20 <= first < total  # killed half way
    finished = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert f"resumed: {first} of {total}" in finished.stderr
    out = zarr.open_group(str(output), mode="r")
    assert done_count() == total
    assert max_difference(out["0"][...], whole.image, norm) < TOLERANCE
    assert np.abs(out["uncertainty/0"][...] - whole.uncertainty).max() < TOLERANCE


def test_command_line_switches_to_chunks_for_zarr_and_refuses_mixed_outputs(tmp_path, tiny_isotropic, volume,
                                                                             capsys):
    from napari_emdiffuse.cli import main

    source = write_zarr(tmp_path / "in.zarr", volume[:, :32, :40].astype(np.uint8), (1, 16, 16),
                        scale_um=(0.04, 0.01, 0.01))
    common = ["--model", tiny_isotropic, "--tile", "64", "--steps", "1", "--factor", "2"]
    assert main(["isotropic", source, "-o", str(tmp_path / "iso.zarr"), "--chunk", "1,16,16", "--json",
                 *common]) == 0
    out = zarr.open_group(str(tmp_path / "iso.zarr"), mode="r")
    assert out["0"].shape == (5, 32, 40) and out["uncertainty/0"].shape == (5, 32, 40)
    assert open_volume(tmp_path / "iso.zarr").scale == pytest.approx((20.0, 10.0, 10.0))
    assert_valid_ome_zarr(tmp_path / "iso.zarr")
    assert '"uncertainty_score"' in capsys.readouterr().out
    assert main(["isotropic", source, "-o", str(tmp_path / "again.zarr"), "--chunk", "1,16,16", *common]) == 0
    assert f"napari {tmp_path / 'again.zarr'} --plugin napari-emdiffuse" in capsys.readouterr().err  # how to look
    assert main(["isotropic", source, "-o", str(tmp_path / "iso.tif"), *common]) == 2
    assert main(["isotropic", source, "-o", str(tmp_path / "b.zarr"), "--uncertainty", "u.tif", *common]) == 2
    assert "Zarr output" in capsys.readouterr().err
    for repair in (["--bad-sections", "1"], ["--align"]):  # need the stack in memory: refused before any work
        assert main(["isotropic", source, "-o", str(tmp_path / "c.zarr"), *repair, *common]) == 2
        assert "not chunk by chunk" in capsys.readouterr().err and not (tmp_path / "c.zarr").exists()


def test_the_reader_opens_a_result_store_as_a_widget_adds_it(tmp_path, tiny_model, volume):
    from napari_emdiffuse._reader import get_reader

    source = write_zarr(tmp_path / "in.zarr", volume, (1, 35, 45), scale_um=(0.05, 0.01, 0.01))
    output = str(tmp_path / "em_denoised.ome.zarr")
    info = drive(restore_volume(source, output, ChunkedTask("denoise"), tiny_model, SETTINGS, chunk=(1, 35, 45)))
    image, uncertainty = get_reader(output)(output)
    assert image[1]["name"] == "em_denoised" and uncertainty[1]["name"] == "em_denoised_uncertainty"
    assert np.array_equal(image[0][...], zarr.open_group(output, mode="r")["0"][...])
    assert image[1]["scale"] == uncertainty[1]["scale"] == pytest.approx((50, 10, 10))
    assert image[1]["metadata"]["reliable"] == info["reliable"] and image[1]["metadata"]["source"] == source
    assert uncertainty[1]["metadata"]["map"] == "uncertainty"  # never offered as an input
    assert uncertainty[1]["contrast_limits"] == (0.0, 2 * info["threshold"])
    assert uncertainty[1]["colormap"].name == "emdiffuse_uncertainty"
    root = zarr.open_group(output, mode="r+")
    root.attrs["emdiffuse"] = {"run": root.attrs["emdiffuse"]["run"]}  # as if still running on a cluster
    image, _ = get_reader(output)(output)
    assert image[1]["name"] == "em_denoised (unfinished)" and image[1]["metadata"]["unfinished"]
