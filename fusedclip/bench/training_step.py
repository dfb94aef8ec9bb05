"""A training step with and without clipping, side by side in one process: what clipping costs.

Five ways to run one step (``zero_grad``, forward, backward, then clip and optimizer step), interleaved
in rotating order on one model and one fused AdamW, medians over rounds:

* ``none``: no clipping;
* ``torch``: ``torch.nn.utils.clip_grad_norm_`` then ``step()``;
* ``fusedclip``: ``fusedclip.clip_grad_norm_`` then ``step()``;
* ``clip_and_step``: ``fusedclip.clip_and_step_`` (norm pass, coefficient folded into the step);
* ``tracker``: a :class:`fusedclip.NormTracker`'s hooks during backward, then
  ``clip_and_step_(..., tracker=)`` (no norm pass over the hooked grads).

A variant's clipping overhead is its median step time minus ``none``'s; the report gives it as a
ratio to torch's clipping overhead (below 1: cheaper than torch). Backward and the part after
backward are timed separately too (the tracker moves work into backward).

Each model's report ends with the floor no clipping can go below on this device: a grad larger
than the last-level cache cannot be in it whole when anything reads it, so at least its bytes
beyond the cache size come from memory, in a hook as in a pass after backward. The floor is the
median time of one read (a 2-norm) of those bytes, measured with the same clock.

Models, built in code (no downloads), in three sizes (``--size``):

* ``gpt2``: GPT-2's parameter layout (token and position embeddings, per block LayerNorm, c_attn,
  attention projection, LayerNorm, c_fc, MLP projection; final LayerNorm; head tied to the token
  embedding), attention mixing left out (only the gradient shapes matter). ``full`` is GPT-2 small
  (148 tensors, 124M parameters); ``small`` is 6 blocks of width 384 with an 8192-token vocabulary.
* ``lstm``: a 2-layer LSTM and a linear head (``full``: width 512).
* ``small-linears``: many 64 x 64 Linear layers, where per-tensor costs (hooks, launches) dominate.

``tiny`` only checks that everything runs. Run it::

    python -m fusedclip.bench.training_step --size small --rounds 7
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fusedclip
from fusedclip.tracker import DEFAULT_MIN_NUMEL

__all__ = ["VARIANTS", "MODELS", "SIZES", "ModelResult", "run", "format_markdown", "main"]

#: the step variants, in the order they are reported
VARIANTS = ("none", "torch", "fusedclip", "clip_and_step", "tracker")
#: the models
MODELS = ("gpt2", "lstm", "small-linears")
#: the sizes
SIZES = ("tiny", "small", "full")

MAX_NORM = 1e-3  # small enough that every step clips


class GPT2Like(nn.Module):
    """GPT-2's parameter shapes (head tied to the token embedding); attention mixing left out."""

    def __init__(self, vocab: int, ctx: int, d: int, layers: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    ln_1=nn.LayerNorm(d),
                    c_attn=nn.Linear(d, 3 * d),
                    attn_proj=nn.Linear(d, d),
                    ln_2=nn.LayerNorm(d),
                    c_fc=nn.Linear(d, 4 * d),
                    mlp_proj=nn.Linear(4 * d, d),
                )
            )
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[-1], device=tokens.device))
        for b in self.blocks:
            q, k, v = b["c_attn"](b["ln_1"](x)).chunk(3, dim=-1)
            x = x + b["attn_proj"](torch.tanh(q) * k + v)
            x = x + b["mlp_proj"](torch.nn.functional.gelu(b["c_fc"](b["ln_2"](x))))
        logits = self.ln_f(x) @ self.wte.weight.t()
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), tokens.flatten())


class LSTMModel(nn.Module):
    """A stacked LSTM and a linear head; loss: mean square of the head's output."""

    def __init__(self, d: int, layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d, d, num_layers=layers)
        self.head = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out).pow(2).mean()


