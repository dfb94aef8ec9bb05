"""Per-tensor norms of DTensor grads (fusedclip.get_norms) on gloo, against single-process torch.

Every process compares each grad's norm with ``torch.linalg.vector_norm`` of the same grad of the
unsharded model computed in one process (and, tighter, with the norm of the gathered grad), checks
that every rank got the same values bit for bit, and counts collectives with CommDebugMode: the
per-tensor accumulators travel in the same all-reduce as the total.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import fusedclip
import fusedclip.distributed
from test_distributed import _launch, fully_shard_linears
from test_distributed_collectives import _counted, _input, _mlp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

NORM_TYPES = (2.0, 1.0, math.inf, -math.inf, 3.0, 0.5)


def _reference_grads(extra_norm=False):
    model = _mlp(extra_norm)
    model(_input()).pow(2).sum().backward()
    return [p.grad for p in model.parameters()]


def _same_on_every_rank(tensor):
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    assert all(torch.equal(other, tensor) for other in gathered), gathered


def _rounding_allowance(full, reference, norm_type):
    """How far a norm of ``full`` may be from that of ``reference`` because the grads themselves
    differ (sharded backward sums in another order): the norm of the difference (the triangle
    inequality; for p < 1 with its quasi-norm constant; max |difference| for -inf)."""
    order = norm_type if norm_type > 0 else math.inf
    constant = 2.0 ** max(1.0 / norm_type - 1.0, 0.0) if norm_type > 0 else 1.0
    return torch.linalg.vector_norm((full.double() - reference.double()), order) * constant


def _check_norms(grads, reference, norm_type, *, rtol=2e-6):
    """get_norms on DTensor grads against the unsharded reference; returns the collective count."""
    (total, per_tensor), count = _counted(fusedclip.get_norms, grads, norm_type)
    full = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]
    expected = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in reference])
    allowance = torch.stack([_rounding_allowance(f, r, norm_type) for f, r in zip(full, reference)])
    excess = (per_tensor.double() - expected.double()).abs() - allowance - rtol * expected.double().abs()
    assert bool((excess <= 0).all()), (norm_type, per_tensor, expected, allowance)
    # against the norms of their own gathered values (float64) the bound is the accumulation's
    exact = torch.stack([torch.linalg.vector_norm(g.double(), norm_type) for g in full]).float()
    torch.testing.assert_close(per_tensor, exact, rtol=2e-6, atol=0)
    expected_total = torch.nn.utils.get_total_norm(reference, norm_type).double()
    flat = [torch.cat([g.reshape(-1) for g in grads_]) for grads_ in (full, reference)]
    total_allowance = _rounding_allowance(*flat, norm_type) + rtol * expected_total.abs()
    assert abs(total.to_local().double() - expected_total) <= total_allowance, (norm_type, total, expected_total)
    _same_on_every_rank(per_tensor)
    _same_on_every_rank(total.to_local().reshape(1))
    return count


def _two_process_norms(rank, world_size):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    model = _mlp()
    fully_shard_linears(model, mesh)
    model(_input()).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    reference = _reference_grads()
    for norm_type in NORM_TYPES:
        assert _check_norms(grads, reference, norm_type) == 1, norm_type

    # grads on two equal but distinct meshes, sharded and replicated, plus a plain local grad
    other = DeviceMesh("cpu", list(range(world_size)))
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(8, 5, generator=gen), torch.randn(6, generator=gen), torch.randn(4, 3, generator=gen)]
    local = torch.randn(5, generator=torch.Generator().manual_seed(10))  # the same on every rank
    layouts = [(mesh, [Shard(0)]), (other, [Replicate()]), (other, [Shard(1)])]
    mixed = [distribute_tensor(g.clone(), m, placements) for g, (m, placements) in zip(full, layouts)] + [local.clone()]
    for norm_type in NORM_TYPES:
        assert _check_norms(mixed, full + [local], norm_type) == 1, norm_type

    # p = 0: per-tensor counts of replicated DTensors are exact; sharded ones are refused
    replicated = [distribute_tensor(g.clone(), other, [Replicate()]) for g in full]
    total, per_tensor = fusedclip.get_norms(replicated, 0.0)
    assert per_tensor.tolist() == [float(torch.count_nonzero(g)) for g in full]
    assert float(total.to_local()) == 3.0
    with pytest.raises(ValueError, match="norm_type=0"):
        fusedclip.get_norms(mixed, 0.0)

    # the comparison can fail: without the replica rule every replica of the replicated grad counts
    original = fusedclip.distributed._is_representative
    fusedclip.distributed._is_representative = lambda grad, coordinate: True
    try:
        _, broken = fusedclip.get_norms(mixed, 1.0)
    finally:
        fusedclip.distributed._is_representative = original
    torch.testing.assert_close(broken[1], world_size * full[1].abs().sum(), rtol=2e-6, atol=0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(broken, torch.stack([g.abs().sum() for g in full + [local]]), rtol=1e-3, atol=0)


def test_per_tensor_norms_of_dtensor_grads_two_processes():
    _launch(_two_process_norms, 2)


def _four_process_norms(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _mlp(extra_norm=True)  # the LayerNorm stays on the dp submesh (replicated over tp)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model[0], mesh=mesh["dp"])
    fully_shard(model[2], mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    model(_input()).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    reference = _reference_grads(extra_norm=True)
    for norm_type in NORM_TYPES:
        assert _check_norms(grads, reference, norm_type) == 1, norm_type

    hsdp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _mlp()
    fully_shard_linears(model, hsdp_mesh)
    model(_input()).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    for norm_type in NORM_TYPES:
        assert _check_norms(grads, _reference_grads(), norm_type) == 1, norm_type


def test_per_tensor_norms_of_fsdp_tp_and_hsdp_grads_four_processes():
    _launch(_four_process_norms, 4)


# -- general p at the edges of float64: the one-collective scale combination ----------------------


def _scaled_reference(grads, p):
    """The p-norm of the concatenated grads in float64, relative to their max |x| (min for p < 0),
    so that |x|^p neither overflows nor underflows: an independent formula for extreme p."""
    flat = torch.cat([g.reshape(-1).double() for g in grads]).abs()
    scale = flat.max() if p > 0 else flat.min()
    return scale * ((flat / scale) ** p).sum() ** (1.0 / p)


def _extreme_general_p(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(7)
    # values near 1e30 on one shard and near 1e-30 on the other: |x|^p leaves float64 for p = 20
    full = [torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)]
    full[0][:3] *= 1e30
    full[0][3:] *= 1e-30
    full[1] *= 1e-20
    grads = [distribute_tensor(g.clone(), mesh, [Shard(0)]) for g in full]
    for p in (20.0, 3.0, 0.5, 1e-3):
        (total, per_tensor), count = _counted(fusedclip.get_norms, grads, p)
        assert count == 1, (p, count)
        torch.testing.assert_close(total.to_local(), _scaled_reference(full, p), rtol=1e-12, atol=0)
        expected = torch.stack([_scaled_reference([g], p) for g in full])
        torch.testing.assert_close(per_tensor, expected, rtol=1e-12, atol=0)
        _same_on_every_rank(per_tensor)
    # the comparison can fail: the pairs summed without bringing them to the common scale
    original = fusedclip.distributed._combine_scaled

    def unscaled(pairs, p, dim=0):
        scales, sums = pairs[..., 0], pairs[..., 1]
        return torch.stack([scales.amax(dim), sums.sum(dim)], -1)

    fusedclip.distributed._combine_scaled = unscaled
    try:
        broken = fusedclip.get_total_norm(grads, 20.0).to_local()
    finally:
        fusedclip.distributed._combine_scaled = original
    assert not torch.isclose(broken, _scaled_reference(full, 20.0), rtol=1e-3)


def test_general_p_at_float64_extremes_in_one_collective():
    _launch(_extreme_general_p, 2)


# -- no host data per call: every device tensor of a layout is built on the device or cached -----


class _HostData:
    """Counts tensors built from host data while active: ``aten.lift_fresh`` (what ``torch.tensor``,
    ``torch.as_tensor`` and indexing with a Python list dispatch; on CUDA each is a blocking
    host-to-device copy) through a dispatch mode, plus direct calls of ``torch.tensor`` /
    ``torch.as_tensor`` with non-tensor data, recording where fusedclip made them."""

    def __init__(self):
        self.sites: list[str] = []

    def _site(self):
        import traceback

        frames = [f for f in traceback.extract_stack()[:-2] if "/fusedclip/" in f.filename.replace("\\", "/")]
        return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else None

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.lift_fresh.default:
                    outer.sites.append(outer._site() or "lift_fresh outside fusedclip")
                return func(*args, **(kwargs or {}))

        self._originals = (torch.tensor, torch.as_tensor)

        def spy(real):
            def counted(data, *args, **kwargs):
                if not isinstance(data, torch.Tensor):
                    outer.sites.append(outer._site() or "outside fusedclip")
                return real(data, *args, **kwargs)

            return counted

        torch.tensor, torch.as_tensor = (spy(real) for real in self._originals)
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        torch.tensor, torch.as_tensor = self._originals


def _steady_state_host_data(calls):
    """Host-data constructions in each call's third run (two warm-up runs first)."""
    found = {}
    for name, call in calls:
        call()
        call()
        with _HostData() as spy:
            call()
        found[name] = spy.sites
    return found


