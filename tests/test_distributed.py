"""Distributed norms on gloo (CPU): process groups and DTensor grads against single-process torch.

Each test spawns 2 or 4 processes; every process compares its result with torch's clip_grad_norm_
on the whole model in one process, with the same seed.
"""

from __future__ import annotations

import math
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedclip

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def fully_shard_linears(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 as torch's own clipping tests apply it: every Linear of ``model`` its own unit, then the
    model (which ``fully_shard`` returns, sharded in place)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fn, world_size: int, *args, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes of one process group
    (gloo on the CPU; nccl with one CUDA device per rank); returns the ``(rank, fn's result)`` pairs
    (results must pickle). Any rank's exception fails the caller with its traceback."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, queue, args, backend)) for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    messages = []
    while not queue.empty():
        messages.append(queue.get())
    failures = [message for kind, message in messages if kind == "error"]
    assert not failures, "\n".join(failures)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [message for kind, message in messages if kind == "result"]


def _worker(fn, rank, world_size, port, queue, args, backend="gloo"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        queue.put(("result", (rank, fn(rank, world_size, *args))))
        # Tear down together: a rank destroying its gloo group while another still exchanges with it
        # sometimes aborted at exit ("terminate called without an active exception", exit -6) after
        # every check had passed.
        dist.barrier()
    except BaseException:
        queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown, where gloo's threads still aborted now and then
    # (exit -6, after every result and error had been queued; SimpleQueue.put has written them).
    os._exit(0)


def _full_grads(seed=0, n=7):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(13,), (8, 6), (5,), (32, 3), (1,), (9, 9), (4, 4, 2)][:n]
    return [torch.randn(s, generator=gen, dtype=torch.float64).mul(10 ** (i % 3 - 1)).float() for i, s in enumerate(shapes)]


def _params_with(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


# -- group=: each rank holds a disjoint part of the parameters (model/pipeline parallel) --------


def _group_case(rank, world_size, norm_types, max_norm):
    for norm_type in norm_types:
        _group_case_one(rank, world_size, norm_type, max_norm)


def _group_case_one(rank, world_size, norm_type, max_norm):
    full = _full_grads()
    reference = _params_with(full)
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm, norm_type)
    mine = list(range(rank, len(full), world_size))  # rank r owns grads r, r+W, ...
    params = _params_with([full[i] for i in mine])
    total = fusedclip.clip_grad_norm_(params, max_norm, norm_type, group=dist.group.WORLD)
    torch.testing.assert_close(total, expected, rtol=2e-6, atol=0)
    for p, i in zip(params, mine):
        torch.testing.assert_close(p.grad, reference[i].grad, rtol=2e-6, atol=1e-9)
    got = fusedclip.get_total_norm([p.grad for p in _params_with([full[i] for i in mine])], norm_type, group=dist.group.WORLD)
    torch.testing.assert_close(got, torch.nn.utils.get_total_norm(full, norm_type), rtol=2e-6, atol=0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_group_gives_every_rank_the_global_norm(world_size):
    _launch(_group_case, world_size, [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0], 0.5)


def _group_nan_case(rank, world_size):
    full = _full_grads()
    if rank == 1:
        full[1][0, 0] = float("nan")
    mine = list(range(rank, len(full), world_size))
    params = _params_with([full[i] for i in mine])
    total = fusedclip.clip_grad_norm_(params, 1.0, math.inf, group=dist.group.WORLD)
    assert math.isnan(float(total)), "NaN on one rank must reach every rank, also through MAX"
    assert all(bool(torch.isnan(p.grad).all()) for p in params)


def test_nan_on_one_rank_propagates_through_max():
    _launch(_group_nan_case, 2)


# -- DTensor grads: FSDP2 and a 2-D mesh ---------------------------------------------------------


def _fsdp2_case(rank, world_size, norm_types):
    for norm_type in norm_types:
        _fsdp2_case_one(rank, world_size, norm_type)


def _fsdp2_case_one(rank, world_size, norm_type):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.GELU(), torch.nn.Linear(33, 5))

    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    reference = build()
    reference(x).pow(2).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.2, norm_type)

    mesh = init_device_mesh("cpu", (world_size,))
    model = build()
    fully_shard_linears(model, mesh)
    model(x).pow(2).sum().backward()
    torch_total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type)  # reads only

    # prove nothing is gathered: full_tensor/redistribute are off limits during the clip
    original_full, original_redistribute = DTensor.full_tensor, DTensor.redistribute
    DTensor.full_tensor = DTensor.redistribute = lambda *a, **k: (_ for _ in ()).throw(AssertionError("materialised"))
    try:
        total = fusedclip.clip_grad_norm_(model.parameters(), 0.2, norm_type)
    finally:
        DTensor.full_tensor, DTensor.redistribute = original_full, original_redistribute

    assert isinstance(total, DTensor)
    assert total.placements == torch_total.placements, (total.placements, torch_total.placements)
    torch.testing.assert_close(total.full_tensor(), expected, rtol=2e-6, atol=0)
    for p, ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), ref.grad, rtol=2e-6, atol=1e-9)


