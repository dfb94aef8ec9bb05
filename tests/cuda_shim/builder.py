"""Builds ``csrc/cuda/kernels.cu`` as host C++ against the CUDA-on-CPU shim (tests only).

One g++ call compiles the kernels (a snapshot of their text: the file itself or a mutant of it),
the shim's runtime and the C entry points into one shared library, cached under
``tests/.cuda_shim_build/<hash>/`` where the hash covers every source, header and flag, so an
unchanged tree reuses its build and any edit rebuilds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

SHIM = Path(__file__).resolve().parent
ROOT = SHIM.parents[1]
CSRC = ROOT / "csrc"
KERNELS = CSRC / "cuda" / "kernels.cu"
CACHE = ROOT / "tests" / ".cuda_shim_build"
#: builds kept in the cache (the newest by use); older ones are removed
KEEP_BUILDS = 40

SHIM_SOURCES = ("shim.h", "shim_half.h", "include/cuda_runtime.h", "include/cuda_fp16.h", "include/cuda_bf16.h")
SHIM_UNITS = ("runtime.cpp", "entry.cpp")
KERNEL_HEADERS = (CSRC / "fusedclip.h", CSRC / "cuda" / "cuda_ops.h")

#: sanitizer flavours: (compile flags, link flags)
SANITIZERS = {
    "": ([], []),
    # a misaligned access aborts with UBSan's report (a misaligned vector access faults on a GPU)
    "alignment": (["-fsanitize=alignment", "-fno-sanitize-recover=alignment"], ["-fsanitize=alignment"]),
    # needs the ASan runtime preloaded into Python (see asan_runtime())
    "address,undefined": (
        ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"],
        ["-fsanitize=address,undefined"],
    ),
}


class BuildError(RuntimeError):
    """kernels.cu (or the shim) does not compile as host C++."""


def compiler() -> str | None:
    """The C++ compiler to use (CXX, else g++), or None when there is none."""
    name = os.environ.get("CXX") or "g++"
    return shutil.which(name)


def asan_runtime() -> str | None:
    """Path of the compiler's ASan runtime (to LD_PRELOAD into a Python that loads an ASan build)."""
    cxx = compiler()
    if cxx is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if path and os.path.isabs(path) and os.path.exists(path) else None


def _flags(sanitize: str, optimize: str) -> tuple[list[str], list[str]]:
    compile_extra, link_extra = SANITIZERS[sanitize]
    compile_flags = [
        "-std=c++17",
        optimize,
        "-fPIC",
        "-pthread",
        "-fvisibility=hidden",
        "-ffp-contract=off",
        "-Wall",
        "-Wno-unknown-pragmas",  # #pragma unroll
        "-Wno-unused-function",
        *compile_extra,
    ]
    return compile_flags, ["-shared", "-pthread", *link_extra]


def build(
    kernels: str | None = None,
    *,
    sanitize: str = "",
    optimize: str = "-O1",
    label: str = "",
    units: tuple[str, ...] = SHIM_UNITS,
) -> Path:
    """Compile ``kernels`` (default: the text of csrc/cuda/kernels.cu now) and return the library's path.

    ``units``: the shim's C++ files linked in (the self-test kernels need no entry.cpp).
    """
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler (set CXX or install g++)")
    text = KERNELS.read_text() if kernels is None else kernels
    compile_flags, link_flags = _flags(sanitize, optimize)
    digest = hashlib.sha256()
    for part in (text, cxx, *compile_flags, *link_flags, *units):
        digest.update(part.encode() + b"\0")
    for path in [*(SHIM / s for s in SHIM_SOURCES + units), *KERNEL_HEADERS]:
        digest.update(path.read_bytes() + b"\0")
    key = digest.hexdigest()[:20] + (f"-{label}" if label else "")
    out_dir = CACHE / key
    library = out_dir / "libcuda_shim.so"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per key, also across processes
        if not library.exists():
            out_dir.mkdir(exist_ok=True)
            source = out_dir / "kernels.cu"  # the snapshot that is compiled (the file may be edited meanwhile)
            source.write_text(text)
            temporary = out_dir / f"libcuda_shim.{os.getpid()}.tmp"
            command = [
                cxx,
                *compile_flags,
                f"-I{SHIM / 'include'}",
                f"-I{SHIM}",
                f"-I{CSRC / 'cuda'}",  # kernels.cu's "../fusedclip.h" and "cuda_ops.h" resolve from here
                f"-I{CSRC}",
                "-x",
                "c++",
                str(source),
                "-x",
                "none",
                *(str(SHIM / unit) for unit in units),
                "-o",
                str(temporary),
                *link_flags,
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise BuildError(
                    f"building the kernels against the CUDA-on-CPU shim failed ({source} is the compiled"
                    f" snapshot):\n{' '.join(command)}\n{result.stderr[-8000:]}"
                )
            os.replace(temporary, library)
    os.utime(out_dir)
    _prune()
    return library


def _prune() -> None:
    """Keep the newest KEEP_BUILDS builds."""
    try:
        builds = sorted((p for p in CACHE.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    cutoff = time.time() - 3600  # never remove what another process may be using right now
    for old in builds[KEEP_BUILDS:]:
        try:
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
                (CACHE / f"{old.name}.lock").unlink(missing_ok=True)
        except OSError:
            pass
