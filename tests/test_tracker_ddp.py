"""NormTracker on DistributedDataParallel (gloo, 2 CPU processes): norms taken from the reduced
buckets in a communication hook, checked on every rank against torch.nn.utils.clip_grad_norm_ on the
same DDP model's grads after backward (total within test_tracker.py's tolerance, clipped grads equal).

Covered: no_sync micro-batches, find_unused_parameters (a locally unused branch, a globally unused
parameter holding a stale grad that differs per rank), static_graph, gradient_as_bucket_view,
several buckets, the fp16 compression hook, a grad edited after backward; and a deliberately broken
tracker (norms of the bucket before the all-reduce), which must fail.

A tracker given the DDP model's parameters rather than the module, with a communication hook that
all-reduces the bucket in place (no version bump) and bucket views as grads: the views' hook values
are not trusted (recomputed), while the module route keeps its bucket values; a tracker without the
shared-memory rule must fail.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fusedclip.tracker import NormTracker

from test_distributed import _launch

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


def torch_clip(params, max_norm, norm_type):
    """torch's total and the clipped grads, on copies of the grads."""
    holders = []
    for p in params:
        if p.grad is not None:
            h = torch.zeros_like(p.grad)
            h.grad = p.grad.detach().clone()
            holders.append(h)
    total = torch.nn.utils.clip_grad_norm_(holders, max_norm, norm_type)
    return total, [h.grad for h in holders]


def check_against_torch(tracker, params, norm_type, max_norm=0.05):
    """tracker.clip_ against torch's clip_grad_norm_ of the same grads (raises AssertionError)."""
    expected, clipped = torch_clip(params, max_norm, norm_type)
    total = tracker.clip_(max_norm)
    tol = 1e-12 if expected.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(total, expected, rtol=tol, atol=0)
    for got, want in zip([p.grad for p in params if p.grad is not None], clipped):
        torch.testing.assert_close(got, want, rtol=10 * tol, atol=1e-9)


class Branchy(nn.Module):
    def __init__(self, dtype, never=True):
        super().__init__()
        self.a = nn.Linear(6, 16, dtype=dtype)
        self.b = nn.Linear(16, 16, dtype=dtype)
        self.c = nn.Linear(16, 4, dtype=dtype)
        self.branch = nn.Linear(16, 4, dtype=dtype)
        if never:
            self.never = nn.Linear(16, 4, dtype=dtype)  # used by no rank (find_unused / static graph only)

    def forward(self, x, use_branch):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        out = self.c(h)
        if use_branch:
            out = out + self.branch(h)
        return out.pow(2).sum()


def _case(rank, *, as_view, find_unused, static, hook, norm_type, dtype, micro):
    torch.manual_seed(0)
    net = Branchy(dtype, never=find_unused or static)
    ddp = nn.parallel.DistributedDataParallel(
        net, gradient_as_bucket_view=as_view, find_unused_parameters=find_unused, static_graph=static, bucket_cap_mb=0.0005
    )
    tracker = NormTracker(ddp, norm_type, comm_hook=hook)
    assert tracker.tracking and tracker.hooked == 0
    params = list(net.parameters())
    from_buckets = []
    for step in range(3):
        torch.manual_seed(100 + rank + 10 * step)
        for i in range(micro):
            # find_unused: the branch runs on rank 0 only in odd steps (locally unused, globally used)
            use_branch = (rank == 0 and step % 2 == 1) if find_unused else True
            x = torch.randn(3, 6, dtype=dtype)
            if i < micro - 1:
                with ddp.no_sync():
                    ddp(x, use_branch).backward()
            else:
                if (find_unused or static) and step == 1:
                    # a stale grad on a parameter no rank uses: DDP reduces it in its bucket but does
                    # not write it back, so the grad (different per rank) is what counts
                    net.never.weight.grad = torch.full_like(net.never.weight, float(rank + 1))
                ddp(x, use_branch).backward()
        if step == 2:
            net.b.weight.grad.mul_(3.0)  # edited after the hook: recomputed
        from_buckets.append(sum(r is not None for r in tracker._records))
        check_against_torch(tracker, params, norm_type)
        ddp.zero_grad(set_to_none=not as_view)
    return from_buckets