class SmallLinears(nn.Module):
    """``n`` Linear(d, d) layers with tanh in between: 2n small tensors."""

    def __init__(self, n: int, d: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.pow(2).mean()


# (constructor kwargs, batch shape) per model and size
_CONFIGS: dict[str, dict[str, tuple[dict[str, int], tuple[int, ...]]]] = {
    "gpt2": {
        "tiny": (dict(vocab=64, ctx=8, d=16, layers=1), (1, 8)),
        "small": (dict(vocab=8192, ctx=256, d=384, layers=6), (1, 16)),
        "full": (dict(vocab=50257, ctx=1024, d=768, layers=12), (1, 16)),
    },
    "lstm": {
        "tiny": (dict(d=8), (2, 1, 8)),
        "small": (dict(d=256), (8, 2, 256)),
        "full": (dict(d=512), (8, 2, 512)),
    },
    "small-linears": {
        "tiny": (dict(n=3, d=8), (2, 8)),
        "small": (dict(n=200, d=64), (8, 64)),
        "full": (dict(n=200, d=64), (8, 64)),
    },
}


def make_model(name: str, size: str, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """The model ``name`` at ``size`` on ``device`` and one fixed batch for it (seeded)."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    kwargs, shape = _CONFIGS[name][size]
    torch.manual_seed(0)
    generator = torch.Generator(device="cpu").manual_seed(0)
    if name == "gpt2":
        model: nn.Module = GPT2Like(**kwargs)
        batch = torch.randint(0, kwargs["vocab"], shape, generator=generator, device="cpu")
    elif name == "lstm":
        model = LSTMModel(**kwargs)
        batch = torch.randn(shape, generator=generator, device="cpu")
    else:
        model = SmallLinears(**kwargs)
        batch = torch.randn(shape, generator=generator, device="cpu")
    return model.to(device), batch.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ModelResult:
    """One model's medians (milliseconds) per variant: ``step``, ``backward`` and ``after``
    (everything after backward: clipping and the optimizer step)."""

    model: str
    size: str
    tensors: int
    numel: int
    hooked: int  # parameters the tracker put a post-accumulate hook on
    rounds: int
    times: dict[str, dict[str, float]] = field(default_factory=dict)
    cache_bytes: int | None = None  # the device's last-level cache (None: unknown)
    beyond_cache_bytes: int = 0  # grad bytes beyond it, summed over the grads larger than it
    read_floor_ms: float | None = None  # median time of one read of those bytes (None: unknown)

    def overhead(self, variant: str) -> float:
        """The variant's median step time minus ``none``'s (ms)."""
        return self.times[variant]["step"] - self.times["none"]["step"]

    def ratio(self, variant: str) -> float:
        """The variant's clipping overhead over torch's (NaN when torch's is not positive)."""
        torch_over = self.overhead("torch")
        return self.overhead(variant) / torch_over if torch_over > 0 else float("nan")


def last_level_cache_bytes(device: torch.device) -> int | None:
    """The size of the last-level cache the device's computations go through: a GPU's L2, or on a
    Linux CPU the largest-level data cache of CPU 0 (sysfs); None where it is not known."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    if device.type != "cpu":
        return None
    best: tuple[int, int] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            match = re.fullmatch(r"(\d+)([KMG]?)", (index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if match is None:
            continue
        size = int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def read_floor(
    grads: Sequence[torch.Tensor], cache_bytes: int, rounds: int, device: torch.device, clock: Callable[[], float]
) -> tuple[int, float]:
    """(bytes, median ms) of one 2-norm over the part of each grad beyond ``cache_bytes``: what must
    come from memory whenever anything reads the grads (see the module docstring). A buffer twice
    the cache is written before each round, so no round reads what the previous one cached."""
    pieces = []
    for grad in grads:
        if grad.nbytes > cache_bytes and grad.is_contiguous():
            pieces.append(grad.reshape(-1)[cache_bytes // grad.element_size() :])
    if not pieces:
        return 0, 0.0
    flush = torch.empty(2 * cache_bytes // 4 + 1, dtype=torch.float32, device=pieces[0].device)
    times = []
    for _ in range(max(rounds, 3)):
        flush.fill_(1.0)  # evicts what the last round left in the cache
        _sync(device)
        start = clock()
        torch._foreach_norm(pieces, 2.0)
        _sync(device)
        times.append(clock() - start)
    return sum(piece.nbytes for piece in pieces), statistics.median(times) * 1e3


#: the clocks a step can be timed with: wall time, or the process's CPU time (every thread's), which a
#: loaded machine's descheduling does not inflate (use it with ``--threads 1`` on a shared CPU)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _step(variant: str, model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, params: list[torch.Tensor], min_numel: int, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    tracker = fusedclip.NormTracker(model, min_numel=min_numel) if variant == "tracker" else None  # untimed
    try:
        _sync(device)
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        model(batch).backward()
        _sync(device)
        t1 = clock()
        if variant == "none":
            opt.step()
        elif variant == "torch":
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.step()
        elif variant == "fusedclip":
            fusedclip.clip_grad_norm_(params, MAX_NORM)
            opt.step()
        elif variant == "clip_and_step":
            fusedclip.clip_and_step_(opt, MAX_NORM)
        else:
            fusedclip.clip_and_step_(opt, MAX_NORM, tracker=tracker)
        _sync(device)
        t2 = clock()
    finally:
        if tracker is not None:
            tracker.remove()
    return t1 - t0, t2 - t1


def bench_model(name: str, size: str, rounds: int, *, min_numel: int = DEFAULT_MIN_NUMEL, device: torch.device | str = "cpu", variants: Sequence[str] = VARIANTS, clock: str = "wall") -> ModelResult:
    """Time every variant on one model: one warm-up step each, then ``rounds`` rounds in rotating
    order, with ``clock`` (a key of :data:`CLOCKS`)."""
    device = torch.device(device)
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; choose from {', '.join(CLOCKS)}")
    timer = CLOCKS[clock]
    model, batch = make_model(name, size, device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    probe = fusedclip.NormTracker(model, min_numel=min_numel)
    hooked = probe.hooked
    probe.remove()
    variants = list(variants)
    for variant in variants:  # warm-up: optimizer state, plan caches, allocator
        _step(variant, model, opt, batch, params, min_numel, device, timer)
    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for r in range(rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            samples[variant].append(_step(variant, model, opt, batch, params, min_numel, device, timer))
    result = ModelResult(name, size, len(params), sum(p.numel() for p in params), hooked, rounds)
    result.cache_bytes = last_level_cache_bytes(device)
    if result.cache_bytes is not None:
        grads = [p.grad for p in params if p.grad is not None]
        result.beyond_cache_bytes, result.read_floor_ms = read_floor(grads, result.cache_bytes, rounds, device, timer)
    for variant, ts in samples.items():
        result.times[variant] = dict(
            step=statistics.median(a + b for a, b in ts) * 1e3,
            backward=statistics.median(a for a, _ in ts) * 1e3,
            after=statistics.median(b for _, b in ts) * 1e3,
        )
    return result


def run(models: Sequence[str] = ("gpt2", "lstm"), size: str = "small", rounds: int = 7, *, min_numel: int = DEFAULT_MIN_NUMEL, device: torch.device | str = "cpu", clock: str = "wall", progress: Callable[[str], Any] | None = None) -> list[ModelResult]:
    """Benchmark each model in turn (see the module docstring); ``progress`` gets a line per model."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1; got {rounds}")
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    results = []
    for name in models:
        if progress is not None:
            progress(f"{name} ({size}) ...")
        results.append(bench_model(name, size, rounds, min_numel=min_numel, device=device, clock=clock))
    return results


def format_markdown(results: Sequence[ModelResult]) -> str:
    """The results as markdown: one table per model, then the overhead ratios."""
    lines: list[str] = []
    for res in results:
        lines.append(
            f"## {res.model} ({res.size}): {res.tensors} tensors, {res.numel / 1e6:.2f}M parameters,"
            f" {res.hooked} hooked by the tracker, {res.rounds} rounds (medians, ms)"
        )
        lines.append("")
        lines.append("| variant | step | backward | after backward | clipping overhead | overhead / torch's |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for variant, t in res.times.items():
            ratio = "" if variant == "none" else f"{res.ratio(variant):.2f}"
            lines.append(f"| {variant} | {t['step']:.2f} | {t['backward']:.2f} | {t['after']:.2f} | {res.overhead(variant):+.2f} | {ratio} |")
        lines.append("")
        lines.append(_floor_line(res))
        lines.append("")
    return "\n".join(lines)


def _floor_line(res: ModelResult) -> str:
    """The model's read floor in words (see the module docstring)."""
    if res.cache_bytes is None or res.read_floor_ms is None:
        return "Floor: the last-level cache size of this device is not known."
    cache = f"{res.cache_bytes / 2**20:.0f} MiB"
    if not res.beyond_cache_bytes:
        return f"Floor: every grad fits in the last-level cache ({cache}); none has to come from memory."
    torch_over = res.overhead("torch")
    tenth = f"; a tenth of torch's clipping overhead is {torch_over / 10:.2f} ms" if torch_over > 0 else ""
    return (
        f"Floor: {res.beyond_cache_bytes / 1e6:.1f} MB of grads lie beyond the last-level cache ({cache}) and must"
        f" come from memory whenever they are read, which takes {res.read_floor_ms:.2f} ms here{tenth}."
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of :func:`main`."""
    parser = argparse.ArgumentParser(
        prog="python -m fusedclip.bench.training_step",
        description="Clipping's cost in a training step: none, torch, fusedclip, clip_and_step_, NormTracker.",
    )
    parser.add_argument("--models", nargs="+", default=["gpt2", "lstm"], choices=MODELS)
    parser.add_argument("--size", default="small", choices=SIZES, help="model size (default: small, about 30 s on 2 CPU cores)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per variant (default: 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--min-numel", type=int, default=DEFAULT_MIN_NUMEL, help=f"the tracker's min_numel (default: {DEFAULT_MIN_NUMEL})")
    parser.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall time, or the process's CPU time (steadier on a loaded machine; use with --threads 1)")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown report; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    if args.min_numel < 0:
        print("--min-numel must be non-negative", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = (
        f"command: {' '.join(['python -m fusedclip.bench.training_step', *(argv if argv is not None else sys.argv[1:])])}\n"
        f"torch {torch.__version__}; device {args.device}; clock {args.clock}; threads {torch.get_num_threads()}; cpus {os.cpu_count()}; load at start {load}\n"
    )
    started = time.perf_counter()
    results = run(args.models, args.size, args.rounds, min_numel=args.min_numel, device=args.device, clock=args.clock, progress=lambda line: print(line, file=sys.stderr))
    end_load = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = header + "\n" + format_markdown(results) + f"\nwall {time.perf_counter() - started:.1f} s; load at end {end_load}\n"
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
