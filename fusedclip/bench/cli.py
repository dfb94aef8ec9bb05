"""``python -m fusedclip.bench`` / ``fusedclip-bench``: compare fusedclip with torch on this machine.

Runs on the best device present (CUDA, else the CPU), prints a Markdown report on stdout, and
writes JSON, CSV and a PNG chart on request (``--save DIR`` writes DIR/<device>.md/.json/.png).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .chart import matplotlib_missing, write_chart
from .environment import DeviceInfo, describe, pick_device
from .errors import BenchError
from .measure import launch_kind, measure_copy
from .metrics import share
from .progress import make_progress
from .providers import BASELINE, Provider, discover, select
from .report import render_markdown
from .results import Results
from .runner import Options, Runner
from .suites import DTYPE_ALIASES, DTYPES, SUITES

MiB = 1 << 20
#: the default run on a CPU: sets up to this size, so that it ends in a few minutes
CPU_BUDGET_MB = 64
#: --quick: what it measures (under a minute on a 2-core CPU)
QUICK_SUITES = ["gpt2-small", "resnet50", "small-10k", "huge"]
QUICK_DTYPES = ["fp32", "bf16"]
QUICK_BUDGET_MB = 32
#: seconds of torch.compile allowed by default (inductor's CPU compile is slow on few cores)
CPU_COMPILE_BUDGET_S = 60.0
GPU_COMPILE_BUDGET_S = 600.0
DEFAULT_COMPILE_MAX_TENSORS = 300
#: the command that regenerates benchmarks/results/<device>.md and .json
REGENERATE = "python -m fusedclip.bench --save benchmarks/results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedclip-bench",
        description="Compare fusedclip with torch.nn.utils.clip_grad_norm_ side by side on this machine's"
        " best device (CUDA if available, else the CPU).",
        epilog=f"Regenerate the committed results of this device with: {REGENERATE}",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a short run: fewer, smaller sets, fp32 and bf16, no torch.compile")
    add("--suite", action="append", metavar="NAMES", help=f"gradient sets (comma list): {', '.join(SUITES)}")
    add("--dtype", action="append", metavar="NAMES", help=f"dtypes (comma list): {', '.join(DTYPES)}")
    add(
        "--provider",
        action="append",
        metavar="NAMES",
        help=f"providers (comma list; 'fusedclip' = every fusedclip backend); {BASELINE} is always measured",
    )
    add("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    add(
        "--max-mb",
        type=float,
        metavar="MB",
        help=f"largest set in MiB before it is scaled down (default: {CPU_BUDGET_MB} on a CPU,"
        f" {QUICK_BUDGET_MB} with --quick, free memory only on a GPU); 0 = no limit but memory",
    )
    add(
        "--reps",
        type=int,
        metavar="N",
        help="timed rounds per set, dtype and case (default: 5 to 100, about 0.5 s of calls on a CPU, 1 s on a GPU)",
    )
    add(
        "--compile-budget",
        type=float,
        metavar="SECONDS",
        help=f"total compile time allowed to torch.compile (default: {CPU_COMPILE_BUDGET_S:.0f} on a CPU,"
        f" {GPU_COMPILE_BUDGET_S:.0f} on a GPU, 0 with --quick); 0 turns the provider off",
    )
    add(
        "--compile-max-tensors",
        type=int,
        default=DEFAULT_COMPILE_MAX_TENSORS,
        metavar="N",
        help="skip torch.compile on sets with more tensors than this (default: %(default)s)",
    )
    add("--json", type=Path, metavar="PATH", help="write the results as JSON")
    add("--csv", type=Path, metavar="PATH", help="write the rows as CSV")
    add("--png", "--chart", dest="png", type=Path, metavar="PATH", help="write a PNG chart (needs matplotlib)")
    add("--save", type=Path, metavar="DIR", help="write DIR/<device>.md, .json and .png (the committed results)")
    add("--seed", type=int, default=0, help="seed of the random grads (default: %(default)s)")
    add("--no-progress", action="store_true", help="no progress display on stderr")
    add("--list", action="store_true", help="list sets, dtypes and providers (with availability) and exit")
    return parser


def resolve_names(
    requested: Sequence[str] | None, known: Sequence[str], aliases: dict[str, str], what: str
) -> list[str]:
    """Requested names (repeatable options, comma lists) validated and deduplicated, in the order
    given; ``None`` when nothing was requested."""
    if not requested:
        return []
    names: list[str] = []
    for item in requested:
        for raw in item.split(","):
            name = aliases.get(raw.strip().lower(), raw.strip().lower())
            if not name:
                continue
            if name not in known:
                accepted = ", ".join(list(known) + sorted(aliases))
                raise BenchError(f"unknown {what} {raw.strip()!r}; choose from: {accepted}")
            if name not in names:
                names.append(name)
    if not names:
        raise BenchError(f"no {what} name given")
    return names


def make_options(args: argparse.Namespace, info: DeviceInfo, known: list[Provider]) -> tuple[Options, list[str]]:
    """Options for the runner from the command line, with the notes they imply."""
    notes: list[str] = []
    suites = resolve_names(args.suite, list(SUITES), {}, "suite") or (QUICK_SUITES if args.quick else list(SUITES))
    dtypes = resolve_names(args.dtype, list(DTYPES), DTYPE_ALIASES, "dtype") or (
        QUICK_DTYPES if args.quick else list(DTYPES)
    )
    providers = select(known, args.provider, info.device)

    if args.compile_budget is not None:
        compile_budget = args.compile_budget
    elif args.quick:
        compile_budget = 0.0
    else:
        compile_budget = GPU_COMPILE_BUDGET_S if info.is_cuda else CPU_COMPILE_BUDGET_S
    if compile_budget < 0:
        raise BenchError(f"--compile-budget must be >= 0 seconds, got {compile_budget}")
    if compile_budget == 0 and any(p.compiles for p in providers):
        named = {n.strip().lower() for item in args.provider or [] for n in item.split(",")}
        if any(p.compiles and p.name in named for p in providers):
            raise BenchError(
                "torch-compile was requested but its compile budget is 0 (the default with --quick);"
                " give --compile-budget SECONDS"
            )
        providers = [p for p in providers if not p.compiles]
    elif any(p.compiles for p in providers):
        notes.append(
            f"`torch-compile`: compile time is excluded from its timings and reported in the JSON (compile_s);"
            f" compiles stop once {compile_budget:.0f} s have been spent (--compile-budget) and skip sets of more"
            f" than {args.compile_max_tensors} tensors (--compile-max-tensors)."
        )

    if args.max_mb is not None:
        if args.max_mb < 0:
            raise BenchError(f"--max-mb must be >= 0, got {args.max_mb}")
        budget = None if args.max_mb == 0 else int(args.max_mb * MiB)
    elif args.quick:
        budget = QUICK_BUDGET_MB * MiB
    else:
        budget = None if info.is_cuda else CPU_BUDGET_MB * MiB
    if args.reps is not None and args.reps < 1:
        raise BenchError(f"--reps must be >= 1, got {args.reps}")
    if args.compile_max_tensors < 1:
        raise BenchError(f"--compile-max-tensors must be >= 1, got {args.compile_max_tensors}")
    options = Options(
        suites=suites,
        dtypes=dtypes,
        providers=providers,
        budget_bytes=budget,
        reps=args.reps,
        target_s=0.25 if args.quick else (1.0 if info.is_cuda else 0.5),
        compile_budget_s=compile_budget,
        compile_max_tensors=args.compile_max_tensors,
        # profiling a call on 10000 tensors takes seconds on a small CPU: once per set there
        launches_every_case=info.is_cuda and not args.quick,
        seed=args.seed,
    )
    if not options.launches_every_case:
        notes.append(
            "Launches were counted on one clipped call per set, dtype and provider and are reported for the"
            " unclipped case too (no provider synchronises to decide whether to scale, so both make the same calls)."
        )
    return options, notes


def copy_buffer_bytes(info: DeviceInfo, quick: bool) -> int:
    """A copy buffer far larger than the last-level cache, within memory."""
    if info.is_cuda:
        wanted = 2 << 30
    else:
        wanted = max(128 * MiB if quick else 256 * MiB, 8 * info.cache_bytes)
    return max(MiB, min(wanted, info.memory_bytes // 8))


def list_everything(info: DeviceInfo, known: list[Provider]) -> str:
    lines = ["Sets:"]
    for suite in SUITES.values():
        full = suite.full()
        lines.append(
            f"  {suite.name:<12} {full.tensors:>6} tensors {full.elements / 1e6:>9.1f} M elements  {suite.title}"
        )
    lines.append("Dtypes:")
    lines += [f"  {spec.name:<12} {spec.label}" for spec in DTYPES.values()]
    lines.append(f"Providers on {info.device} ({info.name}):")
    for provider in known:
        state = "available" if provider.available else f"unavailable: {provider.unavailable}"
        lines.append(f"  {provider.name:<17} {provider.label}; {state}")
    return "\n".join(lines) + "\n"


def _availability(provider: Provider, options: Options) -> bool | str:
    """True for a measured provider, else why it was not measured."""
    if provider in options.providers:
        return True
    if provider.unavailable:
        return provider.unavailable
    if provider.compiles and options.compile_budget_s == 0:
        return "off: its compile budget is 0 (--quick turns it off; see --compile-budget)"
    return "not selected (--provider)"


def build_meta(
    args: argparse.Namespace,
    argv: Sequence[str],
    info: DeviceInfo,
    known: list[Provider],
    options: Options,
    copy_start: Any,
    copy_end: Any,
) -> dict[str, Any]:
    copy_gbps = max(copy_start.gbps, copy_end.gbps)
    rounds = f"{options.reps} rounds" if options.reps else f"median of {options.min_reps}-{options.max_reps} rounds"
    return {
        "device": str(info.device),
        "device_name": info.name,
        "device_slug": info.slug,
        "threads": info.threads,
        "cache_bytes": info.cache_bytes,
        "torch": torch.__version__,
        "fusedclip": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": "python -m fusedclip.bench" + (" " + shlex.join(argv) if argv else ""),
        "options": {
            "quick": args.quick,
            "suites": options.suites,
            "dtypes": options.dtypes,
            "budget_bytes": options.budget_bytes,
            "reps": options.reps,
            "min_reps": options.min_reps,
            "max_reps": options.max_reps,
            "target_s": options.target_s,
            "compile_budget_s": options.compile_budget_s,
            "compile_max_tensors": options.compile_max_tensors,
            "seed": options.seed,
        },
        "copy": {
            "buffer_bytes": copy_start.buffer_bytes,
            "gbps": copy_gbps,
            "gbps_start": copy_start.gbps,
            "gbps_end": copy_end.gbps,
        },
        "timing": (
            f"providers interleaved call by call (order rotated each round), one warm-up call each, {rounds}"
            f" (about {options.target_s:g} s of calls per set, dtype and case); several copies of a set rotate"
            " when one copy would fit in the cache; a clipped copy is restored outside the timed region"
        ),
        "bandwidth_time": "device (CUDA events)" if info.is_cuda else "wall",
        "launches_counted": launch_kind(info.device),
        "launches_note": (
            "CUDA kernels per call recorded by torch.profiler (memcpy/memset excluded)."
            if info.is_cuda
            else "a CPU launches no kernels: this counts top-level torch operator calls per call (torch.profiler),"
            " i.e. dispatcher round trips; work inside a compiled extension that bypasses the dispatcher is not"
            " counted, so compare it between torch-based providers only."
        ),
        "providers": {p.name: {"label": p.label, "available": _availability(p, options)} for p in known},
        "notes": [],
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except BenchError as error:
        print(f"fusedclip-bench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusedclip-bench: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, streams and launches all on the measured device
    info = describe(device)
    known = discover(info.device)
    if args.list:
        sys.stdout.write(list_everything(info, known))
        return 0
    options, notes = make_options(args, info, known)
    chart_paths = [path for path in (args.png, args.save / f"{info.slug}.png" if args.save else None) if path]
    missing_chart = matplotlib_missing() if chart_paths else None
    if missing_chart:
        notes.append(missing_chart)
    progress, progress_note = make_progress(not args.no_progress)
    for note in [progress_note, missing_chart]:
        if note:
            print(f"fusedclip-bench: {note}", file=sys.stderr)

    started = time.time()
    load_start = _load_average()
    buffer = copy_buffer_bytes(info, args.quick)
    copy_start = measure_copy(info.device, buffer)
    run = Runner(options, info, copy_start.gbps, progress).run()
    copy_end = measure_copy(info.device, buffer)
    if copy_end.gbps > copy_start.gbps:  # shares against the best copy rate seen in this run
        _rescale_shares(run.rows, copy_end.gbps)

    meta = build_meta(args, argv, info, known, options, copy_start, copy_end)
    meta["started"] = datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta["duration_s"] = time.time() - started
    meta["load_average"] = {"start": load_start, "end": _load_average(), "cpus": os.cpu_count()}
    meta["compile_spent_s"] = run.compile_spent_s
    meta["notes"] = notes + run.notes
    busy = _busy_warning(meta["load_average"])
    if busy:
        meta["notes"].insert(0, busy)
        print(f"fusedclip-bench: {busy}", file=sys.stderr)
    results = Results(meta, run.rows)

    sys.stdout.write(render_markdown(results))
    sys.stdout.flush()
    _write_outputs(args, results, info, missing_chart is None)
    return 0


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine skews every timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _busy_warning(load: dict) -> str | None:
    """A warning when other work kept the machine busy during the run."""
    cpus = load.get("cpus") or 1
    worst = max((v for v in (load.get("start"), load.get("end")) if v is not None), default=None)
    # the run itself keeps up to all CPUs busy at the end; before it starts, anything is someone else's
    if (load.get("start") or 0) >= 0.5 * cpus or (worst is not None and worst >= 1.5 * cpus):
        return (
            f"**The machine was busy during this run** (1-minute load average {load.get('start')} at the start,"
            f" {load.get('end')} at the end, on {cpus} logical CPUs): threads that wait for a CPU make single"
            " timings jump by large factors. Treat outliers with suspicion and rerun on an idle machine."
        )
    return None


def _rescale_shares(rows: list, copy_gbps: float) -> None:
    for row in rows:
        row.copy_share = share(row.gbps, copy_gbps)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"fusedclip-bench: wrote {path}", file=sys.stderr)


def _write_outputs(args: argparse.Namespace, results: Results, info: DeviceInfo, can_chart: bool) -> None:
    if args.json:
        _write(args.json, results.to_json())
    if args.csv:
        _write(args.csv, results.to_csv())
    if args.png and can_chart:
        write_chart(results, args.png)
        print(f"fusedclip-bench: wrote {args.png}", file=sys.stderr)
    if args.save:
        stem = args.save / info.slug
        _write(stem.with_suffix(".md"), render_markdown(results, regenerate=results.meta["command"]))
        _write(stem.with_suffix(".json"), results.to_json())
        if can_chart:
            write_chart(results, stem.with_suffix(".png"))
            print(f"fusedclip-bench: wrote {stem.with_suffix('.png')}", file=sys.stderr)