CASES = [
    dict(as_view=False, find_unused=False, static=False, hook=None, norm_type=2.0, dtype=torch.float32, micro=1),
    dict(as_view=True, find_unused=False, static=False, hook=None, norm_type=1.0, dtype=torch.float32, micro=2),
    dict(as_view=False, find_unused=True, static=False, hook=None, norm_type=2.0, dtype=torch.float32, micro=3),
    dict(as_view=True, find_unused=True, static=False, hook=None, norm_type=math.inf, dtype=torch.float64, micro=2),
    dict(as_view=False, find_unused=False, static=True, hook=None, norm_type=2.0, dtype=torch.float32, micro=1),  # DDP itself fails on no_sync in a static graph
    dict(as_view=True, find_unused=False, static=True, hook=None, norm_type=2.0, dtype=torch.float64, micro=1),
    dict(as_view=False, find_unused=False, static=False, hook="fp16", norm_type=2.0, dtype=torch.float32, micro=2),
]


def _all_cases(rank, world_size):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    out = []
    for case in CASES:
        case = dict(case, hook=fp16_compress_hook if case["hook"] == "fp16" else None)
        out.append(_case(rank, **case))
    return out


def test_ddp_norm_is_of_the_reduced_grads():
    results = _launch(_all_cases, WORLD)
    assert len(results) == WORLD
    for _, counts in results:
        for case, per_step in zip(CASES, counts):
            # the buckets supplied values (not a silent full recomputation): all but the edited /
            # stale / locally-only grads; static graph's first step reduces inside DDP's finalisation
            first = 1 if case["static"] else 0
            assert all(n > 0 for n in per_step[first:]), (case, per_step)


# -- a deliberately broken tracker must fail --------------------------------------------------------


class PreReduceTracker(NormTracker):
    """Deliberately broken: takes each bucket's norms from its local grads, before the all-reduce."""

    def ddp_comm_hook(self, inner=None):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        inner = inner or allreduce_hook
        self._comm_active = True

        class Local:
            def __init__(self, value):
                self._value = value

            def value(self):
                return self._value

        def hook(state, bucket):
            generation = self._arm(bucket)
            layout = self._layout(bucket)
            self._bucket_reduced(Local(bucket.buffer().clone()), layout, generation)
            return inner(state, bucket)

        return hook


def _broken_case(rank, world_size):
    outcomes = []
    for cls in (NormTracker, PreReduceTracker):
        torch.manual_seed(0)
        net = Branchy(torch.float32, never=False)
        ddp = nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.0005)
        tracker = cls(ddp)
        torch.manual_seed(7 + rank)  # different data per rank: local and reduced grads differ
        ddp(torch.randn(3, 6), True).backward()
        try:
            check_against_torch(tracker, list(net.parameters()), 2.0)
            outcomes.append("ok")
        except AssertionError:
            outcomes.append("mismatch")
    return outcomes


def test_a_tracker_reading_buckets_before_the_all_reduce_is_caught():
    for _, outcomes in _launch(_broken_case, WORLD):
        assert outcomes == ["ok", "mismatch"]


# -- refusals ---------------------------------------------------------------------------------------


def _refusal_case(rank, world_size):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    net = nn.Linear(3, 3)
    ddp = nn.parallel.DistributedDataParallel(net)
    ddp.register_comm_hook(None, allreduce_hook)
    try:
        NormTracker(ddp)
    except ValueError as e:
        assert "already has a communication hook" in str(e)
    else:
        raise AssertionError("a DDP module with a hook was accepted")
    # composing by hand with the user's hook
    ddp2 = nn.parallel.DistributedDataParallel(nn.Linear(3, 3))
    tracker = NormTracker(ddp2, register_comm_hook=False)
    ddp2.register_comm_hook(None, tracker.ddp_comm_hook(allreduce_hook))
    torch.manual_seed(rank)
    ddp2(torch.randn(2, 3)).sum().backward()
    assert all(r is not None for r in tracker._records)
    check_against_torch(tracker, list(ddp2.parameters()), 2.0)
    tracker.remove()  # the hook becomes a pass-through
    ddp2(torch.randn(2, 3)).sum().backward()
    assert all(r is None for r in tracker._records)
    check_against_torch(tracker, list(ddp2.parameters()), 2.0)
    return "ok"


