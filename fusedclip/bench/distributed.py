"""``python -m fusedclip.bench --distributed N``: clipping DTensor grads in N gloo processes on the CPU.

Spawns N processes (gloo, one thread each), builds an FSDP2 model (a few Transformer-ish MLP blocks
with LayerNorms, ``fully_shard`` per block) and an FSDP x TP model (MLP blocks, column- then
row-parallel over "tp", ``fully_shard`` over "dp"; a (N/2) x 2 mesh for N >= 4, N x 1 otherwise; no
LayerNorm, since torch refuses grads on a mesh and its submesh in one call), and times
``torch.nn.utils.clip_grad_norm_`` against ``fusedclip.clip_grad_norm_`` on the same grads in the
same run: interleaved, a barrier before every call, each call's time the slowest rank's, medians of
the repetitions. The collectives of one call of each are counted with ``CommDebugMode``, and the
totals of both are compared.

On a CPU with gloo the ratio reflects host overhead and the number of collectives, not what NCCL
on GPUs would show.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .errors import BenchError

#: the files written under --out
STEM = "distributed_gloo"
DEFAULT_REPS = 30
DEFAULT_LAYERS = 4
DEFAULT_WIDTH = 256
WARMUP = 3
MAX_NORM = 1.0
COLUMNS = (
    "layout",
    "mesh",
    "grads",
    "parameters",
    "torch ms",
    "fusedclip ms",
    "torch / fusedclip",
    "torch collectives",
    "fusedclip collectives",
    "total rel. diff",
)


@dataclass
class Row:
    """One layout's measurements (times: medians over repetitions of the slowest rank's time)."""

    layout: str
    mesh: str
    grads: int
    parameters: int
    torch_ms: float
    fusedclip_ms: float
    ratio: float
    torch_collectives: int
    fusedclip_collectives: int
    total_rel_diff: float

    def cells(self) -> list[str]:
        return [
            self.layout,
            self.mesh,
            str(self.grads),
            f"{self.parameters / 1e6:.2f}M",
            f"{self.torch_ms:.3f}",
            f"{self.fusedclip_ms:.3f}",
            f"{self.ratio:.2f}x",
            str(self.torch_collectives),
            str(self.fusedclip_collectives),
            f"{self.total_rel_diff:.1e}",
        ]


def _blocks(layers: int, width: int, norms: bool) -> torch.nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        block = [torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)]
        if norms:
            block.append(torch.nn.LayerNorm(width))
        blocks.append(torch.nn.Sequential(*block))
    return torch.nn.Sequential(*blocks)


def _fsdp2(world_size: int, layers: int, width: int) -> tuple[torch.nn.Module, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    model = _blocks(layers, width, norms=True)
    for block in model:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh), f"dp={world_size}"


def _fsdp_tp(world_size: int, layers: int, width: int) -> tuple[torch.nn.Module, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = 2 if world_size >= 4 and world_size % 2 == 0 else 1
    mesh = init_device_mesh("cpu", (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    model = _blocks(layers, width, norms=False)
    for block in model:
        parallelize_module(block, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"]), f"dp={world_size // tp} x tp={tp}"


LAYOUTS = {"fsdp2": _fsdp2, "fsdp-tp": _fsdp_tp}


def _backward(model: torch.nn.Module, width: int) -> None:
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(1), device="cpu")  # gloo: CPU processes
    model(x).pow(2).mean().backward()


def _count(fn: Any, *args: Any, **kwargs: Any) -> int:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        fn(*args, **kwargs)
    return mode.get_total_counts()


def _local(total: Any) -> float:
    """A DTensor total's value (fusedclip's holds it locally; torch's is gathered)."""
    if hasattr(total, "placements"):
        if any(p.is_partial() for p in total.placements):
            return float(total.full_tensor())
        return float(total.to_local())
    return float(total)


def _measure_layout(name: str, world_size: int, reps: int, layers: int, width: int) -> dict[str, Any]:
    import torch.distributed as dist

    import fusedclip

    model, mesh = LAYOUTS[name](world_size, layers, width)
    _backward(model, width)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    # the totals before any clipping, from the same grads
    torch_total = _local(torch.nn.utils.get_total_norm(grads))
    fused_total = _local(fusedclip.get_total_norm(grads))
    counts = {
        "torch": _count(torch.nn.utils.clip_grad_norm_, params, MAX_NORM),
        "fusedclip": _count(fusedclip.clip_grad_norm_, params, MAX_NORM),
    }
    clips = {"torch": torch.nn.utils.clip_grad_norm_, "fusedclip": fusedclip.clip_grad_norm_}
    times: dict[str, list[float]] = {"torch": [], "fusedclip": []}
    for rep in range(WARMUP + reps):
        order = ["torch", "fusedclip"] if rep % 2 == 0 else ["fusedclip", "torch"]
        for provider in order:
            dist.barrier()
            start = time.perf_counter()
            clips[provider](params, MAX_NORM)
            elapsed = time.perf_counter() - start
            if rep >= WARMUP:
                times[provider].append(elapsed)
    every: list[Any] = [None] * world_size
    dist.all_gather_object(every, times)
    slowest = {p: [max(rank[p][i] for rank in every) for i in range(reps)] for p in times}
    torch_ms = statistics.median(slowest["torch"]) * 1e3
    fused_ms = statistics.median(slowest["fusedclip"]) * 1e3
    full_params = sum(p.numel() for p in _blocks(layers, width, norms=name == "fsdp2").parameters())
    return asdict(
        Row(
            layout=name,
            mesh=mesh,
            grads=len(grads),
            parameters=full_params,
            torch_ms=torch_ms,
            fusedclip_ms=fused_ms,
            ratio=torch_ms / fused_ms if fused_ms > 0 else float("nan"),
            torch_collectives=counts["torch"],
            fusedclip_collectives=counts["fusedclip"],
            total_rel_diff=abs(fused_total - torch_total) / abs(torch_total) if torch_total else 0.0,
        )
    )


