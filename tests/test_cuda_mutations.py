"""Planted bugs in csrc/cuda/kernels.cu must fail the emulated CUDA checks.

Each mutant is a textual patch of a copy of kernels.cu (the file itself is never touched): a
missing __syncthreads, a counter not reset, a ballot by only some lanes, an off-by-one last-block
test, a misaligned vector head, a tail that reads one element past the end, shuffles from the
wrong lane. Each is built against the CUDA-on-CPU shim (with UBSan's alignment check, as a GPU
faults on a misaligned vector access) and run through tests/cuda_shim/mutant_check.py in a child
process: the parity suite's checks on layouts that reach every kernel path, tensors ending at
guard pages. The unmodified kernels must pass the same run, and a mutant must fail it the way
it is expected to: a wrong result, a launch error (divergence, misalignment) or a memory fault.

Also here: the shim and kernels built with AddressSanitizer and UndefinedBehaviorSanitizer, run
on a small case set under the ASan runtime (the unmodified kernels clean, the read past the end
reported on ordinary allocations without guard pages).

A patch that no longer applies (kernels.cu changed there) fails its test: update the mutant.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.emulated, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
KERNELS = ROOT / "csrc" / "cuda" / "kernels.cu"
#: seconds one child run may take (a mutant that hangs is reported as such, never waited for)
RUN_TIMEOUT = 240


@dataclass(frozen=True)
class Mutant:
    name: str
    old: str  # must occur exactly once in kernels.cu
    new: str
    expected: frozenset[str]  # outcome categories that count as caught (see _categorise)


ANY_FAILURE = frozenset({"wrong result", "launch error", "divergence", "misaligned", "memory fault"})

MUTANTS = [
    Mutant(
        "missing_syncthreads_in_block_reduce",
        "  if (lane == 0) shared[warp] = v;\n  __syncthreads();\n",
        "  if (lane == 0) shared[warp] = v;\n",
        ANY_FAILURE,
    ),
    Mutant(
        "missing_syncthreads_after_the_claim",
        "claimed = atomicAdd(params.counters, 1u);\n    __syncthreads();\n",
        "claimed = atomicAdd(params.counters, 1u);\n",
        ANY_FAILURE,
    ),
    Mutant("claim_counter_not_reset", "    params.counters[0] = 0;\n", "", frozenset({"wrong result"})),
    Mutant(
        "ballot_by_only_the_valid_lanes",
        "unsigned int wide_lanes = __ballot_sync(0xffffffffu, wide);",
        "unsigned int wide_lanes = valid ? __ballot_sync(0xffffffffu, wide) : 0u;",
        frozenset({"divergence"}),
    ),
    Mutant(
        "last_block_test_off_by_one",
        "atomicAdd(params.counters + 1, 1u) == gridDim.x - 1;",
        "atomicAdd(params.counters + 1, 1u) == gridDim.x - 2;",
        ANY_FAILURE,
    ),
    Mutant(
        "misaligned_vector_head",
        "((16 - (address & 15)) & 15) / Elem<D>::size",
        "((16 - (address & 15)) & 7) / Elem<D>::size",
        frozenset({"misaligned"}),
    ),
    Mutant(
        "tail_reads_one_element_past_the_end",
        "threadIdx.x; i < n; i += kThreads) {\n    acc = Fold<M>::element(",
        "threadIdx.x; i <= n; i += kThreads) {\n    acc = Fold<M>::element(",
        frozenset({"memory fault"}),  # the guard page after a tensor's last element
    ),
    Mutant(
        "warp_fold_range_from_the_wrong_lane",
        "__shfl_sync(0xffffffffu, first, owner)",
        "__shfl_sync(0xffffffffu, first, (owner + 1) & 31)",
        frozenset({"wrong result"}),
    ),
    Mutant(
        "warp_reduce_shuffle_from_the_wrong_lane",
        "__shfl_down_sync(0xffffffffu, v, offset)",
        "__shfl_down_sync(0xffffffffu, v, offset + 1)",
        frozenset({"wrong result"}),
    ),
]


@dataclass
class Outcome:
    category: str  # "pass", or how it failed
    output: str

    def summary(self) -> str:
        return f"{self.category}; output ends:\n{self.output[-3000:]}"


def _categorise(returncode: int | None, output: str) -> str:
    if returncode is None:
        return "hang"
    if returncode == 0 and output.rstrip().endswith("PASS"):
        return "pass"
    if "cuda_shim: memory fault" in output:
        return "memory fault"
    if "AddressSanitizer" in output:
        return "asan report"
    if "misaligned address" in output:  # the shim's own check (__ldg) or UBSan's
        return "misaligned"
    if "divergent" in output:
        return "divergence"
    if "FAIL: AssertionError" in output:
        return "wrong result"
    if "FAIL: RuntimeError" in output:
        return "launch error"
    return f"crash (status {returncode})"


def _run_check(library: Path, *args: str, env: dict[str, str] | None = None) -> Outcome:
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), str(ROOT), environment.get("PYTHONPATH")]))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "cuda_shim.mutant_check", str(library), *args],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as timeout:
        out = (timeout.stdout or b"") + (timeout.stderr or b"")
        return Outcome("hang", out.decode(errors="replace") if isinstance(out, bytes) else out)
    output = result.stdout + result.stderr
    return Outcome(_categorise(result.returncode, output), output)


def _asan_environment() -> dict[str, str] | None:
    from cuda_shim import builder

    runtimes = [builder.asan_runtime()]
    cxx = builder.compiler()
    if cxx is not None:
        ubsan = subprocess.run([cxx, "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
        runtimes.append(ubsan if os.path.isabs(ubsan) and os.path.exists(ubsan) else None)
    if None in runtimes:
        return None
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [*runtimes, env.get("LD_PRELOAD")]))  # type: ignore[list-item]
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:abort_on_error=1"
    return env


@pytest.fixture(scope="module")
def outcomes(cuda_shim_library) -> dict[str, Outcome | str]:
    """Every build and child run of this module, two at a time: name -> Outcome (or why it could not run)."""
    from cuda_shim import builder

    text = KERNELS.read_text()  # one snapshot for every mutant
    jobs: dict[str, tuple] = {"unmodified": (text, "alignment", ())}
    results: dict[str, Outcome | str] = {}
    for mutant in MUTANTS:
        count = text.count(mutant.old)
        if count != 1:
            results[mutant.name] = f"its patch occurs {count} times in kernels.cu (must be once): update the mutant"
        else:
            jobs[mutant.name] = (text.replace(mutant.old, mutant.new), "alignment", ())
    asan_env = _asan_environment()
    tail = next(m for m in MUTANTS if m.name == "tail_reads_one_element_past_the_end")
    if asan_env is None:
        results["asan:unmodified"] = results["asan:tail"] = "the compiler's ASan/UBSan runtimes were not found"
    else:
        jobs["asan:unmodified"] = (text, "address,undefined", ("--small",))
        if text.count(tail.old) == 1:
            jobs["asan:tail"] = (text.replace(tail.old, tail.new), "address,undefined", ("--small", "--no-guard-pages"))

    def build_and_run(name: str) -> Outcome | str:
        source, sanitize, args = jobs[name]
        try:
            library = builder.build(source, sanitize=sanitize, label=re.sub(r"\W", "-", name))
        except builder.BuildError as error:
            return f"does not build: {error}"
        return _run_check(library, *args, env=asan_env if sanitize.startswith("address") else None)

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        futures = {name: pool.submit(build_and_run, name) for name in jobs}
        results.update({name: future.result() for name, future in futures.items()})
    return results


def _outcome(outcomes: dict[str, Outcome | str], name: str) -> Outcome:
    outcome = outcomes[name]
    if isinstance(outcome, str):
        pytest.fail(f"{name}: {outcome}")
    return outcome


def test_the_unmodified_kernels_pass_the_checks(outcomes):
    outcome = _outcome(outcomes, "unmodified")
    assert outcome.category == "pass", outcome.summary()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_a_planted_bug_fails_the_checks(outcomes, mutant):
    outcome = _outcome(outcomes, mutant.name)
    assert outcome.category != "pass", f"{mutant.name} was not caught:\n{outcome.output[-3000:]}"
    assert outcome.category in mutant.expected, (
        f"{mutant.name} was caught, but as {outcome.summary()}\n(expected: {sorted(mutant.expected)})"
    )


def test_the_kernels_are_clean_under_asan_and_ubsan(outcomes):
    if isinstance(outcomes["asan:unmodified"], str) and "not found" in outcomes["asan:unmodified"]:
        pytest.skip(outcomes["asan:unmodified"])
    outcome = _outcome(outcomes, "asan:unmodified")
    assert outcome.category == "pass", outcome.summary()


def test_asan_reports_the_read_past_the_end_on_plain_allocations(outcomes):
    if isinstance(outcomes["asan:tail"], str) and "not found" in outcomes["asan:tail"]:
        pytest.skip(outcomes["asan:tail"])
    outcome = _outcome(outcomes, "asan:tail")
    assert outcome.category == "asan report", outcome.summary()
    assert "heap-buffer-overflow" in outcome.output or "READ of size" in outcome.output, outcome.summary()
