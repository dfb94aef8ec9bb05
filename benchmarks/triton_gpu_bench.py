"""GPU benchmark of the Triton backend (and the CUDA backend where built) against torch.

For every gradient set it measures, in one process with providers interleaved:

* device time (``triton.testing.do_bench``: CUDA events, L2 flushed, median) of a clipped call and
  of an unclipped call, for torch, fusedclip-triton and fusedclip-cuda;
* the achieved bandwidth of the clipped call on the 3N bytes it must move (read for the norm; read
  and write for the scaling), as a share of a device-to-device copy of the same N bytes measured in
  the same run (a copy moves 2N bytes);
* wall time per call, host included (``time.perf_counter`` over back-to-back calls, then one
  synchronisation): what a training step pays on a set of many small tensors.

Targets (issue 3): clipped bandwidth >= 90 % of copy; unclipped <= 0.4x torch's device time on sets
of >= 1 GB; wall time per call >= 10x lower than torch eager on the 2000-tensor set.

Clipped calls use ``max_norm=0``: every call scales by 0, so repeated calls keep doing the full
read-read-write work (a positive max_norm would stop clipping after the first call). Unclipped calls
use ``max_norm=inf`` (coefficient exactly 1).

Usage::

    python benchmarks/triton_gpu_bench.py                 # all sets, table on stdout
    python benchmarks/triton_gpu_bench.py --json out.json  # also save the numbers
    python benchmarks/triton_gpu_bench.py --sweep          # compare Triton launch configurations
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedclip  # noqa: E402
from fusedclip.backends import triton_backend  # noqa: E402


# --------------------------------------------------------------------------------------------
# gradient sets
# --------------------------------------------------------------------------------------------
def _llm_shapes(d_model: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d_model)]
    for _ in range(layers):
        shapes += [(d_model,), (3 * d_model, d_model), (d_model, d_model), (d_model,)]
        shapes += [(4 * d_model, d_model), (4 * d_model,), (d_model, 4 * d_model), (d_model,)]
    return shapes + [(d_model,)]


def _many_small() -> list[tuple[int, ...]]:
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(256, 16384, (2000,), generator=generator).tolist()
    return [(s,) for s in sizes]


SETS: dict[str, tuple[Callable[[], list[tuple[int, ...]]], torch.dtype]] = {
    # 12 layers of d=2048 plus a 32k x 2048 embedding: 670M parameters, 1.25 GiB in bf16
    "llm-d2048-bf16": (lambda: _llm_shapes(2048, 12, 32000), torch.bfloat16),
    # the same shapes in fp32: 2.5 GiB
    "llm-d2048-fp32": (lambda: _llm_shapes(2048, 12, 32000), torch.float32),
    # GPT-2-small-like (124M parameters) in bf16: 236 MiB, 98 tensors
    "gpt2-like-bf16": (lambda: _llm_shapes(768, 12, 50257), torch.bfloat16),
    # 2000 small tensors: launch and host overhead dominate
    "2000-tensors-fp32": (_many_small, torch.float32),
}


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="cuda"), requires_grad=False)
        param.grad = torch.randn(shape, dtype=dtype, device="cuda")
        params.append(param)
    return params


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------
def device_ms(fn: Callable[[], object]) -> float:
    """Median device time of one call in milliseconds (CUDA events, L2 flushed between calls)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def wall_us(fn: Callable[[], object], calls: int = 200, repeats: int = 5) -> float:
    """Median over ``repeats`` of the wall time per call of ``calls`` back-to-back calls, in µs."""
    results = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        results.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(results)


def providers() -> dict[str, Callable[..., torch.Tensor]]:
    found = {"torch": lambda params, max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm)}
    available = fusedclip.available_backends()
    for name in ("triton", "cuda"):
        if available.get(name) is True:
            found[name] = lambda params, max_norm, _name=name: fusedclip.clip_grad_norm_(
                params, max_norm, backend=_name
            )
        else:
            print(f"# fusedclip backend {name!r} unavailable: {available.get(name)}")
    return found


def check_agreement(params: list[torch.nn.Parameter], calls: dict[str, Callable[..., torch.Tensor]]) -> None:
    """Refuse to time a backend whose norm disagrees with torch's (relative 1e-2 in bf16)."""
    reference = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    for name in calls:
        if name != "torch":
            ours = float(fusedclip.get_total_norm([p.grad for p in params], backend=name))
            if not math.isclose(ours, reference, rel_tol=1e-2):
                raise SystemExit(f"{name}: norm {ours} disagrees with torch's {reference}")


