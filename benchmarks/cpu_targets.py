"""The CPU backend against torch.nn.utils.clip_grad_norm_, side by side in one process.

    python benchmarks/cpu_targets.py             # all cases
    python benchmarks/cpu_targets.py --reps 41 --case gpt2-fp32-clipped

Each case builds two identical gradient sets (one for torch, one for fusedclip), warms both up,
then times the two calls interleaved (alternating which goes first) and reports medians and the
ratio torch / fusedclip. In clipped cases every call really scales: call k uses max_norm =
0.999**k times the initial norm, so the coefficient stays just below 1 (a fixed max_norm would
leave every call after the first unclipped) and the values never decay towards denormals.
Unclipped cases use max_norm = 1e9. Only ratios mean anything on a shared, noisy machine.

The fresh-grads case gives both sides new grad tensors (copies, untimed) before every call, as a
training loop does that sets grads to None between steps: addresses change every call, so it
measures fusedclip's plan-cache miss path (see ``PlanCache``), which the other cases never meet.
It has no target from the issue; it is there so the common training pattern is measured too.

The memory of a shared machine is itself noisy (its bandwidth has been seen to change by 2x between
runs, and within a minute), so the script also measures it in the same process, just before and
just after each case, with torch's own streaming loops over a buffer larger than the cache
(``x.sum()`` for reading, ``x.mul_(c)`` for read + write). It prints each large case's floor: the
time a clipped call takes at that speed when it moves only what it must (N bytes read for the norm,
2N read and written for the scale), and the best ratio torch's time leaves reachable; a case during
which the read speed changed by more than 15% is marked "changed".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import fusedclip
except ImportError:  # run from a checkout without installing: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fusedclip

#: GPT-2 small (124M): token and position embeddings, 12 blocks, final layer norm (148 tensors)
GPT2_VOCAB, GPT2_CONTEXT, GPT2_WIDTH, GPT2_LAYERS = 50257, 1024, 768, 12


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d = GPT2_WIDTH
    shapes: list[tuple[int, ...]] = [(GPT2_VOCAB, d), (GPT2_CONTEXT, d)]
    for _ in range(GPT2_LAYERS):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
        param.grad = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
        params.append(param)
    return params


@dataclass
class Case:
    name: str
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    clipped: bool
    target: float | None  # the ratio torch / fusedclip this case must reach (a floor), if any
    # new grad tensors before every call (untimed), as after zero_grad(set_to_none=True) and a
    # backward pass: the grads' addresses change every step, so no call meets a cached plan
    fresh_grads: bool = False


CASES = [
    Case("gpt2-fp32-clipped", gpt2_small_shapes(), torch.float32, True, 1.5),
    Case("gpt2-fp32-unclipped", gpt2_small_shapes(), torch.float32, False, 2.5),
    Case("gpt2-bf16-clipped", gpt2_small_shapes(), torch.bfloat16, True, 2.0),
    Case("5000x1024-fp32-clipped", [(1024,)] * 5000, torch.float32, True, 5.0),
    Case("5000x1024-fp32-fresh-grads", [(1024,)] * 5000, torch.float32, True, None, fresh_grads=True),
]


def interleaved_medians(
    first: Callable[[], object],
    second: Callable[[], object],
    reps: int,
    setups: tuple[Callable[[], object], Callable[[], object]] | None = None,
) -> tuple[float, float]:
    """Median seconds of each callable, timed alternately (which runs first alternates too);
    ``setups[i]``, when given, runs untimed before each call of callable ``i``."""
    times: tuple[list[float], list[float]] = ([], [])
    calls = (first, second)
    for rep in range(reps):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for index in order:
            if setups is not None:
                setups[index]()
            start = time.perf_counter()
            calls[index]()
            times[index].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def memory_speed(megabytes: int = 400, reps: int = 7) -> tuple[float, float]:
    """(read, in-place read + write) GB/s of this machine's memory right now, from torch's own
    streaming loops: the best of ``reps`` passes over a buffer larger than the cache."""
    x = torch.ones(megabytes * 250_000)
    read = rw = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        read = min(read, time.perf_counter() - start)
        start = time.perf_counter()
        x.mul_(1.0)
        rw = min(rw, time.perf_counter() - start)
    return x.nbytes / read / 1e9, 2 * x.nbytes / rw / 1e9


def floor_ms(case: Case, speed: tuple[float, float]) -> float | None:
    """What a call must cost at ``speed`` (None for sets that fit in the cache)."""
    nbytes = sum(torch.Size(s).numel() for s in case.shapes) * case.dtype.itemsize
    if nbytes < 100e6:  # a few times the last-level cache: DRAM-bound
        return None
    read, rw = speed
    return (nbytes / read + (2 * nbytes / rw if case.clipped else 0.0)) / 1e6


def run_case(case: Case, reps: int, warmup: int) -> dict[str, float | str]:
    theirs = make_params(case.shapes, case.dtype, seed=1)
    ours = make_params(case.shapes, case.dtype, seed=1)
    initial = float(torch.nn.utils.get_total_norm([p.grad for p in theirs]))
    calls = {"torch": 0, "ours": 0}

    def next_max_norm(who: str) -> float:
        calls[who] += 1
        return initial * 0.999 ** calls[who] if case.clipped else 1e9

    def run_torch() -> object:
        return torch.nn.utils.clip_grad_norm_(theirs, next_max_norm("torch"))

    def run_ours() -> object:
        return fusedclip.clip_grad_norm_(ours, next_max_norm("ours"), backend="cpu")

    setups = None
    if case.fresh_grads:
        sources = [p.grad for p in theirs]

        def new_grads(params: list[torch.nn.Parameter]) -> Callable[[], None]:
            def setup() -> None:
                for param, source in zip(params, sources):
                    param.grad = source.clone()

            return setup

        setups = (new_grads(theirs), new_grads(ours))
    for _ in range(warmup):
        for index, run in enumerate((run_torch, run_ours)):
            if setups is not None:
                setups[index]()
            run()
    torch_s, ours_s = interleaved_medians(run_torch, run_ours, reps, setups)
    return {
        "case": case.name,
        "tensors": len(case.shapes),
        "elements_M": sum(torch.Size(s).numel() for s in case.shapes) / 1e6,
        "torch_ms": torch_s * 1e3,
        "fusedclip_ms": ours_s * 1e3,
        "ratio": torch_s / ours_s,
        "target": case.target,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=21, help="timed calls per provider and case (default 21)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES], help="run only these cases")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both providers (default: torch's)")
    parser.add_argument("--save", type=Path, help="also append the table (markdown) to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    available = fusedclip.available_backends()["cpu"]
    if available is not True:
        raise SystemExit(f"the cpu backend is unavailable: {available}")
    from fusedclip import _ext

    info = _ext.BUILD_INFO
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fusedclip cpu loops: {info['cpu_isa']}"
        f" (median of {args.reps} interleaved calls each; load average {load})"
    )
    speed = memory_speed()
    print(f"memory now: read {speed[0]:.1f} GB/s, in-place read + write {speed[1]:.1f} GB/s (torch's sum and mul_)")
    print(
        f"{'case':<28}{'tensors':>8}{'M elems':>9}{'torch ms':>10}{'ours ms':>10}{'ratio':>8}{'target':>7}"
        f"{'mem ms':>8}{'best':>7}{'read GB/s':>16}"
    )
    markdown = [
        (
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, loops {info['cpu_isa']},"
            f" load average {load}, median of {args.reps}; memory at the start: read {speed[0]:.1f} GB/s,"
            f" read + write {speed[1]:.1f} GB/s"
        ),
        "",
        (
            "| case | tensors | M elements | torch ms | fusedclip ms | ratio | target | memory floor ms"
            " | best ratio possible | read GB/s before / after |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        if args.case and case.name not in args.case:
            continue
        before = memory_speed(reps=3)
        row = run_case(case, args.reps, args.warmup)
        after = memory_speed(reps=3)
        verdict = "-" if case.target is None else ("ok" if row["ratio"] >= case.target else "BELOW")
        target_text = "-" if case.target is None else f"{case.target:.1f}x"
        # the floor at the mean of the speeds measured just before and just after the case
        floor = floor_ms(case, ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2))
        floor_text = f"{floor:>8.2f}{row['torch_ms'] / floor:>6.2f}x" if floor else f"{'-':>8}{'-':>7}"
        changed = abs(before[0] - after[0]) > 0.15 * min(before[0], after[0])
        memory_text = f"{before[0]:.0f}/{after[0]:.0f}" + (" changed" if changed else "")
        print(
            f"{row['case']:<28}{row['tensors']:>8}{row['elements_M']:>9.1f}{row['torch_ms']:>10.2f}"
            f"{row['fusedclip_ms']:>10.2f}{row['ratio']:>7.2f}x{target_text:>7}{floor_text}{memory_text:>16} {verdict}"
        )
        floor_cells = f"{floor:.2f} | {row['torch_ms'] / floor:.2f}x" if floor else "- | -"
        markdown.append(
            f"| {row['case']} | {row['tensors']} | {row['elements_M']:.1f} | {row['torch_ms']:.2f} |"
            f" {row['fusedclip_ms']:.2f} | {row['ratio']:.2f}x | {target_text} | {floor_cells} | {memory_text} |"
        )
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        with args.save.open("a") as out:
            out.write("\n".join(markdown) + "\n\n")


if __name__ == "__main__":
    main()