def test_refusals_and_hand_registered_hook():
    assert [r for _, r in _launch(_refusal_case, WORLD)] == ["ok"] * WORLD
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        NormTracker(nn.Linear(2, 2), comm_hook=lambda s, b: None)
    with pytest.raises(ValueError, match="ddp_comm_hook"):
        NormTracker(nn.Linear(2, 2)).ddp_comm_hook()


# -- a tracker given the DDP model's parameters (not the module) -----------------------------------


def _inplace_sum_hook(state, bucket):
    """All-reduces the bucket in place (c10d bumps no version) and returns it: a plain sum."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def _inplace_mean_hook(state, bucket):
    """Like DDP's default: all-reduce in place, then the average in a new tensor."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0] / dist.get_world_size())


def _params_route_case(rank, world_size, planted):
    """Returns, per (hook, as_view, route), the per-step outcome: 'ok' or 'mismatch', and how many
    hook or bucket values were trusted."""
    import fusedclip.tracker as tracker_module

    if planted:  # a deliberately broken tracker: hook values of grads sharing memory trusted
        tracker_module._shares_storage = lambda grad: False
    out = []
    for hook in (_inplace_sum_hook, _inplace_mean_hook):
        for as_view in (True, False):
            for route in ("params", "module"):
                torch.manual_seed(0)
                net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
                ddp = nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=as_view, bucket_cap_mb=0.0005)
                if route == "params":
                    ddp.register_comm_hook(None, hook)
                    tracker = NormTracker(list(ddp.parameters()), min_numel=0)
                else:
                    tracker = NormTracker(ddp, comm_hook=hook, comm_state=None)
                params = list(net.parameters())
                for step in range(3):
                    torch.manual_seed(100 + rank + 10 * step)  # different data per rank
                    for _ in range(2 if step == 1 else 1):
                        if step == 1:
                            with ddp.no_sync():
                                ddp(torch.randn(3, 16)).pow(2).sum().backward()
                        ddp(torch.randn(3, 16)).pow(2).sum().backward()
                    if as_view and step > 0:  # the grads are views of DDP's buckets
                        assert all(p.grad._base is not None for p in params)
                    trusted = sum(tracker._record_matches(i, p.grad) for i, p in enumerate(tracker.params))
                    try:
                        check_against_torch(tracker, params, 2.0)
                        outcome = "ok"
                    except AssertionError:
                        outcome = "mismatch"
                    out.append((hook.__name__, as_view, route, step, outcome, trusted))
                    ddp.zero_grad(set_to_none=not as_view)
    return out


@pytest.mark.parametrize("planted", [False, True])
def test_tracker_over_ddp_parameters_with_an_inplace_all_reduce(planted):
    for rank, rows in _launch(_params_route_case, WORLD, planted):
        for hook, as_view, route, step, outcome, trusted in rows:
            where = (rank, hook, as_view, route, step)
            if route == "module":
                # the module route reads the reduced bucket: its values count, views or not
                assert outcome == "ok" and trusted > 0, where
            elif not as_view:
                assert outcome == "ok" and trusted == 0, where  # DDP's copy_ into the grads bumps
            elif not planted:
                assert outcome == "ok" and trusted == 0, where  # bucket views: recomputed
            elif hook == "_inplace_mean_hook":
                assert outcome == "ok", where  # DDP copies the hook's new tensor into the bucket: bumps
            elif step > 0:
                # the rule away: hook values of the bucket views, taken before the in-place
                # all-reduce rewrote them unversioned, count
                assert outcome == "mismatch" and trusted > 0, where
