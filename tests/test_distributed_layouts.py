"""Expert-parallel and pipeline x FSDP layouts on gloo (4 processes), against single-process torch.

* EP-style: the experts' params are DTensors on their own 2-D ("edp", "ep") mesh (sharded across
  experts over "ep", and over "edp" or replicated there), the dense params FSDP2-sharded on a
  "dp" mesh over all ranks, all clipped in one call: total and every grad after clipping equal
  torch's clip_grad_norm_ on the unsharded model in one process, identical on every rank, in at
  most one collective. torch itself refuses grads on different meshes in one call.
* PP x FSDP: two pipeline stages (ranks {0, 1} and {2, 3}), each FSDP2-sharded over its own pair,
  combined with ``group=`` (the world: one collective; the pipeline group {0, 2} / {1, 3}: two):
  every rank of both stages gets the same total and clip coefficient bit for bit, equal to torch
  on the unsharded model; torch's own recipe for this layout (get_total_norm per stage, gather, a
  second all-reduce over the pipeline group) is counted alongside.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import fusedclip
from fusedclip import engine
from fusedclip.norm_type import parse_norm_type
from test_distributed import _launch, fully_shard_linears
from test_distributed_collectives import _counted, _input

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

MAX_NORM = 0.2
E, D, H = 4, 12, 16  # experts, model width, expert hidden width


def _gather_equal(tensor):
    """Every rank's value of a 0-d or 1-d tensor, asserted identical bit for bit."""
    tensor = tensor.reshape(-1).double()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    assert all(torch.equal(g, tensor) for g in gathered), gathered


def _coef(grads, norm_type, group=None):
    return engine.total_norm(engine.prepare(grads, group=group), parse_norm_type(norm_type), MAX_NORM).coef


# -- EP-style -------------------------------------------------------------------------------------


def _dense():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.GELU(), torch.nn.Linear(32, D))


def _expert_grads():
    gen = torch.Generator().manual_seed(5)
    # the experts' grads scaled apart, so a lost or doubled expert would show in the total
    return [torch.randn(E, D, H, generator=gen) * 0.3, torch.randn(E, H, D, generator=gen) * 2.0, torch.randn(E, H, generator=gen)]


def _ep_reference(norm_type):
    dense = _dense()
    dense(_input()).pow(2).sum().backward()
    grads = [p.grad for p in dense.parameters()] + _expert_grads()
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    total = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, norm_type)
    return total, [p.grad for p in params]


def _ep_model(dp_mesh, ep_mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dense = _dense()
    fully_shard(dense[0], mesh=dp_mesh)
    fully_shard(dense[2], mesh=dp_mesh)
    fully_shard(dense, mesh=dp_mesh)
    dense(_input()).pow(2).sum().backward()
    # experts: sharded over "ep" by expert; w1 and w2 also FSDP-sharded over "edp", the bias replicated there
    layouts = [[Shard(1), Shard(0)], [Shard(2), Shard(0)], [Replicate(), Shard(0)]]
    experts = []
    for g, placements in zip(_expert_grads(), layouts):
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), ep_mesh, placements))
        p.grad = distribute_tensor(g, ep_mesh, placements)
        experts.append(p)
    return list(dense.parameters()) + experts


def _ep_case(dp_mesh, ep_mesh):
    for norm_type in (2.0, 1.0, math.inf, 3.0):
        expected, expected_grads = _ep_reference(norm_type)
        params = _ep_model(dp_mesh, ep_mesh)
        total, count = _counted(fusedclip.clip_grad_norm_, params, MAX_NORM, norm_type)
        assert count <= 1, (norm_type, count)
        torch.testing.assert_close(total.to_local(), expected, rtol=2e-6, atol=0)
        _gather_equal(total.to_local())
        for p, ref in zip(params, expected_grads):
            torch.testing.assert_close(p.grad.full_tensor(), ref, rtol=2e-6, atol=1e-9)
        _gather_equal(_coef([p.grad for p in _ep_model(dp_mesh, ep_mesh)], norm_type))

    # per-tensor norms: each the unsharded grad's, from the same collective
    params = _ep_model(dp_mesh, ep_mesh)
    (_, per_tensor), count = _counted(fusedclip.get_norms, [p.grad for p in params], 2.0)
    assert count == 1
    expected = torch.stack([torch.linalg.vector_norm(g.full_tensor().double()) for g in (p.grad for p in params)]).float()
    torch.testing.assert_close(per_tensor, expected, rtol=2e-6, atol=0)

    # torch refuses grads on different meshes in one call (recorded: it raises, it does not clip)
    params = _ep_model(dp_mesh, ep_mesh)
    before = [p.grad.to_local().clone() for p in params]
    with pytest.raises(RuntimeError, match="same mesh"):  # aten.stack of the per-mesh norms
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    assert all(torch.equal(p.grad.to_local(), b) for p, b in zip(params, before))


# -- PP x FSDP ------------------------------------------------------------------------------------


def _stages():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.GELU()), torch.nn.Sequential(torch.nn.Linear(32, 8))


