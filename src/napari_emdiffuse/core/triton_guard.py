"""Keep ``triton`` out of a process whose OpenGL is drawn with Mesa's LLVM, where loading it would crash napari.

PyPI's default torch on Linux ships ``triton``, which carries its own copy of LLVM. Loading it into a process where
Mesa has already loaded LLVM (napari's canvas drawn by llvmpipe: remote desktops, virtual machines, Xvfb; also
AMD's radeonsi driver) ends the process with a segmentation fault: the window vanishes with every unsaved layer.
torch imports ``triton`` the first time anything touches ``torch._dynamo``, which building an optimiser does
(``torch.optim.AdamW`` -> ``torch._dynamo`` -> ``triton``). Importing it before any OpenGL context exists is safe,
but a plugin's code runs after napari has drawn its window, so where Mesa's LLVM is loaded and ``triton`` is not,
``import triton`` is made to fail instead: torch then takes its paths without it. Nothing here needs ``triton``
(the networks are never compiled); only ``torch.compile`` for GPUs loses it, in this process alone.
"""

from __future__ import annotations

import sys

# Mesa's shared LLVM, and the drivers that link it into the process (older Mesa: *_dri.so; Mesa 24+: libgallium)
MESA_LLVM_LIBRARIES = ("libLLVM", "libgallium", "_dri.so")


def mesa_llvm_loaded(maps: str = "/proc/self/maps") -> bool:
    """Whether a library of Mesa's that carries LLVM is mapped into this process (Linux; False elsewhere)."""
    try:
        with open(maps) as f:
            mapped = f.read()
    except OSError:  # no /proc: macOS and Windows, where PyPI's torch has no triton either
        return False
    return any(name in mapped for name in MESA_LLVM_LIBRARIES)


def keep_triton_out() -> bool:
    """Make ``import triton`` fail in this process if loading it now would crash it; True when it is kept out.

    Called before any torch work that may import ``torch._dynamo`` (training, every job's device choice).
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is None  # kept out already, or loaded safely before any OpenGL context
    if not mesa_llvm_loaded():
        return False
    sys.modules["triton"] = None  # the import system's own marker: `import triton` raises ImportError
    return True
