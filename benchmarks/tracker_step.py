"""A training step with and without clipping, the NormTracker among them, side by side.

A thin wrapper over :mod:`fusedclip.bench.training_step` (see its docstring for the variants and
models), defaulting to the full-size models (GPT-2 small's shapes, a 512-wide LSTM) and the 400
small tensors of ``small-linears``::

    python benchmarks/tracker_step.py --rounds 7 --threads 2

Any option of ``python -m fusedclip.bench.training_step`` is accepted (``--size small`` for a run of
about 30 s, ``--min-numel`` for the tracker's threshold).

``python benchmarks/tracker_step.py --threshold`` instead measures what a hook gains or loses per
tensor against leaving the tensor to ``result()``'s fused pass, by tensor size (the evidence for
``NormTracker``'s default ``min_numel``), with one thread and process CPU time.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

import fusedclip
from fusedclip.bench.training_step import main as _main


def threshold(rounds: int = 21) -> None:
    """Per tensor: step CPU time with every tensor hooked minus with none hooked, for N square
    bias-free Linear layers of several sizes (N x size kept near 8M elements)."""
    torch.set_num_threads(1)
    clock = time.process_time
    print("| elements per tensor | tensors | hooked (ms) | not hooked (ms) | hooked minus not hooked, per tensor |")
    print("|---:|---:|---:|---:|---:|")
    for d, n in [(64, 128), (128, 64), (256, 32), (512, 16), (1024, 8)]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(d, d, bias=False), nn.Tanh()) for _ in range(n)])
        x = torch.randn(16, d, device="cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds + 1):
            for hooked in (True, False) if r % 2 else (False, True):
                tracker = fusedclip.NormTracker(model, min_numel=0 if hooked else 1 << 62)
                t0 = clock()
                opt.zero_grad(set_to_none=True)
                model(x).pow(2).mean().backward()
                fusedclip.clip_and_step_(opt, 1e-3, tracker=tracker)
                t1 = clock()
                tracker.remove()
                if r:
                    times[hooked].append(t1 - t0)
        h, nh = (statistics.median(times[k]) * 1e3 for k in (True, False))
        print(f"| {d * d} | {n} | {h:.2f} | {nh:.2f} | {(h - nh) / n * 1e3:+.1f} µs |", flush=True)


def main(argv: list[str] | None = None) -> int:
    """``training_step.main`` with ``--size full --models gpt2 lstm small-linears`` unless given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--threshold"]:
        threshold()
        return 0
    if "--size" not in argv:
        argv = ["--size", "full", *argv]
    if "--models" not in argv:
        argv = [*argv, "--models", "gpt2", "lstm", "small-linears"]
    return _main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
