"""The headline GPU numbers of the proof, written row by row so that a call cut short keeps them.

Sets, in order of value: GPT-2 small fp32, Llama-2-7B-sized bf16, 2000 small fp32 tensors, GPT-2
small bf16, one 2^31-element bf16 tensor (shapes from fusedclip.bench.suites, except the 2000-tensor
set). Providers, in this order per set: fusedclip `cuda`, fusedclip `triton`, torch (foreach), apex
(when installed with its CUDA extension) -- the providers of fusedclip.bench.providers. torch.compile
comes last, after every other row of every set: a cold compile costs tens of seconds and must not
push the kernel rows of the later sets out of the budget. It gets a second pass over the sets (those
of at most 300 tensors, within a compile budget), on the same grads rebuilt from the same seed.

For each row: the device time of a clipped and of an unclipped call (median, CUDA events via
triton.testing.do_bench), the wall time per call of back-to-back calls (host included), and the
achieved bandwidth on the bytes the call must move (clipped 3N: read, read + write; unclipped N) as a
share of a device-to-device copy measured in the same process (a copy of N bytes moves 2N). The norm
is checked against float64 before a fusedclip backend is timed (a wrong kernel is not timed).

Clipped calls use max_norm = 1e-3: the first call scales the grads down to that norm, every later
call sees a norm of 1e-3 and a coefficient of 1e-3 / (1e-3 + 1e-6) < 1, so it keeps doing the full
read-read-write work on non-zero values (max_norm = 0 would time zeros). Unclipped: max_norm = inf.

Output (OUT, default ./gpu_out): bench.jsonl (a meta line, then one line per set and provider in
the order measured, flushed and fsynced as measured) and bench.md (the table grouped by set, rewritten
after every row).

    python benchmarks/gpu_headline.py --out DIR [--budget SECONDS] [--sets a,b] [--rehearse]

--rehearse runs the same code on the CPU (small variants, the `cpu` backend, torch and torch.compile
with a compile budget of 0 s unless --compile-budget says otherwise, wall-clock timing) so the
writer, the order of the rows and the set definitions are tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip.bench.providers import discover  # noqa: E402
from fusedclip.bench.suites import DTYPES, SUITES  # noqa: E402

GiB = 1 << 30
CLIPPED_MAX_NORM = 1e-3
#: provider order within a set (what matters most first); names from fusedclip.bench.providers
PROVIDERS = ["fusedclip-cuda", "fusedclip-triton", "torch", "apex", "torch-compile"]
#: the rehearsal lists torch.compile too, with a compile budget of 0 s by default: its rows are written
#: (skipped) in their place, after every other row, without minutes of compiling on a CPU
REHEARSAL_PROVIDERS = ["fusedclip-cpu", "torch", "torch-compile"]
COMPILE_MAX_TENSORS = 300
FILES = ("bench.jsonl", "bench.md")


def _small_2000() -> list[tuple[int, ...]]:
    generator = torch.Generator().manual_seed(0)
    return [(s,) for s in torch.randint(256, 16384, (2000,), generator=generator).tolist()]


@dataclass(frozen=True)
class GradSet:
    key: str
    title: str
    shapes: Callable[[int | None], tuple[list[tuple[int, ...]], str]]  # budget bytes -> (shapes, scale)
    dtype: str  # a fusedclip.bench.suites.DTYPES name


def _suite(name: str, dtype: str) -> Callable[[int | None], tuple[list[tuple[int, ...]], str]]:
    def shapes(budget: int | None) -> tuple[list[tuple[int, ...]], str]:
        variant = SUITES[name].fit(budget, DTYPES[dtype])
        return list(variant.shapes), variant.scale

    return shapes


def _small(budget: int | None) -> tuple[list[tuple[int, ...]], str]:
    shapes = _small_2000()
    if budget is None:
        return shapes, "full"
    kept, total = [], 0
    for shape in shapes:
        total += shape[0] * 4
        if total > budget:
            break
        kept.append(shape)
    return kept, f"first {len(kept)}/2000 tensors"


SETS: list[GradSet] = [
    GradSet("gpt2-small-fp32", "GPT-2 small, fp32", _suite("gpt2-small", "fp32"), "fp32"),
    GradSet("llama2-7b-bf16", "Llama-2-7B-sized, bf16", _suite("llama2-7b", "bf16"), "bf16"),
    GradSet("small-2000-fp32", "2000 small tensors (256..16383 elements), fp32", _small, "fp32"),
    GradSet("gpt2-small-bf16", "GPT-2 small, bf16", _suite("gpt2-small", "bf16"), "bf16"),
    GradSet("huge-bf16", "one 2^31-element tensor, bf16", _suite("huge", "bf16"), "bf16"),
]
_SET_ORDER = {s.key: i for i, s in enumerate(SETS)}


def schedule(sets: list[GradSet], providers: list) -> list[tuple[int, GradSet, list]]:
    """The passes of the run: (seed, set, providers), every set with the providers that do not compile
    first, then every set again with those that do (torch.compile), so that no cold compile is paid
    before the last kernel row. A set keeps its seed (its index) in both passes: the same grads."""
    plain = [p for p in providers if not p.compiles]
    compiling = [p for p in providers if p.compiles]
    passes = [(index, grad_set, plain) for index, grad_set in enumerate(sets) if plain]
    passes += [(index, grad_set, compiling) for index, grad_set in enumerate(sets) if compiling]
    return passes


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
class Writer:
    """bench.jsonl appended and fsynced line by line; bench.md rewritten after every row."""

    def __init__(self, out: Path, meta: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / "bench.jsonl"
        self.md = out / "bench.md"
        self.meta = meta
        self.rows: list[dict] = []
        self.jsonl.write_text("")
        self._append({"meta": meta})
        self._render()

    def _append(self, record: dict) -> None:
        with open(self.jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._append(row)
        self._render()
        print(_row_line(row, self._torch_row(row)), flush=True)

    def _torch_row(self, row: dict) -> dict | None:
        return next((r for r in self.rows if r["set"] == row["set"] and r["provider"] == "torch" and "clipped_ms" in r), None)

    def _render(self) -> None:
        meta = self.meta
        lines = [
            f"# fusedclip on {meta['device_name']}",
            "",
            f"{meta['started']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']};"
            f" device-to-device copy {meta['copy_gbps']:.0f} GB/s (read + write)."
            f" Device time: {meta['timing']}. Clipped calls move 3N bytes, unclipped N; 'share' is that"
            " bandwidth over the copy's. 'vs torch': torch's time over this provider's (above 1: faster).",
            "",
            "| set | N | provider | clipped ms | share | vs torch | unclipped ms | share | vs torch | wall us/call"
            " (clipped) | norm error |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        # grouped by set (in the order of SETS), in the order measured within a set
        for row in sorted(self.rows, key=lambda r: _SET_ORDER.get(r["set"], len(_SET_ORDER))):
            base = self._torch_row(row)
            lines.append(_md_row(row, base))
        text = "\n".join(lines) + "\n"
        temporary = self.md.with_suffix(".md.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.md)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _ratio(base: dict | None, row: dict, key: str) -> float | None:
    if base is None or row.get(key) in (None, 0) or base.get(key) is None:
        return None
    return base[key] / row[key]


def _md_row(row: dict, base: dict | None) -> str:
    size = f"{row['bytes'] / GiB:.2f} GiB" if "bytes" in row else "-"
    if "clipped_ms" not in row:
        return f"| {row['set']} | {size} | {row['provider']} | {row.get('skipped') or row.get('error')} ||||||||"
    return (
        f"| {row['set']} | {size} | {row['provider']} | {_fmt(row['clipped_ms'], '.3f')}"
        f" | {_fmt(row['clipped_share'], '.0%')} | {_fmt(_ratio(base, row, 'clipped_ms'), '.2f')}x"
        f" | {_fmt(row['unclipped_ms'], '.3f')} | {_fmt(row['unclipped_share'], '.0%')}"
        f" | {_fmt(_ratio(base, row, 'unclipped_ms'), '.2f')}x | {_fmt(row['clipped_wall_us'], '.1f')}"
        f" | {_fmt(row.get('norm_rel_error'), '.1e')} |"
    )


def _row_line(row: dict, base: dict | None) -> str:
    if "clipped_ms" not in row:
        return f"{row['set']:16s} {row['provider']:17s} {row.get('skipped') or row.get('error')}"
    return (
        f"{row['set']:16s} {row['provider']:17s} clipped {row['clipped_ms']:9.3f} ms ({row['clipped_share']:5.0%} of copy,"
        f" {_fmt(_ratio(base, row, 'clipped_ms'), '.2f')}x torch) unclipped {row['unclipped_ms']:9.3f} ms"
        f" ({row['unclipped_share']:5.0%}, {_fmt(_ratio(base, row, 'unclipped_ms'), '.2f')}x torch)"
        f" wall {row['clipped_wall_us']:9.1f} us"
    )


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
class Clock:
    """Device time of one call (median) and wall time per call, on a GPU or (rehearsal) a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def device_ms(self, fn: Callable[[], object], rep_ms: float = 60.0) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def wall_us(self, fn: Callable[[], object], per_call_ms: float, seconds: float = 0.15) -> float:
        calls = int(max(3, min(200, seconds * 1e3 / max(per_call_ms, 1e-3))))
        results = []
        for _ in range(3):
            self.sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            self.sync()
            results.append((time.perf_counter() - start) / calls * 1e6)
        return statistics.median(results)

    def copy_gbps(self, nbytes: int) -> float:
        source = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        target = torch.empty_like(source)
        source.random_(0, 255)
        target.copy_(source)
        ms = self.device_ms(lambda: target.copy_(source), rep_ms=100.0)
        return 2 * nbytes / (ms * 1e-3) / 1e9


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, seed: int) -> list:
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        # a stride-0 parameter of the grad's shape: no memory besides the grad itself
        param = torch.nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)
        param.grad = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        params.append(param)
    return params


