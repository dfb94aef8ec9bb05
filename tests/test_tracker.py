"""NormTracker: norms accumulated in post-accumulate-grad hooks, checked against torch's
clip_grad_norm_ computed after backward, where hooks are tricky (micro-batches, edits after the
hook, set_to_none, unused/frozen/tied parameters, GradScaler.unscale_, grads sharing memory written
without a version bump, an optimizer owning part of the tracked model); DDP is in test_tracker_ddp.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip.tracker import NormTracker
from conftest import require_backend


def torch_clip(params, max_norm, norm_type):
    """torch's total and the grads it leaves, on copies (the originals stay untouched)."""
    grads = [p.grad.detach().clone() for p in params if p.grad is not None]
    holders = []
    for g in grads:
        h = torch.zeros_like(g, requires_grad=False)
        h.grad = g
        holders.append(h)
    total = torch.nn.utils.clip_grad_norm_(holders, max_norm, norm_type)
    return total, [h.grad for h in holders]


def assert_matches_torch(tracker, params, norm_type=2.0, max_norm=0.5):
    expected, clipped = torch_clip(params, max_norm, norm_type)
    result = tracker.result(max_norm)
    assert result.total.dtype == expected.dtype
    tol = 1e-12 if expected.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(result.total, expected, rtol=tol, atol=0)
    coef = float(torch.clamp(max_norm / (expected.double() + 1e-6), max=1.0))
    assert math.isclose(float(result.coef), coef, rel_tol=10 * tol)
    return result


class Net(torch.nn.Module):
    def __init__(self, widths, tied, dtype):
        super().__init__()
        self.emb = torch.nn.Embedding(7, widths[0], dtype=dtype)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, dtype=dtype) for a, b in zip(widths, widths[1:]))
        self.head = torch.nn.Linear(widths[-1], 7, bias=False, dtype=dtype)
        if tied and widths[-1] == widths[0]:
            self.head.weight = self.emb.weight  # one parameter reached twice

    def forward(self, tokens, use):
        x = self.emb(tokens)
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x)) if use[i % len(use)] or layer.in_features != layer.out_features else x
        return self.head(x).pow(2).mean()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.sampled_from([4, 8]),
    depth=st.integers(1, 4),
    tied=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    norm_type=st.sampled_from([2.0, 1.0, math.inf]),
    micro=st.lists(st.lists(st.booleans(), min_size=1, max_size=4), min_size=1, max_size=3),
    set_to_none_before_last=st.booleans(),
    edits=st.lists(st.tuples(st.integers(0, 20), st.sampled_from(["mul", "replace", "none", "add"])), max_size=3),
    seed=st.integers(0, 2**16),
    min_numel=st.sampled_from([0, 16]),
)
def test_matches_torch_after_backward(width, depth, tied, dtype, norm_type, micro, set_to_none_before_last, edits, seed, min_numel):
    torch.manual_seed(seed)
    net = Net([width] * (depth + 1), tied, dtype)
    frozen = list(net.parameters())[-1]
    tracker = NormTracker(net, norm_type, min_numel=min_numel)
    params = list(net.parameters())
    for step in range(2):  # the second step checks that nothing of the first one leaks
        for i, use in enumerate(micro):
            if set_to_none_before_last and i == len(micro) - 1:
                net.zero_grad(set_to_none=True)
            net(torch.randint(0, 7, (3, 2)), use).backward()
        for index, kind in edits:  # modified after their hooks ran
            p = params[index % len(params)]
            if p.grad is None:
                continue
            if kind == "mul":
                p.grad.mul_(3.0)
            elif kind == "add":
                p.grad[..., 0] += 1.0
            elif kind == "replace":
                p.grad = torch.randn_like(p.grad)
            else:
                p.grad = None
        if step == 1 and frozen.grad is not None:  # a frozen tensor with a grad still counts, as in torch
            frozen.requires_grad_(False)
        assert_matches_torch(tracker, params, norm_type)
        net.zero_grad(set_to_none=step == 0)
    frozen.requires_grad_(True)


def test_tied_weights_count_once():
    torch.manual_seed(0)
    net = Net([8, 8], tied=True, dtype=torch.float32)
    assert net.head.weight is net.emb.weight
    tracker = NormTracker(list(net.parameters()) + [net.emb.weight], min_numel=0)  # duplicates counted once
    assert len(tracker.params) == len(list(net.parameters()))
    net(torch.randint(0, 7, (4, 3)), [True]).backward()
    assert_matches_torch(tracker, list(net.parameters()))


