"""Static resource checks of the CUDA kernels, without a GPU: ptxas's report for sm_80 and sm_90.

``csrc/cuda/kernels.cu`` is compiled for device code only (``nvcc -fatbin -Xptxas -v``, one nvcc
call for both architectures) and ptxas's report is read for every kernel and every device function
it could not inline:

* no register spills (spill stores / spill loads) and no stack frame (local memory: an array
  indexed at run time, or a spill) -- either would put per-element traffic on local memory in
  kernels that are meant to move each grad byte through registers once;
* the registers per thread of every kernel are printed (run pytest with ``-s`` or look at the
  report section) and checked against the 256-thread launch bound.

The numbers are recorded in benchmarks/TUNING.md. Skipped with the reason when nvcc is absent (CI
has it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "cuda" / "kernels.cu"
ARCHS = ("80", "90")
#: the kernels' launch bound (kThreads in kernels.cu): at most 65536 / 256 = 255 registers fit
THREADS_PER_BLOCK = 256


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


@dataclass
class Usage:
    arch: str
    mangled: str
    name: str
    entry: bool
    registers: int | None = None
    stack: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int = 0


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {name: name for name in names}
    done = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=False)
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != len(names):
        return {name: name for name in names}
    return {name: re.sub(r"fusedclip::cuda::\(anonymous namespace\)::", "", line) for name, line in zip(names, lines)}


def parse_ptxas(text: str) -> list[Usage]:
    """Every function ptxas reported, with its registers, stack frame, spills and shared memory.

    ptxas -v prints, per function: "Compiling entry function 'F' for 'sm_NN'" (kernels only), then
    "Function properties for F" followed by "N bytes stack frame, N bytes spill stores, N bytes
    spill loads", then (kernels only) "Used N registers, ..., N bytes smem"."""
    found: dict[tuple[str, str], Usage] = {}
    arch = None
    current: Usage | None = None
    pending_properties: Usage | None = None
    for line in text.splitlines():
        match = re.search(r"Compiling entry function '([^']+)' for 'sm_(\w+)'", line)
        if match:
            arch = match.group(2)
            current = found.setdefault((arch, match.group(1)), Usage(arch, match.group(1), match.group(1), True))
            continue
        match = re.search(r"Function properties for (\S+)", line)
        if match:
            if arch is None:  # a device function reported before any entry: take the arch later
                arch = "?"
            key = (arch, match.group(1))
            pending_properties = found.setdefault(key, Usage(arch, match.group(1), match.group(1), False))
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match and pending_properties is not None:
            usage = pending_properties
            usage.stack, usage.spill_stores, usage.spill_loads = (int(g) for g in match.groups())
            pending_properties = None
            continue
        match = re.search(r"Used (\d+) registers", line)
        if match and current is not None:
            current.registers = int(match.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.smem = int(smem.group(1)) if smem else 0
            current = None
    usages = list(found.values())
    names = _demangle(sorted({u.mangled for u in usages}))
    for usage in usages:
        usage.name = names.get(usage.mangled, usage.mangled)
    return usages


@pytest.fixture(scope="module")
def usages() -> list[Usage]:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): the ptxas resource report needs it")
    command = [nvcc, "-fatbin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
    command += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    command += [f"-I{ROOT / 'csrc'}", str(KERNELS), "-o", os.devnull]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, f"nvcc failed:\n{done.stderr[-4000:]}"
    found = parse_ptxas(done.stdout + done.stderr)
    assert found, f"no ptxas report in nvcc's output:\n{(done.stdout + done.stderr)[-2000:]}"
    return found


def _table(usages: list[Usage]) -> str:
    lines = [f"{'arch':<6}{'registers':>10}{'stack':>7}{'spills':>8}{'smem':>6}  kernel"]
    for u in sorted(usages, key=lambda u: (u.arch, u.name)):
        if u.entry:
            spills = (u.spill_stores or 0) + (u.spill_loads or 0)
            lines.append(f"sm_{u.arch:<3}{u.registers!s:>10}{u.stack!s:>7}{spills:>8}{u.smem:>6}  {u.name}")
    return "\n".join(lines)


def test_parse_ptxas_reads_registers_spills_and_stack():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 73 bytes smem
ptxas info    : Function properties for helper
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""
    found = {u.mangled: u for u in parse_ptxas(text)}
    foo = found["_Z3fooPf"]
    assert (foo.arch, foo.entry, foo.registers, foo.stack, foo.spill_stores, foo.spill_loads, foo.smem) == (
        "90", True, 40, 16, 8, 4, 73
    )
    assert foo.name == "foo(float*)"
    assert not found["helper"].entry and found["helper"].stack == 0


def test_every_kernel_is_reported_for_both_architectures(usages, request):
    kernels = [u for u in usages if u.entry]
    table = _table(usages)
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nptxas -v for {', '.join('sm_' + a for a in ARCHS)} (registers per thread):\n{table}")
    request.node.user_properties.append(("ptxas", table))
    for arch in ARCHS:
        names = {u.name for u in kernels if u.arch == arch}
        assert any(name.startswith("void norm_kernel") for name in names), (arch, names)
        assert any(name.startswith("void elementwise_kernel") for name in names), (arch, names)
    assert {u.name for u in kernels if u.arch == "80"} == {u.name for u in kernels if u.arch == "90"}
    assert all(u.registers is not None for u in kernels), table


def test_no_register_spills_and_no_local_memory(usages):
    bad = [
        f"sm_{u.arch} {u.name}: {u.stack} bytes stack frame, {u.spill_stores} bytes spill stores,"
        f" {u.spill_loads} bytes spill loads"
        for u in usages
        if u.stack is None or (u.stack, u.spill_stores, u.spill_loads) != (0, 0, 0)
    ]
    assert not bad, "local-memory use in the CUDA kernels:\n" + "\n".join(bad) + "\n\n" + _table(usages)


def test_registers_fit_the_launch_bound(usages):
    limit = min(255, 65536 // THREADS_PER_BLOCK)
    over = [f"sm_{u.arch} {u.name}: {u.registers}" for u in usages if u.entry and (u.registers or 0) > limit]
    assert not over, over
