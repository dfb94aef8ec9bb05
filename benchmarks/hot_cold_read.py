"""How much cheaper is a grad's norm while the grad is still in cache? (What NormTracker's hooks bank on.)

One torch thread: the 2-norm of a 768 x 3072 float32 tensor (9.4 MB, a GPT-2 small MLP matrix) right
after the matmul that wrote it, the same norm again, and the norm of a tensor of the same size read
after a 256 MB pass has flushed the caches. Medians and quartiles over the rounds::

    python benchmarks/hot_cold_read.py --rounds 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    a, b = torch.randn(768, 1024), torch.randn(1024, 3072)
    cold = [torch.randn(768, 3072) for _ in range(args.rounds)]
    flush = torch.randn(64 << 20)
    times: dict[str, list[float]] = {"just written by the matmul": [], "read again": [], "cold (after a flush)": []}
    for r in range(args.rounds):
        made = a @ b
        for label in ("just written by the matmul", "read again"):
            start = time.perf_counter()
            torch.linalg.vector_norm(made)
            times[label].append(time.perf_counter() - start)
        flush.sum()
        start = time.perf_counter()
        torch.linalg.vector_norm(cold[r])
        times["cold (after a flush)"].append(time.perf_counter() - start)
    for label, values in times.items():
        low, mid, high = statistics.quantiles(values, n=4)
        gbps = made.nbytes / mid / 1e9
        print(f"{label:28s} {mid * 1e3:.3f} ms (quartiles {low * 1e3:.3f}-{high * 1e3:.3f}), {gbps:.1f} GB/s")


if __name__ == "__main__":
    main()
