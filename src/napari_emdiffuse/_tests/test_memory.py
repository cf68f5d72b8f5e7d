import numpy as np
import pytest
import torch

from napari_emdiffuse.core import memory
from napari_emdiffuse.core.tasks import Settings, denoise, drive
from napari_emdiffuse.core.tiling import TiledDenoiser

CPU = torch.device("cpu")


def test_tiles_shrink_to_fit_the_free_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 200 * 2**20)
    tile, batch, note = memory.fit_to_memory(1024, 1024, 2, 1024, 4, CPU, 16)
    assert (tile, batch) != (1024, 4) and "reduced" in note
    assert memory.estimate_bytes(1024, 1024, 2, tile, batch) <= 0.7 * 200 * 2**20


def test_impossible_runs_are_refused_before_they_start(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * 2**20)
    with pytest.raises(MemoryError, match="smaller region"):
        memory.fit_to_memory(20000, 20000, 2, 256, 2, CPU, 16)


def test_a_denoise_run_reports_the_smaller_tiles(monkeypatch, tiny_model, em_pair):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 12 * 2**20)
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
