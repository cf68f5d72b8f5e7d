import numpy as np
import pytest
import torch

from napari_emdiffuse.core import memory
from napari_emdiffuse.core.isotropic import isotropic
from napari_emdiffuse.core.tasks import Settings, denoise, drive, superres
from napari_emdiffuse.core.tiling import TiledDenoiser

CPU = torch.device("cpu")


def test_tiles_shrink_to_fit_the_free_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 200 * 2**20)
    tile, batch, note = memory.fit_to_memory(1024, 1024, 2, 1024, 4, CPU, 16)
    assert (tile, batch) != (1024, 4) and "reduced" in note
    assert memory.estimate_bytes(1024, 1024, 2, tile, batch) <= 0.7 * 200 * 2**20


def test_impossible_runs_are_refused_before_they_start(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 10 * 2**20)
    with pytest.raises(MemoryError, match="smaller region"):
        memory.fit_to_memory(20000, 20000, 2, 256, 2, CPU, 16)


def test_a_denoise_run_reports_the_smaller_tiles(monkeypatch, tiny_model, em_pair):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 12 * 2**20)
    result = drive(denoise(em_pair[1], tiny_model, Settings(tile=256, steps=1)))
    assert result.info["tile"] < 256 and any("reduced" in n for n in result.info["notes"])


class RunsOutOfMemory(torch.nn.Module):
    """Fails like a GPU would for evaluations larger than ``limit`` pixels."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.failures = limit, 0

    def forward(self, x, cond, c_noise, label=None):
        if x.numel() > self.limit:
            self.failures += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return cond * 0.5, None


def test_out_of_memory_during_a_run_is_retried_with_smaller_tiles():
    class Cfg:
        multiple = 16

    net = RunsOutOfMemory(limit=70 * 70)
    net.config = Cfg()
    cond = torch.rand(1, 1, 200, 200)
    x = torch.rand(2, 1, 200, 200)
    denoiser = TiledDenoiser(net, cond, 256, 16, 4, CPU)
    out = drive(denoiser(x, 0.5))
    assert net.failures >= 2 and denoiser.tile <= 64 and denoiser.batch == 1
    assert denoiser.notes and out.shape == x.shape and torch.isfinite(out).all()


def test_other_errors_are_not_mistaken_for_memory():
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        drive(TiledDenoiser(Broken(), torch.rand(1, 1, 64, 64), 64, 0, 1, CPU)(torch.rand(1, 1, 64, 64), 0.5))


def test_fifty_runs_keep_memory_flat(tiny_model):
    import gc

    psutil = pytest.importorskip("psutil")
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    settings = Settings(steps=1)
    proc = psutil.Process()
    for _ in range(10):  # warm-up: allocator pools, caches
        drive(denoise(image, tiny_model, settings))
    gc.collect()
    before = proc.memory_info().rss
    for _ in range(50):
        drive(denoise(image, tiny_model, settings))
    gc.collect()
    assert proc.memory_info().rss < before * 1.10


def test_a_result_too_big_for_the_free_memory_is_refused_before_any_work(monkeypatch, tiny_model, em_pair):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 2 * 2**20)
    monkeypatch.setattr(memory, "estimate_bytes", lambda *args: 0)  # the tiles fit: only the result is at stake
    stack = np.stack([em_pair[1]] * 8)  # 8 x 128 x 160: 160 kB in, 0.8 MB out with its uncertainty, 1.5 MB scored
    progress = []
    with pytest.raises(MemoryError, match="Zarr file"):
        drive(denoise(stack, tiny_model, Settings(steps=1)), progress.append)
    assert progress == []
    drive(denoise(stack[:2], tiny_model, Settings(steps=1)))  # a smaller region fits


def test_x4_in_two_steps_checks_both_results_before_the_first_step(monkeypatch, tiny_superres_x2, em_pair):
    image = em_pair[1][:64, :64]
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 0.5 * 2**20)  # x2 result 0.2 MB, x4 0.6
    monkeypatch.setattr(memory, "estimate_bytes", lambda *args: 0)
    progress = []
    with pytest.raises(MemoryError, match="current view"):
        drive(superres(image, tiny_superres_x2, Settings(steps=1), scale=4), progress.append)
    assert progress == []


@pytest.mark.parametrize("job", ["denoise", "superres", "isotropic"])
def test_a_stack_result_is_held_once(job, tiny_model, tiny_superres_x2, tiny_isotropic, em_pair):
    """Planes go straight into the result in the input's dtype: 8-bit output + float32 uncertainty is 5 bytes per
    voxel, scoring the map needs one copy of it; per-plane lists stacked at the end had needed about 40."""
    import tracemalloc

    stack = np.stack([np.roll(em_pair[1], 5 * z, axis=1) for z in range(12)])
    run = {"denoise": lambda: denoise(stack, tiny_model, Settings(steps=1)),
           "superres": lambda: superres(stack, tiny_superres_x2, Settings(steps=1), scale=2),
           "isotropic": lambda: isotropic(stack, tiny_isotropic, Settings(steps=1), factor=4)}[job]
    drive(run())  # warm-up
    tracemalloc.start()
    try:
        result = drive(run())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.image.dtype == np.uint8 and result.uncertainty.dtype == np.float32
    assert peak < 12 * result.image.size + 4 * 2**20
