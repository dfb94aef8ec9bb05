"""csrc/cuda/kernels.cu built against a CUDA-on-CPU shim, driven by the real cuda backend (tests only).

builder.py compiles the kernels with g++ against the shim (shim.h, shim_half.h, runtime.cpp);
emulation.py loads the result with ctypes and routes fusedclip's ``cuda`` backend to it for CPU
tensors. tests/conftest.py adds a ``cpu-cuda`` case to every backend-parametrised test with it.
"""

from __future__ import annotations

from pathlib import Path

from .builder import BuildError, build, compiler

_loaded: dict[Path, object] = {}


def load(path: str | Path | None = None):
    """The ShimLibrary of ``path`` (default: a build of the current kernels.cu), loaded once."""
    from .emulation import ShimLibrary

    path = Path(path) if path is not None else build()
    if path not in _loaded:
        _loaded[path] = ShimLibrary(path)
    return _loaded[path]


__all__ = ["BuildError", "build", "compiler", "load"]