def test_parameter_unused_in_second_step_does_not_keep_its_value():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    tracker = NormTracker([a, b], min_numel=0)
    ((a * 5).sum() + b.sum()).backward()
    assert_matches_torch(tracker, [a, b])
    a.grad = None
    b.grad = None
    b.sum().backward()  # a has no grad this step; its slot held 5 * sqrt(3)
    result = assert_matches_torch(tracker, [a, b])
    assert math.isclose(float(result.total), math.sqrt(3), rel_tol=1e-6)
    b.grad = None
    assert float(tracker.result(1.0).total) == 0.0  # no grads: tensor(0.), as torch


def test_grad_scaler_scaled_grads_and_unscale():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    tracker = NormTracker(net, min_numel=0)
    scaler.scale(net(torch.randn(4, 6)).pow(2).sum()).backward()
    params = list(net.parameters())
    inv_scale = scaler._scale.double().reciprocal().float()
    # without unscale_: the hooks saw the scaled grads; grad_scale gives the unscaled norm
    expected = torch.nn.utils.get_total_norm([p.grad / 2.0**8 for p in params])
    peek = NormTracker(net)  # a second tracker, hooks registered after backward: recomputes
    for t in (tracker, peek):
        result = t.result(0.5, grad_scale=inv_scale)
        torch.testing.assert_close(result.total, expected, rtol=2e-6, atol=0)
        assert math.isclose(float(result.coef), float(torch.clamp(0.5 / (expected.double() + 1e-6), max=1.0)) / 2.0**8, rel_tol=1e-5)
    peek.remove()
    opt.zero_grad()
    scaler.scale(net(torch.randn(4, 6)).pow(2).sum()).backward()
    scaler.unscale_(opt)  # rewrites every grad in place without bumping its version: invisible ...
    stale = tracker.result(0.5).total
    assert not torch.allclose(stale, torch.nn.utils.get_total_norm([p.grad for p in params]))  # the documented limit
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    scaler.scale(net(torch.randn(4, 6)).pow(2).sum()).backward()
    scaler.unscale_(opt)
    tracker.invalidate()  # ... so the caller says so
    assert_matches_torch(tracker, params)


def test_lstm_and_removed_hooks():
    torch.manual_seed(2)
    lstm = torch.nn.LSTM(5, 7, num_layers=2)
    with NormTracker(lstm, min_numel=0) as tracker:
        assert tracker.tracking
        for _ in range(2):
            out, _ = lstm(torch.randn(4, 3, 5))
            out.pow(2).sum().backward()
        assert_matches_torch(tracker, list(lstm.parameters()))
    assert not tracker.tracking  # no hooks: every grad recomputed at result()
    out, _ = lstm(torch.randn(4, 3, 5))
    out.sum().backward()
    assert_matches_torch(tracker, list(lstm.parameters()))


class VersionBlindTracker(NormTracker):
    """Deliberately broken: trusts any hook value whose grad object is still the same."""

    def _record_matches(self, index, grad):
        record = self._records[index]
        return record is not None and record[1]() is grad


@pytest.mark.parametrize("cls, ok", [(NormTracker, True), (VersionBlindTracker, False)])
def test_a_version_blind_tracker_is_caught(cls, ok):
    torch.manual_seed(3)
    net = torch.nn.Linear(5, 5)
    tracker = cls(net, min_numel=0)
    net(torch.randn(2, 5)).sum().backward()
    net.weight.grad.mul_(10.0)
    if ok:
        assert_matches_torch(tracker, list(net.parameters()))
    else:
        with pytest.raises(AssertionError):
            assert_matches_torch(tracker, list(net.parameters()))


def test_clip_matches_torch_clip():
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    tracker = NormTracker(net, min_numel=0)
    net(torch.randn(4, 6)).pow(2).sum().backward()
    expected_total, expected = torch_clip(list(net.parameters()), 0.1, 2.0)
    total = tracker.clip_(0.1)
    torch.testing.assert_close(total, expected_total, rtol=2e-6, atol=0)
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_clip_and_step_with_tracker(fused, max_norm):
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    ref = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=fused)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    tracker = NormTracker(net, min_numel=0)
    for step in range(3):
        x = torch.randn(4, 6)
        for model in (net, ref):
            model(x).pow(2).sum().backward()
        total = fusedclip.clip_and_step_(opt, max_norm, tracker=tracker)
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        ref_opt.step()
        torch.testing.assert_close(total, expected, rtol=2e-6, atol=0)
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        ref_opt.zero_grad()


