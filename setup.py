"""Build entry point: the Python package plus the compiled extension ``fusedclip._C``.

The extension's C++ sees only raw addresses, element counts, dtype codes and a stream handle, so it
needs no torch headers: building needs no torch, and one build serves any torch version. Sources in
csrc/ are compiled by a generated build.ninja (parallel, incremental) with pybind11's headers.

Switches (environment variables):
  FUSEDCLIP_BUILD_EXT=0      skip the extension (the package still imports and runs on torch/triton)
  FUSEDCLIP_CUDA=auto|0|1    CUDA kernels: when nvcc is found (default), never, or always (fail without nvcc)
  FUSEDCLIP_CUDA_ARCHS       GPU architectures, e.g. "80;90+PTX" (the default) or "9.0"; "+PTX" on an
                             entry also embeds PTX for it, so newer GPUs can JIT-compile the kernels
  CUDA_HOME                  where to find nvcc and libcudart_static (else nvcc on PATH, /usr/local/cuda)
  CXX                        the C++ compiler (default c++)
  MAX_JOBS                   parallel compile jobs (default: ninja's choice)
  FUSEDCLIP_SANITIZE         a debugging build: "1" means "address,undefined" (AddressSanitizer and
                             UndefinedBehaviorSanitizer); any other value is a list for the compiler's
                             -fsanitize=. The C++ sources get -g -O1 -fno-omit-frame-pointer, and UB
                             aborts instead of printing. The .cu file is compiled as usual (its kernels
                             are checked by compute-sanitizer: benchmarks/sanitize_gpu.sh). Python is not
                             instrumented, so the runtime must be preloaded: benchmarks/sanitize_cpu.sh.

CPU code is portable (no -march=native): the chunk loops are compiled three times, for any x86-64 CPU,
for AVX2+FMA+F16C and for AVX-512 (F/BW/DQ/VL), and the extension picks the best one the running CPU
supports. CUDA is linked statically (cudart_static), so no libcudart is needed at run time.

Which CUDA toolkit. The CUDA runtime linked in needs a driver at least as new as the toolkit's major
version (CUDA 13: the 580 driver series or newer; CUDA 12: 525 or newer). So that the ``cuda`` backend
runs wherever the installed torch's CUDA build runs, the build uses a toolkit of torch's CUDA major
version when it can find one: torch's version is read from torch/version.py (without importing torch;
only with --no-build-isolation, where torch is visible), and besides the nvcc found as above every
/usr/local/cuda-X.Y/bin/nvcc is considered. CUDA_HOME / CUDA_PATH, when set, always win. When no toolkit
of torch's major version exists, the one found is used and a warning says what driver the result needs.
What was built (toolkit, runtime linkage, architectures, and why CUDA was left out if it was) is
written next to the extension as fusedclip/_C_build.json, which fusedclip._ext reads to explain why
the ``cuda`` backend cannot run where it cannot.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "80;90+PTX"
# ninja rules for C++ sources: (description, instruction-set flags). Only the chunk loops of one
# instruction set are compiled with its flags (csrc/cpu/isa_*.cpp); dispatch.cpp checks the CPU.
CXX_RULES = {
    "cxx": ("C++", ""),
    "cxx_avx2": ("C++ (AVX2)", "-mavx2 -mfma -mf16c"),
    # -Wno-maybe-uninitialized: GCC 12 warns inside its own avx512fintrin.h
    "cxx_avx512": (
        "C++ (AVX-512)",
        "-mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma -mf16c -Wno-maybe-uninitialized",
    ),
}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def _find_nvcc() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.exists() else None


#: the oldest driver series that runs each CUDA major version's runtime (NVIDIA's compatibility table)
MIN_DRIVER_SERIES = {11: "450", 12: "525", 13: "580"}


def _nvcc_version(nvcc: Path) -> str | None:
    """'13.0' from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88"); None if unreadable."""
    try:
        done = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", done.stdout)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _torch_cuda_version() -> str | None:
    """torch.version.cuda of the torch visible to this build, read from torch/version.py without importing
    torch; None when no torch is visible (build isolation) or it is a CPU or ROCm build."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        return _cuda_in_torch_version_py((Path(spec.origin).parent / "version.py").read_text())
    except OSError:
        return None


def _cuda_in_torch_version_py(text: str) -> str | None:
    """"12.4" from torch/version.py's `cuda: Optional[str] = '12.4'`; None for `= None`."""
    match = re.search(r"^cuda\b[^=\n]*=\s*['\"](\d+\.\d+)[^'\"]*['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def _major(version: str | None) -> int | None:
    return int(version.split(".")[0]) if version and version.split(".")[0].isdigit() else None


def choose_cuda_toolkit(
    found: tuple[str, str | None] | None,
    others: list[tuple[str, str | None]],
    torch_cuda: str | None,
    explicit: bool,
) -> tuple[tuple[str, str | None] | None, str | None]:
    """Which nvcc builds the CUDA kernels, and a warning (or None): a pure function of what was found.

    ``found``: (nvcc, version) located by CUDA_HOME / CUDA_PATH (``explicit``), PATH or /usr/local/cuda;
    ``others``: every other (nvcc, version) installed side by side (/usr/local/cuda-X.Y); ``torch_cuda``:
    torch.version.cuda of the torch that will load the extension (None: unknown or not a CUDA build).
    The linked runtime needs a driver for its major version, so the toolkit should have torch's major
    version: then the ``cuda`` backend runs wherever torch's CUDA build runs. CUDA_HOME is obeyed as given.
    """
    if found is None and not others:
        return None, None
    torch_major = _major(torch_cuda)
    if torch_major is None:
        return (found or others[0]), None
    if found is not None and (explicit or _major(found[1]) == torch_major):
        chosen = found
    else:
        same = [c for c in others if _major(c[1]) == torch_major]
        same.sort(key=lambda c: tuple(int(x) for x in (c[1] or "0.0").split(".")), reverse=True)
        chosen = same[0] if same else (found or others[0])
    chosen_major = _major(chosen[1])
    if chosen_major == torch_major:
        return chosen, None
    needs = MIN_DRIVER_SERIES.get(chosen_major or -1, "a matching")
    warning = (
        f"nvcc {chosen[1] or '(unknown version)'} ({chosen[0]}) does not match torch's CUDA {torch_cuda}: the"
        f" kernels link the CUDA {chosen[1]} runtime, which needs an NVIDIA driver of the {needs} series or"
        f" newer, while torch's CUDA {torch_cuda} build runs on drivers from the"
        f" {MIN_DRIVER_SERIES.get(torch_major, '?')} series. Where the driver is older the cuda backend will"
        f" not run (fusedclip.available_backends() says why) and triton or torch are used instead. To match"
        f" torch, set CUDA_HOME to a CUDA {torch_major}.x toolkit."
    )
    return chosen, warning


def _other_toolkits(found: Path | None) -> list[tuple[str, str | None]]:
    """Every /usr/local/cuda-X.Y/bin/nvcc other than ``found``, with its version."""
    seen = {str(found.resolve())} if found else set()
    others = []
    for candidate in sorted(glob.glob("/usr/local/cuda-*/bin/nvcc")):
        resolved = str(Path(candidate).resolve())
        if resolved not in seen:
            seen.add(resolved)
            others.append((candidate, _nvcc_version(Path(candidate))))
    return others


class CudaToolchainError(RuntimeError):
    """The CUDA part cannot be built with what was found (FUSEDCLIP_CUDA=auto then builds without it)."""


def _cudart_static_dir(nvcc: Path) -> Path:
    """The folder holding libcudart_static.a for this nvcc (nvcc on PATH may be a wrapper script)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), nvcc.resolve().parent.parent, "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("lib64", "lib", f"targets/{platform.machine()}-linux/lib"):
            if (Path(home) / sub / "libcudart_static.a").exists():
                return Path(home) / sub
    raise CudaToolchainError(f"libcudart_static.a not found for {nvcc}; set CUDA_HOME, or FUSEDCLIP_CUDA=0 to build without CUDA")


def _cuda_archs(spec: str) -> list[tuple[str, bool]]:
    """'80;90+PTX' or '8.0 9.0+PTX' -> [('80', False), ('90', True)]."""
    archs = []
    for token in re.split(r"[;,\s]+", spec):
        if not token:
            continue
        ptx = token.upper().endswith("+PTX")
        number = token[:-4] if ptx else token
        number = number.replace(".", "")
        if not number.isdigit():
            raise ValueError(f"FUSEDCLIP_CUDA_ARCHS: cannot read {token!r}; use e.g. '80;90+PTX'")
        archs.append((number, ptx))
    if not archs:
        raise ValueError("FUSEDCLIP_CUDA_ARCHS is empty")
    return archs


def _sanitizers(spec: str) -> list[str]:
    """FUSEDCLIP_SANITIZE: '' or '0' -> [], '1' -> ['address', 'undefined'], 'address,undefined' -> the same."""
    if spec in ("", "0"):
        return []
    if spec == "1":
        return ["address", "undefined"]
    names = [name for name in re.split(r"[,\s]+", spec.lower()) if name]
    for name in names:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise ValueError(f"FUSEDCLIP_SANITIZE: cannot read {name!r}; use 1 or a list such as 'address,undefined'")
    return names


def _sanitize_flags(names: list[str]) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for a sanitizer build; -O1 -g keeps reports readable and runs tolerable."""
    if not names:
        return [], []
    sanitize = "-fsanitize=" + ",".join(names)
    compile_flags = [sanitize, "-fno-omit-frame-pointer", "-g", "-O1"]
    if "undefined" in names:
        compile_flags.append("-fno-sanitize-recover=undefined")  # a UB report is a failure, not a log line
    return compile_flags, [sanitize]


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _ninja_binary() -> str:
    try:
        import ninja  # the PyPI package (a build requirement) ships the binary

        candidate = Path(ninja.BIN_DIR) / "ninja"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("ninja")
    if not found:
        raise RuntimeError("building fusedclip._C needs ninja: pip install ninja (or set FUSEDCLIP_BUILD_EXT=0)")
    return found


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class NinjaBuildExt(build_ext):
    """Compiles csrc/ with a generated build.ninja instead of setuptools' one-file-at-a-time compiler."""

    def build_extension(self, ext: Extension) -> None:
        cuda, required = ext.cuda  # type: ignore[attr-defined]
        record = dict(ext.cuda_record)  # type: ignore[attr-defined]
        try:
            self._build(ext, cuda)
        except (subprocess.CalledProcessError, CudaToolchainError) as error:
            if cuda is None or required:
                raise
            # FUSEDCLIP_CUDA=auto: a broken CUDA toolchain must not block the CPU kernels.
            print(
                f"fusedclip: WARNING: the CUDA kernels could not be built ({error}); building the CPU kernels"
                " only. Set FUSEDCLIP_CUDA=1 to make this an error, or FUSEDCLIP_CUDA=0 to skip CUDA.",
                flush=True,
            )
            self._build(ext, None)
            record.update(cuda=False, cuda_skipped=f"nvcc {record.get('cuda_toolkit')} failed at build time: {error}")
        self._write_record(ext, record)

    def _write_record(self, ext: Extension, record: dict) -> None:
        """fusedclip/_C_build.json beside the extension: what it was built with, tied to this very file
        (size and mtime) so that fusedclip._ext ignores a record left over from another build."""
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        stat = output.stat()
        record.update(extension=output.name, extension_size=stat.st_size, extension_mtime=stat.st_mtime)
        (output.parent / "_C_build.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

    def copy_extensions_to_source(self) -> None:
        """--inplace and editable installs: the record goes into the source tree with the extension."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package = ext.name.rpartition(".")[0]
            built = Path(self.build_lib, *package.split("."), "_C_build.json")
            if built.exists():
                shutil.copy2(built, Path(build_py.get_package_dir(package)) / "_C_build.json")

    def _build(self, ext: Extension, cuda: tuple[Path, list[tuple[str, bool]]] | None) -> None:
        try:
            import pybind11
        except ImportError as error:
            raise RuntimeError("building fusedclip._C needs pybind11: pip install pybind11") from error

        build_dir = Path(self.build_temp).resolve() / "fusedclip_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)

        cxx = os.environ.get("CXX", "c++")
        includes = [str(CSRC), pybind11.get_include(), sysconfig.get_paths()["include"]]
        defines = []
        cxx_flags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wextra"]
        cxx_flags += ["-Wno-unused-function"]
        link_flags = ["-shared", "-pthread", "-ldl"]  # -ldl: dlopen of the loaded OpenMP runtime (thread_pool.cpp)
        sanitizers = _sanitizers(_env("FUSEDCLIP_SANITIZE", ""))
        sanitize_compile, sanitize_link = _sanitize_flags(sanitizers)
        if sanitizers:  # the later -O1 wins over -O3
            cxx_flags += sanitize_compile
            link_flags += sanitize_link
        if sys.platform == "darwin":
            link_flags += ["-undefined", "dynamic_lookup"]

        sources: list[tuple[str, str]] = []  # (source, rule)
        for name in (
            "bindings.cpp",
            "gather.cpp",
            "cpu/cpu_ops.cpp",
            "cpu/thread_pool.cpp",
            "cpu/work_ranges.cpp",
            "cpu/dispatch.cpp",
            "cpu/isa_base.cpp",
        ):
            sources.append((name, "cxx"))
        if _is_x86_64():
            defines.append("FUSEDCLIP_HAVE_AVX2")
            sources.append(("cpu/isa_avx2.cpp", "cxx_avx2"))
            sources.append(("cpu/isa_avx512.cpp", "cxx_avx512"))

        nvcc_flags: list[str] = []
        if cuda is not None:
            nvcc, archs = cuda
            arch_text = ";".join(number + ("+PTX" if ptx else "") for number, ptx in archs)
            defines += ["FUSEDCLIP_HAVE_CUDA", f'FUSEDCLIP_CUDA_ARCHS="{arch_text}"']
            nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC,-fvisibility=hidden"]
            nvcc_flags += ["-ccbin", cxx]
            for number, ptx in archs:
                nvcc_flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
                if ptx:
                    nvcc_flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
            lib_dir = _cudart_static_dir(nvcc)
            link_flags += [f"-L{lib_dir}", "-lcudart_static", "-ldl", "-lrt"]
            sources.append(("cuda/kernels.cu", "nvcc"))

        define_flags = [f"-D{d}" for d in defines]
        include_flags = [f"-I{path}" for path in includes]
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {' '.join(shlex.quote(f) for f in cxx_flags + define_flags + include_flags)}",
            f"ldflags = {' '.join(shlex.quote(f) for f in link_flags)}",
        ]
        for rule, (label, isa_flags) in CXX_RULES.items():
            lines += [
                f"rule {rule}",
                "  command = " + " ".join(filter(None, ["$cxx -MMD -MF $out.d $cflags", isa_flags, "-c $in -o $out"])),
                "  depfile = $out.d",
                "  deps = gcc",
                f"  description = {label} $in",
            ]
        lines += [
            "rule link",
            "  command = $cxx $in -o $out $ldflags",
            "  description = link $out",
        ]
        if cuda is not None:
            nvcc_all = nvcc_flags + include_flags  # the defines only concern bindings.cpp
            lines += [
                f"nvcc = {_ninja_escape(str(cuda[0]))}",
                f"nvcc_flags = {' '.join(shlex.quote(f) for f in nvcc_all)}",
                "rule nvcc",
                "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = nvcc $in",
            ]
        objects = []
        for source, rule in sources:
            obj = build_dir / (source.replace("/", "_") + ".o")
            objects.append(_ninja_escape(str(obj)))
            lines.append(f"build {_ninja_escape(str(obj))}: {rule} {_ninja_escape(str(CSRC / source))}")
        lines.append(f"build {_ninja_escape(str(output))}: link {' '.join(objects)}")
        lines.append(f"default {_ninja_escape(str(output))}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

        command = [_ninja_binary(), "-C", str(build_dir)]
        jobs = os.environ.get("MAX_JOBS")
        if jobs:
            command += ["-j", jobs]
        what = "CPU + CUDA kernels" if cuda else "CPU kernels"
        if sanitizers:
            what += f" (sanitizers: {','.join(sanitizers)})"
        print("fusedclip: building", output.name, "with", what, flush=True)
        subprocess.run(command, check=True)


def get_extensions() -> list[Extension]:
    if _env("FUSEDCLIP_BUILD_EXT", "1") == "0":
        return []
    if sys.platform == "win32":
        print("fusedclip: the compiled extension is built on Linux and macOS only; the torch backend runs here")
        return []
    mode = _env("FUSEDCLIP_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FUSEDCLIP_CUDA must be auto, 0 or 1; got {mode!r}")
    cuda = None
    torch_cuda = _torch_cuda_version()
    record: dict = {"cuda": False, "cuda_mode": mode, "torch_cuda_at_build": torch_cuda}
    if mode == "0":
        record["cuda_skipped"] = "built with FUSEDCLIP_CUDA=0"
    else:
        nvcc = _find_nvcc()
        explicit = bool(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
        found = (str(nvcc), _nvcc_version(nvcc)) if nvcc else None
        others = []
        if not explicit and torch_cuda and (found is None or _major(found[1]) != _major(torch_cuda)):
            others = _other_toolkits(nvcc)  # look for a toolkit of torch's major version
        chosen, warning = choose_cuda_toolkit(found, others, torch_cuda, explicit)
        if chosen is None and mode == "1":
            raise RuntimeError("FUSEDCLIP_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        if warning:
            print(f"fusedclip: WARNING: {warning}", flush=True)
        if chosen is None:
            record["cuda_skipped"] = "nvcc was not found at build time (set CUDA_HOME or put nvcc on PATH)"
        else:
            archs = _cuda_archs(_env("FUSEDCLIP_CUDA_ARCHS", DEFAULT_CUDA_ARCHS) or DEFAULT_CUDA_ARCHS)
            cuda = (Path(chosen[0]), archs)
            record.update(
                cuda=True,
                cuda_toolkit=chosen[1],
                nvcc=chosen[0],
                cudart="static",
                cuda_archs=";".join(number + ("+PTX" if ptx else "") for number, ptx in archs),
                toolkit_warning=warning,
            )
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*") if p.suffix in (".cpp", ".cu", ".h"))
    extension = Extension("fusedclip._C", sources=[s for s in sources if not s.endswith(".h")], depends=sources)
    extension.cuda = (cuda, mode == "1")  # type: ignore[attr-defined]
    extension.cuda_record = record  # type: ignore[attr-defined]
    return [extension]


if __name__ == "__main__":  # setuptools' build backends and `python setup.py` run it as __main__; tests import it
    setup(ext_modules=get_extensions(), cmdclass={"build_ext": NinjaBuildExt})