def run_set(name: str, wall_calls: int) -> dict:
    shape_fn, dtype = SETS[name]
    params = make_params(shape_fn(), dtype)
    nbytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
    calls = providers()
    check_agreement(params, calls)

    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    row: dict = {"set": name, "tensors": len(params), "bytes": nbytes, "device": torch.cuda.get_device_name()}
    copy_ms = device_ms(lambda: target.copy_(source))
    row["copy_GBps"] = 2 * nbytes / copy_ms / 1e6
    for provider, fn in calls.items():  # interleaved: every provider measured per set, in turn
        clipped = device_ms(lambda: fn(params, 0.0))  # noqa: B023
        unclipped = device_ms(lambda: fn(params, math.inf))  # noqa: B023
        row[f"{provider}_clipped_ms"] = clipped
        row[f"{provider}_unclipped_ms"] = unclipped
        row[f"{provider}_clipped_copy_share"] = (3 * nbytes / clipped / 1e6) / row["copy_GBps"]
        row[f"{provider}_wall_us"] = wall_us(lambda: fn(params, 0.0), calls=wall_calls)  # noqa: B023
    for provider in calls:
        if provider != "torch":
            row[f"{provider}_unclipped_vs_torch"] = row[f"{provider}_unclipped_ms"] / row["torch_unclipped_ms"]
            row[f"{provider}_wall_speedup"] = row["torch_wall_us"] / row[f"{provider}_wall_us"]
    del params, source, target
    torch.cuda.empty_cache()
    return row


def print_row(row: dict) -> None:
    print(f"\n== {row['set']}: {row['tensors']} tensors, {row['bytes'] / 2**20:.0f} MiB on {row['device']}")
    print(f"   device-to-device copy: {row['copy_GBps']:.0f} GB/s")
    for provider in ("torch", "triton", "cuda"):
        if f"{provider}_clipped_ms" not in row:
            continue
        line = (
            f"   {provider:7s} clipped {row[f'{provider}_clipped_ms'] * 1e3:9.1f} µs"
            f" ({row[f'{provider}_clipped_copy_share']:6.1%} of copy bandwidth on 3N)"
            f" | unclipped {row[f'{provider}_unclipped_ms'] * 1e3:9.1f} µs"
            f" | wall/call {row[f'{provider}_wall_us']:9.1f} µs"
        )
        if provider != "torch":
            line += (
                f" | unclipped/torch {row[f'{provider}_unclipped_vs_torch']:.2f}x"
                f" | wall speedup {row[f'{provider}_wall_speedup']:.1f}x"
            )
        print(line)


# --------------------------------------------------------------------------------------------
# launch-configuration sweep (input for the tuning issue)
# --------------------------------------------------------------------------------------------
SWEEP = [
    dict(),
    dict(stages=2),
    dict(stages=3),
    dict(norm_block=2048, scale_block=2048),
    dict(norm_warps=4, scale_warps=4, norm_block=2048, scale_block=2048, programs_per_sm=4),
    dict(programs_per_sm=4),
    dict(programs_per_sm=8, norm_warps=4, scale_warps=4),
    dict(norm_block=8192, scale_block=8192, norm_warps=8, scale_warps=8),
]


def sweep(name: str) -> list[dict]:
    shape_fn, dtype = SETS[name]
    params = make_params(shape_fn(), dtype)
    nbytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    copy_ms = device_ms(lambda: target.copy_(source))
    torch_unclipped = device_ms(lambda: torch.nn.utils.clip_grad_norm_(params, math.inf))
    results = []
    for change in SWEEP:
        triton_backend.cuda_config = dataclasses.replace(triton_backend.CUDA_CONFIG, **change)
        clipped = device_ms(lambda: fusedclip.clip_grad_norm_(params, 0.0, backend="triton"))
        unclipped = device_ms(lambda: fusedclip.clip_grad_norm_(params, math.inf, backend="triton"))
        share = (3 * nbytes / clipped) / (2 * nbytes / copy_ms)
        results.append(dict(set=name, change=change, clipped_copy_share=share, unclipped_vs_torch=unclipped / torch_unclipped))
        print(f"   {str(change):90s} clipped {share:6.1%} of copy | unclipped/torch {unclipped / torch_unclipped:.2f}x")
    triton_backend.cuda_config = triton_backend.CUDA_CONFIG
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    parser.add_argument("--json", help="write the measurements to this file")
    parser.add_argument("--sweep", action="store_true", help="compare Triton launch configurations")
    parser.add_argument("--wall-calls", type=int, default=200)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    rows: list[dict] = []
    if args.sweep:
        for name in args.sets:
            print(f"\n== sweep on {name}")
            rows += sweep(name)
    else:
        for name in args.sets:
            row = run_set(name, args.wall_calls)
            print_row(row)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
