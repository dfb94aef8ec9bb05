"""Collectives per call for DTensor grads on gloo: one all-reduce, never more than torch.

Each test spawns processes (tests/test_distributed.py's launcher) and checks, on every rank, the
total and every grad against torch's clip_grad_norm_ on the unsharded model in one process, and
counts collectives with CommDebugMode (fusedclip's are functional collectives, so it sees them).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import fusedclip
from test_distributed import _launch, _params_with, fully_shard_linears

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

X = (7, 12)


def _input():
    return torch.randn(*X, generator=torch.Generator().manual_seed(1))


def _mlp(extra_norm=False):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)]
    return torch.nn.Sequential(*layers, *([torch.nn.LayerNorm(8)] if extra_norm else []))


def _reference(norm_type, extra_norm=False):
    model = _mlp(extra_norm)
    model(_input()).pow(2).sum().backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2, norm_type)
    return total, [p.grad for p in model.parameters()]


def _counted(fn, *args, **kwargs):
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        result = fn(*args, **kwargs)
    return result, mode.get_total_counts()


def _check(build, norm_type, *, extra_norm=False, against_torch=True, most=1):
    """fusedclip on one sharded model, torch on a twin; returns (fusedclip's, torch's) counts."""
    expected, expected_grads = _reference(norm_type, extra_norm)
    model = build()
    model(_input()).pow(2).sum().backward()
    total, count = _counted(fusedclip.clip_grad_norm_, model.parameters(), 0.2, norm_type)
    # the total holds the global value on every rank (full_tensor of a Partial(max) on a 2-D gloo
    # mesh hangs in torch itself, so the local value is read)
    torch.testing.assert_close(total.to_local(), expected, rtol=1e-5, atol=0)  # grads differ by rounding
    for p, ref in zip(model.parameters(), expected_grads):  # tensor-parallel backward sums in another order
        torch.testing.assert_close(p.grad.full_tensor(), ref, rtol=2e-6, atol=1e-7)
    assert count <= most, (norm_type, count)
    torch_count = None
    if against_torch:
        twin = build()
        twin(_input()).pow(2).sum().backward()
        torch_total, torch_count = _counted(torch.nn.utils.clip_grad_norm_, twin.parameters(), 0.2, norm_type)
        torch.testing.assert_close(total.to_local(), torch_total.full_tensor(), rtol=2e-6, atol=0)
        assert count <= torch_count, (norm_type, count, torch_count)
    return count, torch_count


# -- 2 processes: FSDP2, equal but distinct meshes with plain grads, group= ---------------------------


def _two_process_case(rank, world_size):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))

    def fsdp2():
        model = _mlp()
        return fully_shard_linears(model, mesh)

    for norm_type in (2.0, math.inf, 1.0):
        count, torch_count = _check(fsdp2, norm_type)
        assert count == 1, (norm_type, count, torch_count)
    # general p: every rank's (local norm scale, sum relative to it) pair travels in its own slot of
    # the same vector, so the scale needs no collective of its own
    for norm_type in (3.0, 0.5):
        count, torch_count = _check(fsdp2, norm_type)
        assert count == 1, (norm_type, count, torch_count)

    # grads on two equal but distinct meshes (Shard and Replicate) plus a plain local grad
    other = DeviceMesh("cpu", list(range(world_size)))
    assert other is not mesh and other == mesh
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(8, 5, generator=gen), torch.randn(6, generator=gen), torch.randn(4, 3, generator=gen)]
    local = torch.randn(5, generator=torch.Generator().manual_seed(10))  # the same on every rank: one coefficient
    layouts = [(mesh, [Shard(0)]), (other, [Replicate()]), (other, [Shard(1)])]
    for norm_type in (2.0, math.inf, -math.inf, 1.0):
        reference = _params_with(full + [local])
        expected = torch.nn.utils.clip_grad_norm_(reference, 0.3, norm_type)
        params = []
        for g, (m, placements) in zip(full, layouts):
            p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), m, placements))
            p.grad = distribute_tensor(g.clone(), m, placements)
            params.append(p)
        params += _params_with([local])
        total, count = _counted(fusedclip.clip_grad_norm_, params, 0.3, norm_type)
        assert count == 1, (norm_type, count)
        torch.testing.assert_close(total.to_local(), expected, rtol=2e-6, atol=0)
        for p, ref in zip(params, reference):
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(got, ref.grad, rtol=2e-6, atol=1e-9)

    # group= with plain grads: one collective
    mine = [full[rank]]
    total, count = _counted(fusedclip.get_total_norm, mine, 2.0, False, None, group=dist.group.WORLD)
    assert count == 1, count
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(full[:world_size]), rtol=2e-6, atol=0)

    # p = 0 counts tensors with a non-zero element: exact for replicated DTensors, refused for
    # sharded ones (summed per-shard counts would count a tensor once per shard), grads untouched
    replicated = []
    for g in full:
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), other, [Replicate()]))
        p.grad = distribute_tensor(g.clone(), other, [Replicate()])
        replicated.append(p)
    total = fusedclip.clip_grad_norm_(replicated, 1e9, 0.0)
    assert float(total.to_local()) == float(torch.nn.utils.get_total_norm(full, 0.0)) == 3.0
    sharded = torch.nn.Parameter(distribute_tensor(torch.zeros_like(full[0]), mesh, [Shard(0)]))
    sharded.grad = distribute_tensor(full[0].clone(), mesh, [Shard(0)])
    before = sharded.grad.to_local().clone()
    with pytest.raises(ValueError, match="norm_type=0"):
        fusedclip.clip_grad_norm_([sharded], 1e-3, 0.0)
    assert torch.equal(sharded.grad.to_local(), before)


def test_fsdp2_mixed_meshes_and_group_take_one_collective():
    _launch(_two_process_case, 2)


# -- 4 processes: FSDP x TP on a 2-D mesh, with a data-parallel submesh, and HSDP ------------------------


def _four_process_case(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def fsdp_tp(extra_norm=False):
        model = _mlp(extra_norm)
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(model[0], mesh=mesh["dp"])
        fully_shard(model[2], mesh=mesh["dp"])
        return fully_shard(model, mesh=mesh["dp"])  # the LayerNorm (if any) stays on the dp submesh

    count, torch_count = _check(fsdp_tp, 2.0)
    assert (count, torch_count) == (1, 2), (count, torch_count)
    # torch's own clip hangs for inf here (its Partial(max) redistribution on a 2-D gloo mesh)
    _check(fsdp_tp, math.inf, against_torch=False)
    # parameters on the 2-D mesh and on the dp submesh in one call: torch refuses to stack them
    _check(lambda: fsdp_tp(True), 2.0, extra_norm=True, against_torch=False)
    _check(lambda: fsdp_tp(True), 1.0, extra_norm=True, against_torch=False)

    hsdp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))

    def hsdp():
        model = _mlp()
        return fully_shard_linears(model, hsdp_mesh)

    count, torch_count = _check(hsdp, 2.0)
    assert count == 1, (count, torch_count)


def test_fsdp_tp_2d_and_hsdp_take_one_collective():
    _launch(_four_process_case, 4)