def _no_host_data(rank, world_size):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    other = DeviceMesh("cpu", list(range(world_size)))
    gen = torch.Generator().manual_seed(5)
    full = [torch.randn(8, 5, generator=gen), torch.randn(6, generator=gen), torch.randn(4, 3, generator=gen)]
    layouts = [(mesh, [Shard(0)]), (other, [Replicate()]), (mesh, [Shard(1)])]
    local = torch.randn(5, generator=torch.Generator().manual_seed(10))

    def grads():
        return [distribute_tensor(g.clone(), m, p) for g, (m, p) in zip(full, layouts)] + [local.clone()]

    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads()]

    def clip(norm_type):
        for param, grad in zip(params, grads()):
            param.grad = grad
        fusedclip.clip_grad_norm_(params, 0.5, norm_type)

    dgrads = grads()
    plain = [g.to_local().clone() for g in dgrads[:1]] + [local.clone()]
    calls = []
    for norm_type in (2.0, 1.0, math.inf, -math.inf, 3.0):
        calls += [
            (f"get_total_norm p={norm_type}", lambda p=norm_type: fusedclip.get_total_norm(dgrads, p)),
            (f"get_norms p={norm_type}", lambda p=norm_type: fusedclip.get_norms(dgrads, p)),
            (f"clip_grad_norm_ p={norm_type}", lambda p=norm_type: clip(p)),
            (f"get_norms group= p={norm_type}", lambda p=norm_type: fusedclip.get_norms(dgrads, p, group=dist.group.WORLD)),
            (f"get_total_norm plain group= p={norm_type}", lambda p=norm_type: fusedclip.get_total_norm(plain, p, group=dist.group.WORLD)),
        ]
    found = _steady_state_host_data(calls)
    assert all(not sites for sites in found.values()), {name: sites for name, sites in found.items() if sites}

    # the counter can fail: index tensors built from the Python lists on every call are caught
    original = fusedclip.distributed._device_index
    fusedclip.distributed._device_index = lambda positions, device: torch.tensor(list(positions), device=device)
    try:
        planted = _steady_state_host_data(calls[:2])
    finally:
        fusedclip.distributed._device_index = original
    assert planted["get_norms p=2.0"] and all("distributed.py" in site for site in planted["get_norms p=2.0"]), planted
    # ... and so is a list used as an index (it goes through lift_fresh, not torch.tensor)
    with _HostData() as spy:
        torch.zeros(4)[[0, 2]]
    assert len(spy.sites) == 1, spy.sites