def test_fsdp2_fully_shard_matches_single_process_torch():
    _launch(_fsdp2_case, 2, [2.0, math.inf, 1.0])


def _mesh_2d_case(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = _full_grads(seed=4)
    reference = _params_with(full)
    expected = torch.nn.utils.clip_grad_norm_(reference, 0.3)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    layouts = [  # HSDP-like and tensor-parallel-like placements mixed in one call
        [Replicate(), Shard(0)],
        [Shard(0), Shard(1)],
        [Replicate(), Replicate()],
        [Shard(0), Replicate()],
        [Replicate(), Shard(0)],
        [Replicate(), Shard(1)],
        [Shard(2), Replicate()],
    ]
    params = []
    for g, placements in zip(full, layouts):
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), mesh, placements))
        p.grad = distribute_tensor(g.clone(), mesh, placements)
        params.append(p)
    total = fusedclip.clip_grad_norm_(params, 0.3)
    torch.testing.assert_close(total.full_tensor(), expected, rtol=2e-6, atol=0)
    for p, ref in zip(params, reference):
        torch.testing.assert_close(p.grad.full_tensor(), ref.grad, rtol=2e-6, atol=1e-9)


def test_2d_mesh_reduces_over_sharded_dims_only():
    _launch(_mesh_2d_case, 4)


# -- the same checks on gloo (CPU) and, with two CUDA devices, on NCCL -----------------------------


def _device_case(rank, world_size, device_type):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(1)).to(device)

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.GELU(), torch.nn.Linear(33, 5)).to(device)

    mesh = init_device_mesh(device_type, (world_size,))
    for norm_type in (2.0, math.inf, 3.0):
        reference = build()
        reference(x).pow(2).sum().backward()
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.2, norm_type)
        model = build()
        fully_shard_linears(model, mesh)
        model(x).pow(2).sum().backward()
        with CommDebugMode() as mode:
            total = fusedclip.clip_grad_norm_(model.parameters(), 0.2, norm_type)
        assert mode.get_total_counts() == 1, (norm_type, mode.get_total_counts())
        assert total.to_local().device == device
        torch.testing.assert_close(total.to_local(), expected, rtol=1e-5, atol=0)
        for p, ref in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), ref.grad, rtol=2e-5, atol=1e-7)
        _, per_tensor = fusedclip.get_norms([p.grad for p in model.parameters()], norm_type)
        expected_norms = torch.stack([torch.linalg.vector_norm(p.grad, norm_type) for p in reference.parameters()])
        torch.testing.assert_close(per_tensor, expected_norms, rtol=1e-5, atol=0)

    # group= with plain grads on the device
    full = [g.to(device) for g in _full_grads()]
    mine = list(range(rank, len(full), world_size))
    with CommDebugMode() as mode:
        total = fusedclip.get_total_norm([full[i] for i in mine], 2.0, group=dist.group.WORLD)
    assert mode.get_total_counts() == 1
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(full), rtol=2e-6, atol=0)


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param(
            "nccl",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
                    reason="NCCL needs two CUDA devices",
                ),
            ],
        ),
    ],
)
def test_fsdp2_and_group_on_each_backend(backend):
    _launch(_device_case, 2, "cuda" if backend == "nccl" else "cpu", backend=backend)
