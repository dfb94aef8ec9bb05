"""fusedclip's pure-torch backend against torch's own clip_grad_norm_, side by side in one process.

    python benchmarks/torch_backend_vs_torch.py                      # every set, fp32/bf16/fp16/mix
    python benchmarks/torch_backend_vs_torch.py --sets gpt2-small huge --dtypes bf16 --repeats 5

The grad sets, their scaling to the byte budget, the rotating working copies and the timing of one
call are those of ``python -m fusedclip.bench`` (``fusedclip.bench``). Here only two providers run:
torch's ``clip_grad_norm_`` (foreach) and ``fusedclip.clip_grad_norm_(..., backend="torch")``,
alternating call by call (the order flips every round), each on the next working copy, a clipped
copy restored outside the timed region. One *repeat* is ``--rounds`` such pairs; its ratio is
torch's median wall time over fusedclip's (> 1: fusedclip is faster). The machine is shared and
noisy, so the table gives the median ratio over the repeats and their range; absolute times are
only printed for orientation.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

import fusedclip
from fusedclip.bench.environment import describe
from fusedclip.bench.gradsets import CLIPPED_SCALE, MAX_NORM, GradSet, copies_needed
from fusedclip.bench.measure import time_call
from fusedclip.bench.suites import DTYPES, SUITES

CASES = (("clipped", CLIPPED_SCALE), ("unclipped", 1.0))
MiB = 1 << 20


def _torch(params):
    return torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)


def _fusedclip(params):
    return fusedclip.clip_grad_norm_(params, MAX_NORM, backend="torch")


PROVIDERS = {"torch": _torch, "fusedclip-torch": _fusedclip}


def measure_case(gradset: GradSet, clipped: bool, rounds: int, repeats: int) -> tuple[list[float], dict[str, float]]:
    """Ratios (torch median / fusedclip median) of ``repeats`` repeats, and overall medians (s)."""
    device = gradset.device
    copy_index = 0
    every: dict[str, list[float]] = {name: [] for name in PROVIDERS}

    def call(name: str) -> float:
        nonlocal copy_index
        copy = copy_index % gradset.copies
        copy_index += 1
        params = gradset.params[copy]
        fn = PROVIDERS[name]
        try:
            sample, _ = time_call(lambda: fn(params), device)
        finally:
            if clipped:
                gradset.restore(copy)
        return sample.wall_s

    for name in PROVIDERS:  # warm up (and build fusedclip's plans for every copy)
        for _ in range(gradset.copies):
            call(name)
    ratios = []
    names = list(PROVIDERS)
    for _ in range(repeats):
        times: dict[str, list[float]] = {name: [] for name in PROVIDERS}
        for index in range(rounds):
            order = names if index % 2 == 0 else names[::-1]
            for name in order:
                times[name].append(call(name))
        for name in PROVIDERS:
            every[name].extend(times[name])
        ratios.append(statistics.median(times["torch"]) / statistics.median(times["fusedclip-torch"]))
    return ratios, {name: statistics.median(values) for name, values in every.items()}


def _load() -> str:
    try:
        return " / ".join(f"{value:.1f}" for value in os.getloadavg()) + " (1/5/15 min)"
    except OSError:  # pragma: no cover - platforms without it
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--budget-mb", type=int, default=64, help="largest set before scaling down (as the bench)")
    parser.add_argument("--rounds", type=int, default=15, help="calls of each provider per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per set, dtype and case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cpu")
    info = describe(device)
    budget = args.budget_mb * MiB
    print(f"# fusedclip backend='torch' vs torch.nn.utils.clip_grad_norm_ (foreach) on {info.name}")
    print(f"# torch {torch.__version__}; {args.repeats} repeats x {args.rounds} interleaved pairs;"
          f" ratio = torch ms / fusedclip ms (> 1: fusedclip faster); started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"# command: {' '.join(sys.argv)}; {os.cpu_count()} CPUs, load average {_load()} at the start")
    print()
    print("| set | dtype | scale | case | torch ms | fusedclip-torch ms | ratio (median of repeats) | range |")
    print("|---|---|---|---|---:|---:|---:|---|")
    worst = None
    for suite_name in args.sets:
        suite = SUITES[suite_name]
        for dtype_name in args.dtypes:
            spec = DTYPES[dtype_name]
            variant = suite.fit(budget, spec)
            dtypes = spec.dtypes_for(variant.shapes)
            if dtypes is None:
                continue
            grad_bytes = spec.nbytes(variant)
            copies = copies_needed(grad_bytes, info.cache_bytes, int(info.memory_bytes * 0.45))
            gradset = GradSet(variant.shapes, dtypes, device, copies, seed=args.seed)
            for case, scale in CASES:
                gradset.set_scale(scale)
                ratios, medians = measure_case(gradset, case == "clipped", args.rounds, args.repeats)
                ratio = statistics.median(ratios)
                worst = ratio if worst is None else min(worst, ratio)
                print(
                    f"| {suite_name} | {dtype_name} | {variant.scale} | {case} | {medians['torch'] * 1e3:.2f} |"
                    f" {medians['fusedclip-torch'] * 1e3:.2f} | {ratio:.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |",
                    flush=True,
                )
            del gradset
            gc.collect()
    print()
    print(f"# lowest median ratio: {worst:.2f}x; load average {_load()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