def float64_norm(params: list) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))


def measure(
    grad_set: GradSet, provider, params: list, nbytes: int, clock: Clock, copy_gbps: float, ideal: float | None
) -> dict:
    row: dict = {"provider": provider.name}
    if provider.name.startswith("fusedclip-"):
        total = float(fusedclip.get_total_norm([p.grad for p in params], backend=provider.name.split("-", 1)[1]))
        row["norm_rel_error"] = abs(total - ideal) / ideal
        limit = 1e-2 if grad_set.dtype == "bf16" else 1e-5
        if not row["norm_rel_error"] <= limit:
            row["error"] = f"norm {total} vs float64 {ideal}: relative error {row['norm_rel_error']:.1e} > {limit}"
            return row
    started = time.perf_counter()
    unclipped = provider.bind(math.inf)
    unclipped(params)  # warm-up (compiles torch.compile and Triton kernels)
    clock.sync()
    clipped = provider.bind(CLIPPED_MAX_NORM)
    clipped(params)
    clock.sync()
    row["first_calls_s"] = time.perf_counter() - started
    row["unclipped_ms"] = clock.device_ms(lambda: unclipped(params))
    row["clipped_ms"] = clock.device_ms(lambda: clipped(params))
    row["clipped_wall_us"] = clock.wall_us(lambda: clipped(params), row["clipped_ms"])
    row["unclipped_wall_us"] = clock.wall_us(lambda: unclipped(params), row["unclipped_ms"])
    row["clipped_share"] = (3 * nbytes / (row["clipped_ms"] * 1e-3) / 1e9) / copy_gbps
    row["unclipped_share"] = (nbytes / (row["unclipped_ms"] * 1e-3) / 1e9) / copy_gbps
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_out"))
    parser.add_argument("--budget", type=float, default=140.0, help="seconds for the whole run (default 140)")
    parser.add_argument("--sets", help=f"comma list of {', '.join(s.key for s in SETS)} (default: all, in that order)")
    parser.add_argument(
        "--compile-budget", type=float, help="seconds of torch.compile (default 60; 0 with --rehearse)"
    )
    parser.add_argument("--rehearse", action="store_true", help="on the CPU: small variants, cpu backend and torch")
    args = parser.parse_args(argv)
    if args.compile_budget is None:
        args.compile_budget = 0.0 if args.rehearse else 60.0
    deadline = time.monotonic() + args.budget - 5.0

    chosen = SETS
    if args.sets:
        keys = [k.strip() for k in args.sets.split(",") if k.strip()]
        unknown = [k for k in keys if k not in {s.key for s in SETS}]
        if unknown:
            parser.error(f"unknown sets {unknown}; choose from {[s.key for s in SETS]}")
        chosen = [s for s in SETS if s.key in keys]
    if args.rehearse:
        device, budget_bytes, wanted = torch.device("cpu"), 2 << 20, REHEARSAL_PROVIDERS
    else:
        if not torch.cuda.is_available():
            print("this benchmark needs a CUDA device (or --rehearse)", file=sys.stderr)
            return 2
        device, budget_bytes, wanted = torch.device("cuda", torch.cuda.current_device()), None, PROVIDERS
    clock = Clock(device)
    known = {p.name: p for p in discover(device)}
    providers = [known[name] for name in wanted if name in known]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    copy_gbps = clock.copy_gbps(2 * GiB if clock.cuda else 64 << 20)
    meta = {
        "device_name": torch.cuda.get_device_name(device) if clock.cuda else f"CPU ({platform.processor() or 'cpu'})",
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "copy_gbps": copy_gbps,
        "timing": "median of triton.testing.do_bench (CUDA events, L2 flushed)" if clock.cuda else "wall clock",
        "command": "python benchmarks/gpu_headline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "providers": {name: (True if known[name].available else known[name].unavailable) for name in wanted if name in known},
        "clipped_max_norm": CLIPPED_MAX_NORM,
        "rehearsal": args.rehearse,
        "compile_budget_s": args.compile_budget,
    }
    writer = Writer(args.out, meta)
    print(f"copy {copy_gbps:.0f} GB/s; providers {meta['providers']}", flush=True)
    compile_spent = 0.0
    failed = False

    def skip_reason(provider, tensors: int) -> str | None:  # why a row is not measured now, if it is not
        if not provider.available:
            return f"unavailable: {provider.unavailable}"
        if time.monotonic() > deadline:
            return "out of time"
        if provider.compiles and tensors > COMPILE_MAX_TENSORS:
            return f"more than {COMPILE_MAX_TENSORS} tensors"
        if provider.compiles and (compile_spent >= args.compile_budget or deadline - time.monotonic() < 30):
            return f"compile budget ({args.compile_budget:.0f} s) spent"
        return None

    for seed, grad_set, pass_providers in schedule(chosen, providers):
        shapes, scale = grad_set.shapes(budget_bytes)
        common = {"set": grad_set.key, "title": grad_set.title, "scale": scale, "dtype": grad_set.dtype,
                  "tensors": len(shapes), "elements": sum(math.prod(s) for s in shapes),
                  "bytes": sum(math.prod(s) for s in shapes) * DTYPES[grad_set.dtype].single.itemsize}  # fmt: skip
        if all(skip_reason(provider, len(shapes)) for provider in pass_providers):
            # nothing to measure: the rows say why, and the grads are never allocated
            for provider in pass_providers:
                writer.add({**common, "provider": provider.name, "skipped": skip_reason(provider, len(shapes))})
            continue
        params = make_params(shapes, DTYPES[grad_set.dtype].single, device, seed=seed)
        nbytes = common["bytes"]
        ideal = None  # the float64 norm, only for the fusedclip rows (a float64 copy of the grads)
        for provider in pass_providers:
            row = dict(common)
            reason = skip_reason(provider, len(params))
            if reason is not None:
                row.update(provider=provider.name, skipped=reason)
            else:
                try:
                    if ideal is None and provider.name.startswith("fusedclip-"):
                        ideal = float64_norm(params)
                    row.update(measure(grad_set, provider, params, nbytes, clock, copy_gbps, ideal))
                except Exception as error:  # keep measuring the others; the row says what broke
                    row.update(provider=provider.name, error=f"{type(error).__name__}: {error}"[:500])
                if provider.compiles:
                    compile_spent += row.get("first_calls_s", 0.0)
                failed |= "error" in row and provider.name.startswith("fusedclip-")
            writer.add(row)
        del params
        if clock.cuda:
            torch.cuda.empty_cache()
    print(f"wrote {writer.jsonl} and {writer.md}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