def test_dtensor_calls_build_no_tensor_from_host_data_in_steady_state():
    _launch(_no_host_data, 2)


def test_device_index_cache_is_bounded():
    cache = fusedclip.distributed._DEVICE_INDICES
    cache.clear()
    first = fusedclip.distributed._device_index([0, 2], torch.device("cpu"))
    assert fusedclip.distributed._device_index((0, 2), torch.device("cpu")) is first
    for n in range(2 * fusedclip.distributed._INDEX_CACHE_SIZE):
        assert fusedclip.distributed._device_index(range(n), torch.device("cpu")).tolist() == list(range(n))
    assert len(cache) == fusedclip.distributed._INDEX_CACHE_SIZE
    cache.clear()


def _clipper_on_fsdp2(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    reference_model = _mlp()
    reference_model(_input()).pow(2).sum().backward()
    named_reference = list(reference_model.named_parameters())
    model = _mlp()
    fully_shard_linears(model, mesh)
    model(_input()).pow(2).sum().backward()

    clipper = fusedclip.Clipper(model.named_parameters(), "norm", max_norm=0.25, top_k=3)
    total, count = _counted(clipper)
    assert count <= 1, count  # the total and the per-tensor norms (for top-k) in one all-reduce
    expected_norms = torch.stack([torch.linalg.vector_norm(p.grad) for _, p in named_reference])
    expected_total = torch.nn.utils.clip_grad_norm_([p for _, p in named_reference], 0.25)
    torch.testing.assert_close(total.to_local().double(), expected_total.double(), rtol=2e-5, atol=0)
    for (name, param), (ref_name, ref_param) in zip(model.named_parameters(), named_reference):
        assert name == ref_name
        torch.testing.assert_close(param.grad.full_tensor(), ref_param.grad, rtol=2e-5, atol=1e-7)
    summary = clipper.summary()
    top = sorted(zip((n for n, _ in named_reference), expected_norms.tolist()), key=lambda item: -item[1])[:3]
    assert [name for name, _ in summary["top_params"]] == [name for name, _ in top]
    for (_, ours), (_, theirs) in zip(summary["top_params"], top):
        assert ours == pytest.approx(theirs, rel=2e-5)
    _same_on_every_rank(clipper.state["param_norms"])
    _same_on_every_rank(total.to_local().reshape(1))


def test_clipper_statistics_of_fsdp2_grads_two_processes():
    """Clipper on FSDP2 grads: the total, the clipped grads and the top-k parameters by global
    norm match single-process torch on the unsharded model, identical on every rank, in one
    collective per call."""
    _launch(_clipper_on_fsdp2, 2)
