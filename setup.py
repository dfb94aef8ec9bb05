"""Build entry point: the Python package plus the compiled extension ``fusedclip._C``.

The extension's C++ sees only raw addresses, element counts, dtype codes and a stream handle, so it
needs no torch headers: building needs no torch, and one build serves any torch version.

Switches (environment variables):
  FUSEDCLIP_BUILD_EXT=0     skip the extension (the package still imports and runs on torch/triton)
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def get_extensions() -> list:
    if os.environ.get("FUSEDCLIP_BUILD_EXT", "1") == "0":
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    if not sources:
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [Pybind11Extension("fusedclip._C", sources, include_dirs=["csrc"], cxx_std=17)]


setup(ext_modules=get_extensions())
