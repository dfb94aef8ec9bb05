"""The cpu backend's two passes, alone, against the torch ops that move the same bytes.

    python benchmarks/cpu_passes.py                      # 20 MB (in L3) and 500 MB, fp32 and bf16
    python benchmarks/cpu_passes.py --mb 20 --threads 1 2

For each set (four equal tensors) and thread count: the best and the median time of
  norm    fusedclip's norm pass (p = 2)           vs torch: x.sum() over the same tensors
  scale   fusedclip's scale pass (coef < 1)        vs torch: x.mul_(c)
  clip    norm, then scale (what a clipped call runs) vs the two torch ops back to back
with GB/s on the bytes each job must move (N for a read, 2N for a read + write). torch's sum
and mul_ are the fastest things torch does over this memory: the reference for how close the
passes come to what the machine gives (see benchmarks/membw.cpp for the bare loops).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import fusedclip
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fusedclip
from fusedclip import engine
from fusedclip.norm_type import parse_norm_type


def timings(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, nargs="+", default=[20.0, 500.0], help="set sizes in MB")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=0, help="timed calls (default: by size)")
    args = parser.parse_args()

    norm = parse_norm_type(2.0)
    print(f"{'MB':>6} {'dtype':>9} {'thr':>3} {'job':>6} {'ours ms':>9} {'GB/s':>6} {'torch ms':>9} {'GB/s':>6}  (best; median)")
    for mb in args.mb:
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            n = int(mb * 1e6 / dtype.itemsize / 4)
            grads = [torch.randn(n).to(dtype) for _ in range(4)]
            twins = [g.clone() for g in grads]
            nbytes = sum(g.nbytes for g in grads)
            call = engine.prepare(grads, "cpu")
            backend, work = call.works[0]
            tables = work.plan.kernel_tables(work.grads)
            coef = torch.tensor(0.9999999, dtype=torch.float64)
            c = float(coef)
            reps = args.reps or max(15, min(400, int(4e9 / nbytes)))

            def our_norm() -> object:
                return backend.run_norm(work, tables, norm, 1.0, dtype)

            def our_scale() -> None:
                backend.launch_scale(work, tables, coef)

            def our_clip() -> None:
                our_norm()
                our_scale()

            def torch_sum() -> object:
                return [t.sum() for t in twins]

            def torch_mul() -> None:
                for t in twins:
                    t.mul_(c)

            def torch_clip() -> None:
                torch_sum()
                torch_mul()

            for threads in args.threads:
                torch.set_num_threads(threads)
                for job, ours, theirs, moved in (
                    ("norm", our_norm, torch_sum, nbytes),
                    ("scale", our_scale, torch_mul, 2 * nbytes),
                    ("clip", our_clip, torch_clip, 3 * nbytes),
                ):
                    ours()
                    theirs()
                    o_best, o_med = timings(ours, reps)
                    t_best, t_med = timings(theirs, reps)
                    print(
                        f"{mb:>6.0f} {dtype_name:>9} {threads:>3} {job:>6} {o_best * 1e3:>9.3f} {moved / o_best / 1e9:>6.1f}"
                        f" {t_best * 1e3:>9.3f} {moved / t_best / 1e9:>6.1f}  ({o_med * 1e3:.3f}; {t_med * 1e3:.3f})"
                    )


if __name__ == "__main__":
    main()
