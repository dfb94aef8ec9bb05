"""A training step with and without clipping, the NormTracker among them, side by side (CPU).

Five ways to run one step (zero_grad, forward, backward, then clip and optimizer step), interleaved
in rotating order within one process on one model and one fused AdamW, medians over rounds:

* ``none``: no clipping;
* ``torch``: ``torch.nn.utils.clip_grad_norm_`` then ``step()``;
* ``fusedclip``: ``fusedclip.clip_grad_norm_`` then ``step()``;
* ``clip_and_step``: ``fusedclip.clip_and_step_`` (norm pass, coefficient folded into the step);
* ``tracker``: hooks of a :class:`fusedclip.NormTracker` during backward, then
  ``clip_and_step_(..., tracker=)`` (no norm pass).

Each clipping overhead is the variant's median step time minus ``none``'s; the backward and the
post-backward part are timed separately too (the tracker moves work into backward). Models, built
in code (no downloads): ``gpt2-small`` (GPT-2 small's 148 parameter shapes, 124M parameters, tied
embedding, a 16-token forward of LayerNorm/attention-free MLP blocks so that the step is dominated
by gradient memory as in large-batch training's clip and step), ``lstm`` (2-layer LSTM, 512 wide, 8 steps)
and ``small-linears`` (200 Linear(64, 64): many small tensors, where the hooks' Python cost shows).

    python benchmarks/tracker_step.py --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

import fusedclip

MAX_NORM = 1e-3  # small enough that every step clips


class GPT2Like(nn.Module):
    """GPT-2 small's parameter shapes (wte, wpe, 12 x [ln_1, c_attn, c_proj, ln_2, c_fc, mlp c_proj],
    ln_f; head tied to wte). The attention mixing is left out: only the gradient shapes matter."""

    def __init__(self, vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(
                nn.ModuleDict(
                    dict(ln_1=nn.LayerNorm(d), c_attn=nn.Linear(d, 3 * d), attn_proj=nn.Linear(d, d), ln_2=nn.LayerNorm(d), c_fc=nn.Linear(d, 4 * d), mlp_proj=nn.Linear(4 * d, d))
                )
            )
        self.ln_f = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[-1]))
        for b in self.blocks:
            q, k, v = b["c_attn"](b["ln_1"](x)).chunk(3, dim=-1)
            x = x + b["attn_proj"](torch.tanh(q) * k + v)
            x = x + b["mlp_proj"](torch.nn.functional.gelu(b["c_fc"](b["ln_2"](x))))
        logits = self.ln_f(x) @ self.wte.weight.t()
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), tokens.flatten())


class LSTMModel(nn.Module):
    def __init__(self, d: int = 512, layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d, d, num_layers=layers)
        self.head = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out).pow(2).mean()


class SmallLinears(nn.Module):
    def __init__(self, n: int = 200, d: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.pow(2).mean()


def make(name: str):
    torch.manual_seed(0)
    if name == "gpt2-small":
        return GPT2Like(), lambda: torch.randint(0, 50257, (1, 16))
    if name == "lstm":
        return LSTMModel(), lambda: torch.randn(8, 2, 512)
    if name == "small-linears":
        return SmallLinears(), lambda: torch.randn(8, 64)
    raise ValueError(name)


VARIANTS = ["none", "torch", "fusedclip", "clip_and_step", "tracker"]


def run_step(variant: str, model: nn.Module, opt: torch.optim.Optimizer, batch, params) -> tuple[float, float]:
    tracker = fusedclip.NormTracker(model) if variant == "tracker" else None  # hooks registered untimed
    try:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(batch).backward()
        t1 = time.perf_counter()
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
        t2 = time.perf_counter()
    finally:
        if tracker is not None:
            tracker.remove()
    return t1 - t0, t2 - t1


def bench(name: str, rounds: int) -> dict[str, dict[str, float]]:
    model, batch_fn = make(name)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    batch = batch_fn()
    for variant in VARIANTS:  # warm-up: optimizer state, plan caches, allocator
        run_step(variant, model, opt, batch, params)
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            times[variant].append(run_step(variant, model, opt, batch, params))
    out = {}
    for v, ts in times.items():
        out[v] = dict(
            step=statistics.median(a + b for a, b in ts) * 1e3,
            backward=statistics.median(a for a, _ in ts) * 1e3,
            after=statistics.median(b for _, b in ts) * 1e3,
        )
    numel = sum(p.numel() for p in params)
    out["_info"] = dict(tensors=len(params), numel=numel)  # type: ignore[assignment]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "lstm", "small-linears"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: python {' '.join(sys.argv)}; torch {torch.__version__}; threads {torch.get_num_threads()}; cpus {os.cpu_count()}; load {os.getloadavg()}")
    for name in args.models:
        res = bench(name, args.rounds)
        info = res.pop("_info")
        print(f"\n## {name}: {info['tensors']} tensors, {info['numel'] / 1e6:.1f}M parameters, {args.rounds} rounds (medians, ms)")
        print("| variant | step | backward | after backward | step overhead vs none | overhead (backward + after) |")
        print("|---|---:|---:|---:|---:|---:|")
        base = res["none"]
        for v in VARIANTS:
            t = res[v]
            split = (t["backward"] - base["backward"]) + (t["after"] - base["after"])
            print(f"| {v} | {t['step']:.1f} | {t['backward']:.1f} | {t['after']:.1f} | {t['step'] - base['step']:+.1f} | {split:+.1f} |")
        torch_over = res["torch"]["step"] - base["step"]
        tracker_over = res["tracker"]["step"] - base["step"]
        ratio = tracker_over / torch_over if torch_over > 0 else float("nan")
        print(f"\ntracker overhead / torch clipping overhead: {ratio:.2f} (step medians)")
    print(f"\nload at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
