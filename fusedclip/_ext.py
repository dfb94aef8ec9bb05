"""The compiled extension ``fusedclip._C``, loaded once, and why it cannot be used when it cannot.

``import fusedclip`` never needs the extension: the ``cpu`` and ``cuda`` backends ask here, and
``available_backends()`` shows the reason this module records.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

_BUILD_HINT = (
    "build it with `pip install -e .` (needs a C++17 compiler; nvcc for the CUDA kernels) or"
    " `python setup.py build_ext --inplace`"
)

C: ModuleType | None
MISSING_REASON: str | None
try:
    from . import _C as C

    MISSING_REASON = None
except (ImportError, OSError) as error:  # not built, or built for another Python / platform
    C = None
    MISSING_REASON = f"the compiled extension fusedclip._C is not available ({type(error).__name__}: {error}); {_BUILD_HINT}"

BUILD_INFO: dict[str, Any] = C.build_info() if C is not None else {}


def missing_reason() -> str | None:
    """Why ``fusedclip._C`` cannot be imported, or None when it is loaded."""
    return MISSING_REASON


def cuda_build_reason() -> str | None:
    """Why the extension has no CUDA kernels, or None when it has them."""
    if C is None:
        return MISSING_REASON
    if not BUILD_INFO.get("has_cuda"):
        return (
            "fusedclip._C was built without CUDA kernels (nvcc was not found or failed at build time, or"
            " FUSEDCLIP_CUDA=0); rebuild with nvcc on PATH or CUDA_HOME set"
        )
    return None


def cuda_archs() -> list[tuple[int, bool]]:
    """The GPU architectures compiled in, as (compute capability * 10, with PTX)."""
    archs = []
    for token in str(BUILD_INFO.get("cuda_archs", "")).split(";"):
        if token:
            ptx = token.endswith("+PTX")
            archs.append((int(token[:-4] if ptx else token), ptx))
    return archs


def runs_on_capability(major: int, minor: int) -> bool:
    """True when a GPU of this compute capability can run the compiled kernels.

    Machine code for sm_XY runs on X.Y and later minor versions of the same major version; PTX for
    compute_XY is compiled by the driver for X.Y and every later GPU.
    """
    capability = major * 10 + minor
    for arch, ptx in cuda_archs():
        if arch // 10 == major and arch <= capability:
            return True
        if ptx and arch <= capability:
            return True
    return False