def _pp_reference(norm_type):
    first, second = _stages()
    second(first(_input())).pow(2).sum().backward()
    params = list(first.parameters()) + list(second.parameters())
    total = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, norm_type)
    return total, [p.grad for p in params], [len(list(first.parameters()))]


def _pp_stage(stage, dp_mesh):
    """This rank's stage, FSDP2-sharded over its pair; the other stage's role in backward (the
    activation it sends or the gradient it returns) is played by an unsharded local copy."""
    from torch.distributed.fsdp import fully_shard

    first, second = _stages()
    x = _input()
    if stage == 0:
        fully_shard_linears(first, dp_mesh)
        h = first(x)
        boundary = h.detach().requires_grad_()
        second(boundary).pow(2).sum().backward()  # the gradient stage 1 would send back
        h.backward(boundary.grad)
        return list(first.parameters())
    fully_shard(second[0], mesh=dp_mesh)
    fully_shard(second, mesh=dp_mesh)
    with torch.no_grad():
        h = first(x)  # the activation stage 0 would send
    second(h).pow(2).sum().backward()
    return list(second.parameters())


def _torch_pp_clip(params, norm_type, pp_group):
    """torch's recipe for pipeline stages of DTensor grads: the stage's norm (gathered to a plain
    tensor), then the stages combined over the pipeline group, then clip with that norm."""
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type).full_tensor()
    if math.isinf(norm_type):
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pp_group)
    else:
        total = total**norm_type
        dist.all_reduce(total, group=pp_group)
        total = total ** (1.0 / norm_type)
    torch.nn.utils.clip_grads_with_norm_(params, MAX_NORM, total)
    return total


def _pp_case(rank, mesh):
    stage = rank // 2
    dp_mesh, pp_group = mesh["dp"], mesh["pp"].get_group()
    counts = {}
    for norm_type in (2.0, 1.0, math.inf, 3.0):
        expected, expected_grads, (split,) = _pp_reference(norm_type)
        mine = expected_grads[:split] if stage == 0 else expected_grads[split:]
        for name, group in (("world", dist.group.WORLD), ("pp", pp_group)):
            params = _pp_stage(stage, dp_mesh)
            total, count = _counted(fusedclip.clip_grad_norm_, params, MAX_NORM, norm_type, group=group)
            counts[name, norm_type] = count
            torch.testing.assert_close(total.to_local(), expected, rtol=2e-6, atol=0)
            _gather_equal(total.to_local())
            for p, ref in zip(params, mine):
                torch.testing.assert_close(p.grad.full_tensor(), ref, rtol=2e-6, atol=1e-9)
            _gather_equal(_coef([p.grad for p in _pp_stage(stage, dp_mesh)], norm_type, group))
        params = _pp_stage(stage, dp_mesh)
        torch_total, torch_count = _counted(_torch_pp_clip, params, norm_type, pp_group)
        counts["torch", norm_type] = torch_count
        torch.testing.assert_close(torch_total, expected, rtol=2e-6, atol=0)
        for name in ("world", "pp"):
            assert counts[name, norm_type] <= torch_count, counts
    for norm_type in (2.0, 1.0, math.inf, 3.0):
        assert counts["world", norm_type] == 1, counts  # every mesh inside the group: one collective
        assert counts["pp", norm_type] == 2, counts  # the meshes first, then the pipeline group

    # per-tensor norms with group=: each stage's grads' unsharded norms (the meshes' collective)
    params = _pp_stage(stage, dp_mesh)
    (total, per_tensor), count = _counted(fusedclip.get_norms, [p.grad for p in params], 2.0, group=dist.group.WORLD)
    assert count == 2, count
    reference = _pp_reference_grads()
    split = len(list(_stages()[0].parameters()))
    mine = reference[:split] if stage == 0 else reference[split:]
    torch.testing.assert_close(per_tensor, torch.stack([torch.linalg.vector_norm(g) for g in mine]), rtol=2e-6, atol=0)
    torch.testing.assert_close(total.to_local(), torch.nn.utils.get_total_norm(reference), rtol=2e-6, atol=0)
    _gather_equal(total.to_local())

    # the comparison can fail: the old rule (each rank's mesh total summed over group) counts
    # every stage once per rank of it when group is the world
    params = _pp_stage(stage, dp_mesh)
    local = fusedclip.get_total_norm([p.grad for p in params]).to_local()
    summed = local.double() ** 2
    dist.all_reduce(summed)
    torch.testing.assert_close(summed.sqrt().float(), math.sqrt(2) * torch.nn.utils.get_total_norm(reference), rtol=2e-6, atol=0)
    return counts


def _pp_reference_grads():
    first, second = _stages()
    second(first(_input())).pow(2).sum().backward()
    return [p.grad for p in list(first.parameters()) + list(second.parameters())]


def _four_process_layouts(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    dp_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    ep_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("edp", "ep"))
    _ep_case(dp_mesh, ep_mesh)
    _pp_case(rank, init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp")))


def test_ep_and_pp_fsdp_layouts_match_single_process_torch():
    _launch(_four_process_layouts, 4)
