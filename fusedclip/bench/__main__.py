"""Side-by-side comparison of fusedclip and torch.nn.utils.clip_grad_norm_ on this machine's device.

A first, small version of the benchmark: two gradient sets, providers interleaved in one process,
median of repeated calls with the device synchronised. Ratios are what to read on a shared CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusedclip


def _gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


SETS = {
    "gpt2-small": _gpt2_small_shapes,
    "5000x1024": lambda: [(1024,)] * 5000,
}


def _params(shapes, dtype, device):
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
        p.grad = torch.randn(shape, dtype=dtype, device=device)
        params.append(p)
    return params


def _time(fn, device, reps):
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedclip-bench", description=__doc__)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    print(f"backends: {fusedclip.available_backends()}")
    print("| set | case | torch (ms) | fusedclip (ms) | speedup |")
    print("|---|---|---:|---:|---:|")
    for name, shapes in SETS.items():
        params = _params(shapes(), dtype, device)
        for case, max_norm in (("clipped", 1e-3), ("unclipped", 1e12)):
            providers = {
                "torch": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
                "fusedclip": lambda: fusedclip.clip_grad_norm_(params, max_norm),
            }
            medians: dict[str, list[float]] = {k: [] for k in providers}
            for fn in providers.values():
                fn()  # warm up
            for _ in range(3):  # interleave the providers
                for key, fn in providers.items():
                    medians[key].append(_time(fn, device, args.reps))
            t_torch, t_ours = (statistics.median(medians[k]) for k in providers)
            print(f"| {name} | {case} | {t_torch * 1e3:.2f} | {t_ours * 1e3:.2f} | {t_torch / t_ours:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