def test_clip_and_step_tracker_refusals():
    net = torch.nn.Linear(3, 3)
    other = torch.nn.Parameter(torch.ones(2))
    other.grad = torch.full((2,), 4.0)  # a grad the refused calls would clip
    tracker = NormTracker(net)
    net(torch.ones(1, 3)).sum().backward()
    everything = [*net.parameters(), other]
    before = [(p.detach().clone(), p.grad.clone()) for p in everything]

    def refused(exception, match, optimizer, **kwargs):
        with pytest.raises(exception, match=match):
            fusedclip.clip_and_step_(optimizer, 1e-3, tracker=tracker, **kwargs)
        for p, (data, grad) in zip(everything, before):  # no grad or parameter modified, bit for bit
            assert torch.equal(p.detach().view(torch.int32), data.view(torch.int32))
            assert torch.equal(p.grad.view(torch.int32), grad.view(torch.int32))
        assert not optimizer.state and not hasattr(optimizer, "grad_scale")

    refused(ValueError, "not tracked", torch.optim.SGD(everything, lr=0.1, momentum=0.9))
    refused(ValueError, "differs", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), norm_type=1.0)
    scaler = torch.amp.GradScaler("cpu")
    refused(NotImplementedError, "GradScaler", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), scaler=scaler)
    assert not scaler._per_optimizer_states and scaler._scale is None
    for p in (3.0, 0.0, -math.inf):
        with pytest.raises(NotImplementedError, match="norm_type"):
            NormTracker(net, p)
    with pytest.raises(TypeError):
        NormTracker([1.0])


def test_small_tensors_get_no_hook_and_still_count():
    torch.manual_seed(6)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    sizes = [p.numel() for p in net.parameters()]  # 4096, 64, 192, 3
    tracker = NormTracker(net, min_numel=192)
    assert tracker.hooked == sum(n >= 192 for n in sizes) == 2
    net(torch.randn(5, 64)).pow(2).sum().backward()
    assert [r is not None for r in tracker._records] == [n >= 192 for n in sizes]  # hooks ran on the big ones only
    assert_matches_torch(tracker, list(net.parameters()))
    assert NormTracker(net).hooked == 0  # the default threshold leaves these tiny tensors to result()
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="min_numel"):
            NormTracker(net, min_numel=bad)
    with pytest.raises(ValueError, match="backend"):
        NormTracker(net, backend="no-such-backend")


# -- grads whose memory other tensors can write without a version bump ------------------------------


