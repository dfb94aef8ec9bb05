"""``python -m fusedclip.bench`` / ``fusedclip-bench``: compare fusedclip with torch on this machine.

The default run is short (at most about a minute on a 2-core CPU, busy or not): four gradient sets
in fp32 and bf16, torch against every fusedclip backend, within a time budget. It prints a headline
paragraph and a speedup table, and writes the full Markdown report, the JSON data and a PNG chart to
``./fusedclip-bench-results/`` (``--out DIR``). ``--full`` runs the complete sweep: every set, dtype
and provider (torch.compile too), with no time budget.
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
from .. import backends as fusedclip_backends
from .chart import matplotlib_missing, write_chart
from .environment import DeviceInfo, describe, pick_device
from .errors import BenchError
from .load import LoadMeter, others_now, process_age_s, threads_for
from .measure import launch_kind, measure_copy
from .metrics import share
from .progress import make_progress
from .providers import BASELINE, Provider, discover, select
from .report import render_markdown, render_terminal
from .results import Results
from .runner import Options, Runner
from .suites import DTYPE_ALIASES, DTYPES, SUITES

MiB = 1 << 20
#: the default run: a transformer, a convnet, many medium tensors and many small ones
DEFAULT_SUITES = ["gpt2-small", "resnet50", "moe", "small-10k"]
DEFAULT_DTYPES = ["fp32", "bf16"]
#: the default run on a CPU scales sets down to this size
DEFAULT_CPU_BUDGET_MB = 32
#: --full on a CPU: sets up to this size (a few minutes on a 2-core CPU)
FULL_CPU_BUDGET_MB = 64
#: seconds the whole default run may take, from the start of the process to the files written
DEFAULT_TIME_BUDGET_S = 50.0
#: seconds the measuring loop gets at least, however long the start-up took
MIN_LOOP_S = 5.0
#: CPU seconds the end of a run takes (closing copy reference, report, chart) on an idle CPU
CLOSING_CPU_S = 2.0
#: seconds of torch.compile allowed with --full (inductor's CPU compile is slow on few cores)
CPU_COMPILE_BUDGET_S = 60.0
GPU_COMPILE_BUDGET_S = 600.0
DEFAULT_COMPILE_MAX_TENSORS = 300
#: where the report, data and chart go unless --out says otherwise
DEFAULT_OUT = Path("fusedclip-bench-results")
#: the commands that regenerate the committed results (benchmarks/results/<device>.* and <device>-full.*)
REGENERATE = "python -m fusedclip.bench --out benchmarks/results"
REGENERATE_FULL = "python -m fusedclip.bench --full --out benchmarks/results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedclip-bench",
        description="Compare fusedclip with torch.nn.utils.clip_grad_norm_ side by side on this machine's"
        " best device (CUDA if available, else the CPU). The default run takes at most about a minute;"
        " --full runs the complete sweep.",
        epilog=f"Regenerate the committed results of this device with: {REGENERATE} and {REGENERATE_FULL}",
    )
    add = parser.add_argument
    add(
        "--full",
        action="store_true",
        help="the complete sweep: every set and dtype, every provider (torch-loop and torch.compile too), launch"
        " counts, larger sets on a CPU, no time budget (several minutes on a 2-core CPU)",
    )
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
        help=f"largest set in MiB before it is scaled down (default on a CPU: {DEFAULT_CPU_BUDGET_MB},"
        f" {FULL_CPU_BUDGET_MB} with --full; on a GPU: free memory only); 0 = no limit but memory",
    )
    add(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help=f"seconds the whole run may take, start-up included (default: {DEFAULT_TIME_BUDGET_S:g}; none with"
        " --full); a busy machine gets fewer rounds, and sets not started in time are reported as skipped;"
        " 0 = no limit",
    )
    add(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch and fusedclip alike (default: torch's default, or on a CPU that other"
        " processes keep busy, the CPUs they leave free)",
    )
    add(
        "--reps",
        type=int,
        metavar="N",
        help="timed rounds per set, dtype and case (default: as many as fit in the case's share of time)",
    )
    add(
        "--compile-budget",
        type=float,
        metavar="SECONDS",
        help=f"total compile time allowed to torch.compile (default: 0, i.e. off, without --full; with --full"
        f" {CPU_COMPILE_BUDGET_S:.0f} on a CPU, {GPU_COMPILE_BUDGET_S:.0f} on a GPU); 0 turns the provider off",
    )
    add(
        "--compile-max-tensors",
        type=int,
        default=DEFAULT_COMPILE_MAX_TENSORS,
        metavar="N",
        help="skip torch.compile on sets with more tensors than this (default: %(default)s)",
    )
    add(
        "--out",
        "--save",
        dest="out",
        type=Path,
        metavar="DIR",
        help=f"folder for the report (.md), data (.json) and chart (.png): DIR/<device>.* (<device>-full.* with"
        f" --full); default: ./{DEFAULT_OUT}",
    )
    add("--no-files", action="store_true", help="write no files: print the whole report on stdout instead")
    add("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    add("--csv", type=Path, metavar="PATH", help="also write the rows as CSV to PATH")
    add("--png", "--chart", dest="png", type=Path, metavar="PATH", help="also write the chart to PATH")
    add("--seed", type=int, default=0, help="seed of the random grads (default: %(default)s)")
    add("--no-progress", action="store_true", help="no progress display on stderr")
    add("--list", action="store_true", help="list sets, dtypes and providers (with availability) and exit")
    add(
        "--distributed",
        type=int,
        metavar="N",
        help="instead: time clip_grad_norm_ of torch and fusedclip on FSDP2 and FSDP x TP models in N gloo CPU"
        " processes, with collective counts; writes DIR/distributed_gloo.md and .json with --out (--reps applies)",
    )
    add(
        "--training-step",
        action="store_true",
        help="instead: clipping's cost inside a training step (no clipping, torch, fusedclip, clip_and_step_,"
        " NormTracker); must come first, followed by the options of python -m fusedclip.bench.training_step",
    )
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


def _default_providers(known: list[Provider], device: torch.device) -> list[str] | None:
    """Without --full: torch against the backend fusedclip picks by itself on a CPU, against every
    fusedclip backend that runs here on a GPU (no torch-loop, no torch.compile)."""
    if device.type == "cuda":
        names = [p.name for p in known if p.available and p.name.startswith("fusedclip-")]
    else:
        names = [auto_provider(device, known)]
    return [",".join([BASELINE] + names)] if names else None


def make_options(args: argparse.Namespace, info: DeviceInfo, known: list[Provider]) -> tuple[Options, list[str]]:
    """Options for the runner from the command line, with the notes they imply."""
    notes: list[str] = []
    full = args.full
    suites = resolve_names(args.suite, list(SUITES), {}, "suite") or (list(SUITES) if full else DEFAULT_SUITES)
    dtypes = resolve_names(args.dtype, list(DTYPES), DTYPE_ALIASES, "dtype") or (
        list(DTYPES) if full else DEFAULT_DTYPES
    )
    requested = args.provider if (args.provider or full) else _default_providers(known, info.device)
    providers = select(known, requested, info.device)

    if args.compile_budget is not None:
        compile_budget = args.compile_budget
    elif full:
        compile_budget = GPU_COMPILE_BUDGET_S if info.is_cuda else CPU_COMPILE_BUDGET_S
    else:
        compile_budget = 0.0
    if compile_budget < 0:
        raise BenchError(f"--compile-budget must be >= 0 seconds, got {compile_budget}")
    if compile_budget == 0 and any(p.compiles for p in providers):
        named = {n.strip().lower() for item in args.provider or [] for n in item.split(",")}
        if any(p.compiles and p.name in named for p in providers):
            raise BenchError(
                "torch-compile was requested but its compile budget is 0 (the default without --full);"
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
    elif info.is_cuda:
        budget = None
    else:
        budget = (FULL_CPU_BUDGET_MB if full else DEFAULT_CPU_BUDGET_MB) * MiB

    if args.time_budget is not None:
        if args.time_budget < 0:
            raise BenchError(f"--time-budget must be >= 0 seconds, got {args.time_budget}")
        time_budget = args.time_budget or None
    else:
        time_budget = None if full else DEFAULT_TIME_BUDGET_S
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
        min_reps=5 if full else 3,
        target_s=1.0 if info.is_cuda else 0.5,
        compile_budget_s=compile_budget,
        compile_max_tensors=args.compile_max_tensors,
        # each case is profiled: a backend may decide on the host whether to scale (free on a CPU)
        launches_every_case=True,
        count_launches=full,
        time_budget_s=time_budget,
        seed=args.seed,
    )
    if not full:
        notes.append("Launches per call are counted by `--full` only.")
    return options, notes


def auto_provider(device: torch.device, known: list[Provider]) -> str:
    """The provider of the backend fusedclip picks by itself on ``device`` (what a user gets)."""
    available = {p.name for p in known if p.available}
    for name in fusedclip_backends._AUTO_ORDER.get(device.type, ("torch",)):
        if f"fusedclip-{name}" in available:
            return f"fusedclip-{name}"
    return "fusedclip-torch"


def copy_buffer_bytes(info: DeviceInfo, quick: bool) -> int:
    """A copy buffer far larger than the last-level cache, within memory (smaller for a ``quick`` run)."""
    if info.is_cuda:
        wanted = 2 << 30
    elif quick:
        wanted = max(64 * MiB, 2 * info.cache_bytes)
    else:
        wanted = max(256 * MiB, 8 * info.cache_bytes)
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


def _availability(provider: Provider, options: Options, default_run: bool) -> bool | str:
    """True for a measured provider, else why it was not measured."""
    if provider in options.providers:
        return True
    if provider.unavailable:
        return provider.unavailable
    if provider.compiles and options.compile_budget_s == 0:
        return "off: its compile budget is 0 (it runs with --full, or with --compile-budget SECONDS)"
    if default_run:
        return f"not in the default run (--full measures it, as does --provider {provider.name})"
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
    share_of_time = f"about {options.target_s:g} s of calls per set, dtype and case"
    if options.time_budget_s is not None:
        share_of_time += f", less when the {options.time_budget_s:g} s budget of the whole run requires it"
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
            "full": args.full,
            "suites": options.suites,
            "dtypes": options.dtypes,
            "budget_bytes": options.budget_bytes,
            "reps": options.reps,
            "min_reps": options.min_reps,
            "max_reps": options.max_reps,
            "target_s": options.target_s,
            "compile_budget_s": options.compile_budget_s,
            "compile_max_tensors": options.compile_max_tensors,
            "time_budget_s": (args.time_budget or None) if args.time_budget is not None else (
                None if args.full else DEFAULT_TIME_BUDGET_S
            ),
            "loop_budget_s": options.time_budget_s,
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
            f" ({share_of_time}); several copies of a set rotate"
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
        "providers": {
            p.name: {"label": p.label, "available": _availability(p, options, not (args.full or args.provider))}
            for p in known
        },
        "fusedclip_provider": auto_provider(info.device, known),
        "notes": [],
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--training-step"]:  # a separate benchmark with options of its own
        from .training_step import main as training_step_main

        return training_step_main(argv[1:])
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _run(args, argv)
    except BenchError as error:
        print(f"fusedclip-bench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusedclip-bench: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # a caller in the same process gets its own setting back


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.distributed is not None:
        from . import distributed

        command = shlex.join(["python", "-m", "fusedclip.bench", *argv])
        return distributed.main(args.distributed, None if args.no_files else args.out, args.reps, command)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, streams and launches all on the measured device
    meter = LoadMeter()
    thread_note = None if args.list else _choose_threads(args, meter.cpus)
    info = describe(device)
    known = discover(info.device)
    if args.list:
        sys.stdout.write(list_everything(info, known))
        return 0
    options, notes = make_options(args, info, known)
    if thread_note:
        notes.insert(0, thread_note)
        print(f"fusedclip-bench: {thread_note}", file=sys.stderr)
    out_dir = None if args.no_files else (args.out or DEFAULT_OUT)
    stem = f"{info.slug}-full" if args.full else info.slug
    chart_paths = [path for path in (args.png, out_dir / f"{stem}.png" if out_dir else None) if path]
    missing_chart = matplotlib_missing() if chart_paths else None
    if missing_chart:
        notes.append(missing_chart)
    progress, progress_note = make_progress(not args.no_progress)
    for note in [progress_note, missing_chart]:
        if note:
            print(f"fusedclip-bench: {note}", file=sys.stderr)

    started = time.time()
    if chart_paths and not missing_chart:
        import matplotlib.pyplot  # noqa: F401  (seconds on a busy machine: before the budget is shared out)
    buffer = copy_buffer_bytes(info, not args.full)
    copy_clock = time.perf_counter()
    copy_start = measure_copy(info.device, buffer, reps=15 if args.full else 7)
    copy_s = time.perf_counter() - copy_clock
    age = process_age_s()
    timeline: dict[str, Any] = {"start_up_s": None if age is None else round(age, 1)}
    if options.time_budget_s is not None:
        # What is left of the whole run's budget, less the closing copy and writing the files. Those
        # take about CLOSING_CPU_S of CPU time; a busy machine gives this process a smaller share of a
        # CPU, measured so far, so they take longer.
        share_of_cpu = min(1.0, max(0.05, _own_cpu_s() / age)) if age else 1.0
        closing = copy_s + CLOSING_CPU_S / share_of_cpu
        options.time_budget_s = max(MIN_LOOP_S, options.time_budget_s - (age or 0.0) - closing)
        timeline.update(cpu_share=round(share_of_cpu, 2), loop_budget_s=round(options.time_budget_s, 1))
    loop_clock = time.perf_counter()
    run = Runner(options, info, copy_start.gbps, progress).run()
    timeline["loop_s"] = round(time.perf_counter() - loop_clock, 1)
    copy_end = measure_copy(info.device, buffer, reps=15 if args.full else 7)
    if copy_end.gbps > copy_start.gbps:  # shares against the best copy rate seen in this run
        _rescale_shares(run.rows, copy_end.gbps)

    meta = build_meta(args, argv, info, known, options, copy_start, copy_end)
    meta["started"] = datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    age = process_age_s()  # the whole command, start-up included, as the user waited for it
    meta["duration_s"] = age if age is not None else time.time() - started
    load = meter.read()
    meta["load"] = load.to_dict()
    meta["compile_spent_s"] = run.compile_spent_s
    meta["notes"] = notes + run.notes
    meta["thread_note"] = thread_note
    meta["timeline"] = timeline
    if load.busy:
        print(f"fusedclip-bench: {load.describe.replace('**', '')}", file=sys.stderr)
    results = Results(meta, run.rows)

    written = _write_outputs(args, results, out_dir, stem, missing_chart is None)
    if out_dir is None:
        sys.stdout.write(render_markdown(results))
    else:
        sys.stdout.write(render_terminal(results, written, missing_chart))
    sys.stdout.flush()
    return 0


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _choose_threads(args: argparse.Namespace, cpus: int) -> str | None:
    """Set torch's thread count (which fusedclip's CPU kernels use too); a note when it was lowered."""
    if args.threads is not None:
        if args.threads < 1:
            raise BenchError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        return None
    if args.device not in (None, "cpu") or torch.cuda.is_available():
        return None
    current = torch.get_num_threads()
    others = others_now()
    chosen = threads_for(cpus, others, current)
    if chosen >= current:
        return None
    torch.set_num_threads(chosen)
    return (
        f"Other processes were using {others:.1f} of {cpus} CPUs when the run started, so it ran with"
        f" {chosen} thread{'s' if chosen > 1 else ''} instead of {current}: a CPU shared with other work makes"
        " every multithreaded call wait for its slowest thread (--threads N chooses)."
    )


def _rescale_shares(rows: list, copy_gbps: float) -> None:
    for row in rows:
        row.copy_share = share(row.gbps, copy_gbps)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _write_outputs(
    args: argparse.Namespace, results: Results, out_dir: Path | None, stem: str, can_chart: bool
) -> dict[str, Path]:
    """Every file asked for; returns {"report"/"data"/"chart"/...: path} of what was written."""
    written: dict[str, Path] = {}
    if out_dir is not None:
        base = out_dir / stem
        report = render_markdown(results, regenerate=results.meta["command"])
        written["report"] = _write(base.with_suffix(".md"), report)
        written["data"] = _write(base.with_suffix(".json"), results.to_json())
        if can_chart:
            write_chart(results, base.with_suffix(".png"))
            written["chart"] = base.with_suffix(".png")
    if args.json:
        written["json"] = _write(args.json, results.to_json())
    if args.csv:
        written["csv"] = _write(args.csv, results.to_csv())
    if args.png and can_chart:
        write_chart(results, args.png)
        written["png"] = args.png
    return written