def _worker(rank: int, world_size: int, port: int, queue: Any, reps: int, layers: int, width: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        rows = [_measure_layout(name, world_size, reps, layers, width) for name in LAYOUTS]
        dist.barrier()
        if rank == 0:
            queue.put(("rows", rows))
    except BaseException:
        queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world_size: int, reps: int = DEFAULT_REPS, layers: int = DEFAULT_LAYERS, width: int = DEFAULT_WIDTH, timeout_s: float = 600.0) -> list[Row]:
    """Spawn ``world_size`` gloo processes and measure every layout; the rows in layout order."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        raise BenchError("--distributed needs torch.distributed with the gloo backend")
    if world_size < 2:
        raise BenchError(f"--distributed needs at least 2 processes, got {world_size}")
    if reps < 1 or layers < 1 or width < 1:
        raise BenchError(f"reps, layers and width must be positive, got {reps}, {layers}, {width}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world_size, port, queue, reps, layers, width)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [proc for proc in procs if proc.is_alive()]
    for proc in stuck:
        proc.terminate()
        proc.join()
    rows, errors = None, []
    while not queue.empty():
        kind, payload = queue.get()
        if kind == "rows":
            rows = payload
        else:
            errors.append(payload)
    if errors or stuck or rows is None:
        detail = "\n".join(errors) or (f"{len(stuck)} process(es) did not finish in {timeout_s:.0f} s" if stuck else "no result")
        raise BenchError(f"the distributed benchmark failed:\n{detail}")
    return [Row(**row) for row in rows]


def render(rows: list[Row], meta: dict[str, Any]) -> str:
    """The Markdown report: what ran, how to read it, the table."""
    lines = [
        f"# Distributed clipping on gloo (CPU), {meta['world_size']} processes",
        "",
        f"Command: `{meta['command']}` ({meta['started']}; torch {meta['torch']}, fusedclip {meta['fusedclip']},"
        f" {meta['cpus']} CPUs, {meta['world_size']} gloo processes with 1 thread each; {meta['reps']} repetitions,"
        f" {meta['layers']} blocks of width {meta['width']}; 1-minute load average"
        f" {' -> '.join(str(x) for x in meta.get('load_average', [None, None]))}).",
        "",
        "Each cell is the median over the repetitions of the slowest rank's time for one"
        " `clip_grad_norm_(model.parameters(), 1.0)` call, torch and fusedclip interleaved on the same grads"
        " with a barrier before every call. Collectives: `CommDebugMode` counts for one call."
        " `total rel. diff`: |fusedclip - torch| / torch of the total norm of the same grads.",
        "",
        "**Reading these numbers:** this machine is a 2-core CPU shared with other work, and the processes talk"
        " through gloo over loopback: the ratio reflects host overhead and the number of collectives per call,"
        " not NCCL performance on GPUs. fsdp2: `fully_shard` per block (MLP + LayerNorm); fsdp-tp: column- and"
        " row-parallel MLPs on the tp submesh, `fully_shard` on dp, no LayerNorm (torch refuses grads on a mesh"
        " and its submesh in one call; fusedclip takes them in one collective).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def main(world_size: int, out_dir: Path | None, reps: int | None = None, command: str | None = None) -> int:
    """The ``--distributed`` run of the benchmark CLI: print the table; with ``out_dir`` also write
    ``distributed_gloo.md`` and ``.json`` there."""
    reps = DEFAULT_REPS if reps is None else reps
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = _load()
    rows = run(world_size, reps)
    meta = {
        "command": command or f"python -m fusedclip.bench --distributed {world_size}",
        "started": started,
        "torch": torch.__version__,
        "fusedclip": __version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "world_size": world_size,
        "reps": reps,
        "layers": DEFAULT_LAYERS,
        "width": DEFAULT_WIDTH,
        "backend": "gloo",
        "load_average": [load_before, _load()],  # 1-minute load average before and after the run
    }
    report = render(rows, meta)
    print(report, end="")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{STEM}.md").write_text(report, encoding="utf-8")
        data = {"meta": meta, "columns": list(COLUMNS), "rows": [asdict(row) for row in rows]}
        (out_dir / f"{STEM}.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out_dir / (STEM + '.md')} and {out_dir / (STEM + '.json')}")
    return 0
