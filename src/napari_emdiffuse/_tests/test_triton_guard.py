"""Training inside napari never crashes it, whatever torch is installed (PyPI's default Linux build ships triton)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_emdiffuse.core import triton_guard

HERE = Path(__file__).parent


def test_mesa_llvm_is_recognised_from_the_process_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    assert triton_guard.mesa_llvm_loaded(str(maps))
    maps.write_text("7f00 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libGLX_nvidia.so.0\n")
    assert not triton_guard.mesa_llvm_loaded(str(maps))
    assert not triton_guard.mesa_llvm_loaded(str(tmp_path / "no-proc"))  # macOS, Windows


def test_triton_is_kept_out_only_where_mesa_llvm_is_loaded_and_triton_is_not(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # whatever this test leaves, the process gets back its own
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.setattr(triton_guard, "mesa_llvm_loaded", lambda: False)
    assert not triton_guard.keep_triton_out() and "triton" not in sys.modules
    monkeypatch.setattr(triton_guard, "mesa_llvm_loaded", lambda: True)
    assert triton_guard.keep_triton_out()
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    assert triton_guard.keep_triton_out()  # and stays out
    monkeypatch.setitem(sys.modules, "triton", object())  # loaded before any OpenGL context: left alone
    assert not triton_guard.keep_triton_out()


@pytest.mark.slow
def test_training_from_the_widgets_survives_a_viewer_drawn_by_mesa_with_triton_installed(tmp_path):
    """The crash of PyPI's default torch: a viewer drawn by llvmpipe, then an optimiser, which imports triton.
    Runs where triton is installed (CI: an environment made with `pip install ".[all]"`, see .ci/run)."""
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("EMDIFFUSE_REQUIRE_TRITON"):
            pytest.fail("This environment was made to test with triton, but triton is not installed.")
        pytest.skip("triton is not installed here (the CPU build of torch)")
    from napari_emdiffuse._tests.conftest import make_tiny_model

    model = make_tiny_model(tmp_path, "denoise", "tiny")
    env = {**os.environ, "EMDIFFUSE_MODELS_DIR": str(tmp_path / "user")}
    run = subprocess.run([sys.executable, str(HERE / "training_in_a_shown_viewer.py"), model], env=env,
                         capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr[-2000:]
    assert run.returncode == 0, f"the viewer's process ended with {run.returncode}:\n{output}"
    assert "state: mesa_llvm=True triton_loaded=False" in run.stdout, output  # the case that crashed
    assert "loss points" in run.stdout and "self-supervised: True" in run.stdout and "done" in run.stdout, output
