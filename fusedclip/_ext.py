"""The compiled extension ``fusedclip._C``, loaded once, and why it cannot be used when it cannot.

``import fusedclip`` never needs the extension: the ``cpu`` and ``cuda`` backends ask here, and
``available_backends()`` shows the reason this module records.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
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

#: the oldest NVIDIA driver series that runs each CUDA major version's runtime
MIN_DRIVER_SERIES = {11: "450", 12: "525", 13: "580"}


def _read_build_record() -> dict[str, Any]:
    """setup.py's record of how the loaded extension was built (fusedclip/_C_build.json), or {} when
    there is none or it belongs to another build of the extension (its size or mtime differ)."""
    if C is None or not getattr(C, "__file__", None):
        return {}
    try:
        record = json.loads(Path(C.__file__).with_name("_C_build.json").read_text())
        stat = os.stat(C.__file__)
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    # copying the extension in place keeps its mtime only to the second
    mtime = record.get("extension_mtime")
    if record.get("extension_size") != stat.st_size or not isinstance(mtime, (int, float)):
        return {}
    if abs(mtime - stat.st_mtime) > 2.0:
        return {}
    return record


BUILD_RECORD: dict[str, Any] = _read_build_record()


def missing_reason() -> str | None:
    """Why ``fusedclip._C`` cannot be imported, or None when it is loaded."""
    return MISSING_REASON


def cuda_build_reason() -> str | None:
    """Why the extension has no CUDA kernels, or None when it has them."""
    if C is None:
        return MISSING_REASON
    if not BUILD_INFO.get("has_cuda"):
        why = BUILD_RECORD.get("cuda_skipped") or "nvcc was not found or failed at build time, or FUSEDCLIP_CUDA=0"
        return (
            f"fusedclip._C was built without CUDA kernels ({why}); rebuild with nvcc on PATH or CUDA_HOME set,"
            " and FUSEDCLIP_CUDA=1 to make a failed CUDA build an error"
        )
    return None


def _version_text(version: int) -> str:
    """12040 -> '12.4' (the CUDA API's encoding: 1000 * major + 10 * minor)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_cuda_version() -> str | None:
    """The CUDA version the installed NVIDIA driver supports ('12.4'), read from libcuda with
    cuDriverGetVersion (no context is created); None when there is no driver library."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll", "libcuda.dylib"):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            status = library.cuDriverGetVersion(ctypes.byref(version))
        except AttributeError:
            return None
        return _version_text(version.value) if status == 0 and version.value > 0 else None
    return None


def _major(version: str | None) -> int | None:
    head = (version or "").split(".")[0]
    return int(head) if head.isdigit() else None


def explain_cuda_runtime_failure(
    error: str | None, toolkit: str | None, driver: str | None, torch_cuda: str | None, torch_version: str
) -> str:
    """Why the CUDA runtime linked into fusedclip._C sees no device although torch sees one.

    ``error``: the runtime's message from cudaGetDeviceCount; ``toolkit``: the CUDA version the
    extension was built with (its statically linked runtime), None if unknown; ``driver``: the CUDA
    version the driver supports; ``torch_cuda``: torch.version.cuda."""
    text = (error or "").lower()
    too_old = "insufficient" in text or "driver version" in text
    if not too_old and toolkit and driver:
        too_old = _major(toolkit) is not None and _major(driver) is not None and _major(driver) < _major(toolkit)
    if too_old:
        built = f"the CUDA {toolkit} runtime" if toolkit else "a CUDA runtime newer than this driver"
        series = MIN_DRIVER_SERIES.get(_major(toolkit) or -1)
        needs = f"an NVIDIA driver of the {series} series or newer" if series else "a newer NVIDIA driver"
        have = f"this driver supports CUDA {driver}" if driver else "this driver is older"
        fix = (
            f"rebuild fusedclip._C with a CUDA {_major(torch_cuda)}.x toolkit to match torch"
            f" (CUDA_HOME=/usr/local/cuda-{_major(torch_cuda)}.x pip install --no-build-isolation -e .)"
            if torch_cuda
            else "rebuild fusedclip._C with a CUDA toolkit this driver supports"
        )
        return (
            f"the driver is too old for fusedclip._C: it links {built} statically, which needs {needs}; {have}"
            f" (torch {torch_version}, built for CUDA {torch_cuda}, runs on it). Update the driver or {fix};"
            f" the triton and torch backends run meanwhile [runtime: {error or 'no error text'}]"
        )
    return (
        f"the CUDA runtime linked into fusedclip._C (CUDA {toolkit or 'version unknown'}) sees no device although"
        f" torch does (driver: CUDA {driver or 'unknown'}; torch {torch_version}, CUDA {torch_cuda}):"
        f" {error or 'no devices'}"
    )


def cuda_unavailable_reason() -> str | None:
    """Why the ``cuda`` backend cannot run in this process, or None when it can: the extension is
    missing or was built without CUDA, torch has no CUDA build or sees no device, or the runtime
    linked into the extension cannot use the driver (too old for the toolkit it was built with).
    Whether the compiled architectures fit a given GPU is :func:`arch_reason`."""
    reason = cuda_build_reason()
    if reason is not None:
        return reason
    import torch

    if getattr(torch.version, "hip", None):
        return f"torch {torch.__version__} is a ROCm build; the cuda backend needs an NVIDIA GPU and torch's CUDA build"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): install torch's CUDA build"
    if not torch.cuda.is_available():
        driver = driver_cuda_version()
        if driver is None:
            return f"torch sees no CUDA device: no NVIDIA driver was found (libcuda.so.1 cannot be loaded)"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        return f"torch sees no CUDA device (the driver supports CUDA {driver}; torch is built for CUDA {torch.version.cuda}{hidden})"
    count, error = C.cuda_device_count()  # type: ignore[union-attr]
    if count == 0:
        return explain_cuda_runtime_failure(
            error, BUILD_RECORD.get("cuda_toolkit"), driver_cuda_version(), torch.version.cuda, torch.__version__
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


def arch_reason(major: int, minor: int) -> str | None:
    """Why the compiled kernels cannot run on a GPU of this compute capability, or None."""
    if runs_on_capability(major, minor):
        return None
    return (
        f"fusedclip._C was compiled for CUDA architectures {BUILD_INFO.get('cuda_archs')}, which cannot run on this"
        f" GPU (compute capability {major}.{minor}); rebuild with FUSEDCLIP_CUDA_ARCHS including {major}{minor}"
    )


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