def _unversioned_scale(grad, factor):
    """Multiply the whole storage under ``grad`` by ``factor`` through a fresh alias built on that
    storage: ``grad._version`` (and its views') stays as it is, as after an in-place collective."""
    storage = grad.untyped_storage()
    alias = torch.empty(0, dtype=grad.dtype).set_(storage, 0, (storage.nbytes() // grad.element_size(),))
    alias.mul_(factor)


def _shared_layout(layout):
    """A model whose first two parameters' grads share memory with other tensors, plus an ordinary
    Linear whose grads own their storage; returns (params, loss function, the write after backward)."""
    torch.manual_seed(11)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(5))
    lin = torch.nn.Linear(3, 2)
    params = [a, b, *lin.parameters()]
    weights = torch.randn(17)

    def loss(x):
        return (torch.cat([a.view(-1), b]) * weights).sum() * x.sum() + lin(x).pow(2).sum()

    if layout == "flat_buffer":
        # a flat grad buffer whose views are the grads (DDP's gradient_as_bucket_view, Megatron-style
        # contiguous buffers): autograd accumulates into the views; the buffer is then written as a whole
        flat = torch.zeros(17)
        a.grad, b.grad = flat[:12].view(4, 3), flat[12:]

        def write(factor):
            flat.data.mul_(factor)  # .data: its own version counter

    elif layout == "whole_view":
        # each grad is a view of a tensor exactly its size: the alias is the base (``_base`` set)
        bases = [torch.zeros(12), torch.zeros(5)]
        a.grad, b.grad = bases[0].view(4, 3), bases[1].view(5)

        def write(factor):
            for base in bases:
                base.numpy()[...] *= factor  # numpy's view of the memory: no version counter at all

    else:  # "autograd_slices": the concatenation's backward hands each parameter a slice of one buffer
        a.grad = b.grad = None

        def write(factor):
            _unversioned_scale(b.grad, factor)

    return params, loss, write


PLANTED_RULES = {
    "correct": None,
    "no rule": lambda grad: False,
    "views only": lambda grad: grad._base is not None,
    "storage size only": lambda grad: grad.untyped_storage().nbytes() != grad.nbytes,
}


@pytest.mark.parametrize("rule", list(PLANTED_RULES))
@pytest.mark.parametrize("layout", ["flat_buffer", "whole_view", "autograd_slices"])
def test_grads_sharing_memory_written_without_a_version_bump(layout, rule, monkeypatch):
    if PLANTED_RULES[rule] is not None:  # a deliberately broken tracker: the rule (partly) away
        monkeypatch.setattr(fusedclip.tracker, "_shares_storage", PLANTED_RULES[rule])
    params, loss, write = _shared_layout(layout)
    a, b = params[:2]
    tracker = NormTracker(params, min_numel=0)
    for step in range(2):
        for _ in range(2):  # micro-batches: accumulated in place
            loss(torch.randn(3, 3)).backward()
        if layout == "autograd_slices":
            assert a.grad._base is None and a.grad.untyped_storage().data_ptr() == b.grad.untyped_storage().data_ptr()
        versions = [p.grad._version for p in params]
        write(3.0 + step)
        assert [p.grad._version for p in params] == versions  # the write is invisible to the version check
        assert all(r is not None for r in tracker._records[2:])  # ordinary grads keep their hook values
        missed = {
            "flat_buffer": rule == "no rule",
            "whole_view": rule in ("no rule", "storage size only"),
            "autograd_slices": rule in ("no rule", "views only"),
        }[layout]
        if missed:
            with pytest.raises(AssertionError):
                assert_matches_torch(tracker, params)
            return
        assert tracker._records[0] is None and tracker._records[1] is None  # no hook value was taken
        assert_matches_torch(tracker, params)
        for p in params:
            p.grad.zero_()


def test_shared_storage_rule_on_common_grads():
    """The rule leaves ordinary autograd grads alone (their hook values count) and catches slices."""
    from fusedclip.tracker import _shares_storage

    torch.manual_seed(12)
    lstm = torch.nn.LSTM(3, 4)
    conv = torch.nn.Conv2d(2, 3, 3)
    emb = torch.nn.Embedding(5, 4)
    mha = torch.nn.MultiheadAttention(4, 2)
    lstm(torch.randn(2, 1, 3))[0].sum().backward()
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    emb(torch.tensor([1, 2])).sum().backward()
    t = torch.randn(3, 1, 4)
    mha(t, t, t)[0].sum().backward()
    for module in (lstm, conv, emb, mha):
        for p in module.parameters():
            assert not _shares_storage(p.grad)
    assert _shares_storage(torch.zeros(6)[2:4])
    assert _shares_storage(torch.zeros(6).view(2, 3))
    assert _shares_storage(torch.zeros(1).expand(4))  # overlapping: reads its memory more than once
    assert not _shares_storage(torch.zeros(3, 4).t().contiguous())


# -- clip_and_step_ with a tracker over more than the optimizer's parameters -------------------------


class AllTrackedTracker(NormTracker):
    """Deliberately broken: counts every tracked grad whatever ``params`` asks for."""

    def result(self, max_norm=None, *, grad_scale=None, params=None):
        return super().result(max_norm, grad_scale=grad_scale)


@pytest.mark.parametrize("cls, ok", [(NormTracker, True), (AllTrackedTracker, False)])
@pytest.mark.parametrize("fused", [True, False])
def test_clip_and_step_counts_only_the_optimizers_parameters(cls, ok, fused):
    torch.manual_seed(13)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ref = copy.deepcopy(net)
    opt = torch.optim.AdamW(net[0].parameters(), lr=0.1, fused=fused)  # owns part of the model
    ref_opt = torch.optim.AdamW(ref[0].parameters(), lr=0.1)
    tracker = cls(net, min_numel=0)
    for step in range(3):
        x = torch.randn(4, 8)
        for model in (net, ref):
            (model(x) * 10).pow(2).sum().backward()
        rest = [p.grad.clone() for p in net[2].parameters()]
        total = fusedclip.clip_and_step_(opt, 0.1, tracker=tracker)
        expected = torch.nn.utils.clip_grad_norm_(ref[0].parameters(), 0.1)
        ref_opt.step()
        if not ok:
            assert not torch.allclose(total, expected)
            return
        torch.testing.assert_close(total, expected, rtol=2e-6, atol=0)
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for p, g in zip(net[2].parameters(), rest):  # grads outside the optimizer: not scaled
            assert torch.equal(p.grad, g)
        net.zero_grad()
        ref.zero_grad()


def test_result_over_a_subset_matches_torch():
    torch.manual_seed(14)
    first, second = torch.nn.Linear(6, 9), torch.nn.Linear(9, 3, dtype=torch.float64)
    params = [*first.parameters(), *second.parameters()]
    for subset in (list(second.parameters()), list(first.parameters()), [first.bias, second.weight]):
        tracker = NormTracker(params, min_numel=0)
        second(torch.tanh(first(torch.randn(4, 6))).double()).pow(2).sum().backward()
        expected, _ = torch_clip(subset, 0.5, 2.0)
        result = tracker.result(0.5, params=subset)
        assert result.total.dtype == expected.dtype  # the subset's promoted dtype, as torch's
        tol = 1e-12 if expected.dtype == torch.float64 else 2e-6
        torch.testing.assert_close(result.total, expected, rtol=tol, atol=0)
        assert math.isclose(float(result.coef), float(torch.clamp(0.5 / (expected.double() + 1e-6), max=1.0)), rel_tol=10 * tol)
        assert all(r is None for r in tracker._records)  # the whole step is consumed
        tracker.remove()
        for p in params:
            p.grad = None
    with pytest.raises(ValueError, match="1 of the 2 tensors given are not tracked"):
        tracker.result(params=[first.weight, torch.nn.Parameter(torch.ones(2))])


def test_refused_clip_and_step_touches_nothing():
    torch.manual_seed(15)
    net = torch.nn.Linear(4, 3)
    other = torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.AdamW([*net.parameters(), other], lr=0.1, fused=True)
    tracker = NormTracker(net, min_numel=0)  # tracks fewer than the optimizer owns
    (net(torch.randn(2, 4)).sum() + other.sum()).backward()
    opt.step()  # optimizer state exists
    (net(torch.randn(2, 4)).pow(2).sum() + other.pow(2).sum()).backward()
    before = [t.detach().clone() for p in opt.param_groups[0]["params"] for t in (p, p.grad)]
    state = copy.deepcopy(opt.state_dict())
    records = list(tracker._records)
    with pytest.raises(ValueError, match="1 of the optimizer's 3 parameters are not tracked"):
        fusedclip.clip_and_step_(opt, 0.01, tracker=tracker)
    after = [t for p in opt.param_groups[0]["params"] for t in (p, p.grad)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    after_state = opt.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, after_state["state"][key][name]), name
    assert tracker._records == records  # the step is not consumed either: still usable
    assert_matches_torch(tracker, list(net.parameters()))


def _layout_case(kind: str) -> tuple[torch.Tensor, list[torch.nn.Parameter]]:
    """A base buffer and two parameters whose grads are views of it laid out as ``kind``."""
    buf = torch.arange(1.0, 13.0) * 10
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    if kind == "strided":  # gaps in the buffer that belong to no grad
        p.grad, q.grad = buf[::3], buf[1:5].clone()
    elif kind == "shared":  # one grad under two parameters
        p.grad = q.grad = buf[:4]
    else:  # overlapping views
        p.grad, q.grad = buf[0:4], buf[2:6]
    return buf, [p, q]


def _tracked_layout_step(kind: str, backend: str, tracked: bool) -> list[torch.Tensor]:
    buf, params = _layout_case(kind)
    optimizer = torch.optim.SGD(params, lr=1.0, momentum=0.5, fused=True)
    if tracked:
        tracker = fusedclip.NormTracker(params, backend=backend, min_numel=0)
        fusedclip.clip_and_step_(optimizer, 1.0, tracker=tracker)
    else:
        fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
        optimizer.step()
    return [buf, *(p.detach() for p in params)]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind", ["strided", "shared", "overlapping"])
def test_tracked_step_with_grads_sharing_memory_or_with_gaps(kind, backend, monkeypatch):
    """The tracker route of clip_and_step_ folds the coefficient into the fused optimizer only where
    clip_and_step_ itself would: grads with gaps or sharing memory are scaled first, so the update is
    clip-then-step's and no element outside the grads is written. A fold that ignores the layout
    (the planted bug) writes the gaps or scales shared elements once."""
    require_backend("cpu", backend)
    expected = _tracked_layout_step(kind, backend, tracked=False)
    got = _tracked_layout_step(kind, backend, tracked=True)
    for mine, theirs in zip(got, expected):
        assert torch.allclose(mine, theirs, rtol=1e-6, atol=0), (kind, got, expected)
    monkeypatch.setattr(fusedclip.tracker, "grads_foldable", lambda call, params: True)
    broken = _tracked_layout_step(kind, backend, tracked=True)
    assert any(not torch.allclose(b, e, rtol=1e-6, atol=0) for b, e in zip(broken, expected))


def _extreme_tracked(values: list[float], dtype: torch.dtype, p: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Hooked grads holding ``values`` (one parameter each, 4096 copies): the tracker's total and
    the grads after ``clip_(1.0)``."""
    params = [torch.nn.Parameter(torch.ones(4096, dtype=dtype)) for _ in values]
    tracker = NormTracker(params, norm_type=p, min_numel=0)
    sum((param * value).sum() for param, value in zip(params, values)).backward()
    assert tracker.hooked == len(params)
    total = tracker.clip_(1.0)
    tracker.remove()
    return total, [param.grad for param in params]


def _extreme_violation(values: list[float], dtype: torch.dtype, p: float) -> str | None:
    """The tracked total and clipped grads against ``clip_grad_norm_`` on the cpu backend (which
    redoes in float64 what float32 cannot sum) on copies of the grads."""
    total, grads = _extreme_tracked(values, dtype, p)
    copies = [torch.nn.Parameter(torch.ones(4096, dtype=dtype)) for _ in values]
    for copy_, value in zip(copies, values):
        copy_.grad = torch.full((4096,), value, dtype=torch.float64).to(dtype)
    expected = fusedclip.clip_grad_norm_(copies, 1.0, p, backend="cpu")
    # the stated bound of float32 accumulation ((n + k + 4) units: torch's CPU norm sums along a
    # tensor), and bf16's own rounding of the total
    rtol = 2.0**-7 if dtype == torch.bfloat16 else (4096 + len(values) + 4) * 2.0**-24
    if not torch.allclose(total.double(), expected.double(), rtol=rtol, atol=0):
        return f"total {float(total)!r}, expected {float(expected)!r}"
    for mine, theirs in zip(grads, copies):
        if not torch.allclose(mine.double(), theirs.grad.double(), rtol=rtol, atol=0):
            return f"grads {mine[:2].tolist()}, expected {theirs.grad[:2].tolist()}"
    return None


@pytest.mark.parametrize("p", [1.0, 2.0], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hooked_norms_of_tiny_and_huge_grads_are_not_lost(dtype, p):
    """Grads whose squares underflow (1e-25) or overflow (1e22) float32: on the CPU the tracker's
    total and its clipping equal clip_grad_norm_'s, where trusting the hooks' float32 norms gave 0
    or inf (and inf zeroed every grad)."""

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(exponents=st.lists(st.integers(-36, 36), min_size=1, max_size=3))
    def check(exponents):
        problem = _extreme_violation([10.0**e for e in exponents], dtype, p)
        assert problem is None, problem

    check()
    assert _extreme_violation([1e-25, 3e-22], dtype, 2.0) is None
    assert _extreme_violation([1e22], dtype, 2.0) is None


def test_the_extreme_check_catches_trusted_float32_hook_norms(monkeypatch):
    """The planted bug: every hooked norm trusted (no recomputation on the CPU)."""
    from fusedclip import tracker as tracker_module

    monkeypatch.setattr(tracker_module, "_drop_untrusted", lambda values, grads, p: (values, []))
    assert _extreme_violation([1e-25, 3e-22], torch.float32, 2.0) is not None
    assert _extreme_violation([1e22], torch.float32, 2.0) is not None
