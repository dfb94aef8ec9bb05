"""Skipping a step on a device flag: Clipper(skip=...) sets found_inf by its documented rule, a fused
optimizer's kernel then leaves parameters and state alone, and nothing is read back to the host."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedclip import Clipper
from fusedclip.backends.base import CLIP_EPS
from fusedclip.optim import step_unless_flagged

from conftest import syncs_raise

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _backward(model, scale, seed, set_to_none=True):
    model.zero_grad(set_to_none=set_to_none)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))
    (model(x).square().mean() * scale).backward()


def _opt_state(optimizer):
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
        for i, p in enumerate(params)
        if p in optimizer.state
    }


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for name in a[k]:
            assert torch.equal(a[k][name], b[k][name]), name


def _run(name, scales, stepper, seed=0):
    """Train with the given loss scales; returns (model, optimizer, flags, (params, state) before and after each step)."""
    model = _model(seed)
    optimizer = OPTIMIZERS[name](model.parameters())
    clipper = Clipper(model.named_parameters(), "norm", max_norm=1.0, skip="spike", skip_factor=5.0)
    flags, trace = [], []
    for i, scale in enumerate(scales):
        _backward(model, scale, seed=i)
        clipper()
        flags.append(float(clipper.found_inf))
        before = (_params(model), _opt_state(optimizer))
        stepper(clipper, optimizer)
        trace.append((before, (_params(model), _opt_state(optimizer))))
    return model, optimizer, clipper, flags, trace


SCALES = [1.0, 1.0, 1.0, 200.0, 1.0, math.inf, 1.0, math.nan, 1.0]
EXPECTED_FLAGS = [0, 0, 0, 1, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_flagged_step_leaves_parameters_and_state_unchanged_and_others_step(name):
    _, optimizer, clipper, flags, trace = _run(name, SCALES, lambda c, o: c.step(o))
    assert flags == EXPECTED_FLAGS
    for flag, ((p0, s0), (p1, s1)) in zip(flags, trace):
        if flag:
            _same(p0, p1)
            _same_state(s0, s1)
        else:
            assert any(not torch.equal(a, b) for a, b in zip(p0, p1)), "an unflagged step was not taken"
    if "adam" in name:
        assert all(float(s["step"]) == EXPECTED_FLAGS.count(0) for s in optimizer.state.values())
    summary = clipper.summary()
    assert summary["skipped_steps"] == sum(EXPECTED_FLAGS)
    assert clipper.state_dict()["tensors"]["skipped_steps"].item() == sum(EXPECTED_FLAGS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_skipped_steps_leave_the_run_as_if_they_had_not_happened(name):
    """The run with spikes equals, bit for bit, the run of only its unflagged steps (same grads)."""
    model, _, _, flags, _ = _run(name, SCALES, lambda c, o: c.step(o))
    kept = [i for i, f in enumerate(flags) if not f]
    reference = _model()
    optimizer = OPTIMIZERS[name](reference.parameters())
    clipper = Clipper(reference.named_parameters(), "norm", max_norm=1.0)
    for i in kept:
        _backward(reference, SCALES[i], seed=i)
        clipper()
        optimizer.step()
    _same(_params(model), _params(reference))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_skipped_first_step_is_as_if_it_had_not_happened(name):
    """A flag on the very first step (fused SGD would otherwise keep an uninitialised momentum buffer)."""
    model, optimizer, _, flags, _ = _run(name, [math.inf, 1.0, 1.0], lambda c, o: c.step(o))
    assert flags == [1, 0, 0]
    reference = _model()
    ref_opt = OPTIMIZERS[name](reference.parameters())
    for i in (1, 2):
        _backward(reference, 1.0, seed=i)
        Clipper(reference.named_parameters(), "norm", max_norm=1.0)()
        ref_opt.step()
    _same(_params(model), _params(reference))
    _same_state(_opt_state(optimizer), _opt_state(ref_opt))


def test_fused_sgd_with_dampening_refuses_a_first_step_it_cannot_skip():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5, fused=True)
    _backward(model, 1.0, 0)
    with pytest.raises(ValueError, match="dampening"):
        step_unless_flagged(optimizer, torch.ones(()))


def _step_ignoring_the_flag(clipper, optimizer):
    """The deliberately broken consumer: the flag is computed but not handed to the optimizer."""
    optimizer.step()


def _check_flagged_steps_unchanged(flags, trace):
    for flag, ((p0, s0), (p1, s1)) in zip(flags, trace):
        if flag:
            _same(p0, p1)
            _same_state(s0, s1)


def test_a_flag_not_handed_to_the_optimizer_is_caught():
    _, _, _, flags, trace = _run("adam", SCALES, lambda c, o: c.step(o))
    _check_flagged_steps_unchanged(flags, trace)  # the real consumer passes
    _, _, _, flags, trace = _run("adam", SCALES, _step_ignoring_the_flag)
    assert flags[:4] == EXPECTED_FLAGS[:4]  # the spike is flagged...
    with pytest.raises(AssertionError):
        _check_flagged_steps_unchanged(flags, trace)  # ...but the step is taken


def test_non_fused_optimizers_need_sync_and_then_skip_on_the_host():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    clipper = Clipper(model.named_parameters(), "norm", skip="nonfinite")
    _backward(model, math.inf, 0)
    clipper()
    with pytest.raises(ValueError, match="sync=True"):
        clipper.step(optimizer)
    clipper()
    before = (_params(model), _opt_state(optimizer))
    clipper.step(optimizer, sync=True)
    _same(before[0], _params(model))
    assert optimizer.state == {}  # step() was not called at all
    _backward(model, 1.0, 1)
    clipper()
    clipper.step(optimizer, sync=True)
    assert any(not torch.equal(a, b) for a, b in zip(before[0], _params(model)))


def test_step_needs_a_call_since_the_last_step():
    model = _model()
    optimizer = OPTIMIZERS["adam"](model.parameters())
    clipper = Clipper(model.named_parameters(), skip="nonfinite")
    with pytest.raises(RuntimeError, match="Clipper call"):
        clipper.step(optimizer)
    _backward(model, 1.0, 0)
    clipper()
    clipper.step(optimizer)
    with pytest.raises(RuntimeError, match="Clipper call"):
        clipper.step(optimizer)
    assert not hasattr(optimizer, "found_inf")


# -- the rule, on random norm sequences ---------------------------------------------------------

_NORMS = st.one_of(st.floats(0.0, 1e6), st.floats(0.0, 10.0), st.sampled_from([math.inf, math.nan]))


def _expected_flags(mode, values, skip, factor, z_max, warmup, alpha=0.97, ema_decay=0.99, max_norm=5.0):
    """The documented rule, in plain Python over the norms before each step (a single one-element
    float64 grad: the total is |value|)."""
    flags, ema, finite = [], 0.0, []
    mean = var = 0.0
    for v in values:
        flag = not math.isfinite(v)
        if skip == "spike" and not flag:
            if mode == "zclip":
                if len(finite) >= warmup:
                    z = (v - mean) / (math.sqrt(var) + CLIP_EPS)
                    flag = z > z_max
            elif finite:
                flag = v > factor * ema
        flags.append(float(flag))
        if math.isfinite(v):
            ema = v if not finite else ema * ema_decay + v * (1 - ema_decay)
            if mode == "zclip":
                if len(finite) < warmup - 1:
                    pass
                elif len(finite) == warmup - 1:
                    w = finite + [v]
                    mean = sum(w) / warmup
                    var = sum((x - mean) ** 2 for x in w) / warmup
                else:
                    std = math.sqrt(var)
                    z = (v - mean) / (std + CLIP_EPS)
                    clipped = min(v, mean + (2.5**2 / z) * std) if z > 2.5 else v
                    mean = alpha * mean + (1 - alpha) * clipped
                    var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
            finite.append(v)
    return flags


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["norm", "autoclip", "zclip", "agc"]),
    skip=st.sampled_from(["nonfinite", "spike"]),
    values=st.lists(_NORMS, max_size=14),
    factor=st.floats(1.0, 20.0),
    z_max=st.floats(0.5, 8.0),
    warmup=st.integers(1, 4),
)
def test_the_flag_follows_the_documented_rule(mode, skip, values, factor, z_max, warmup):
    param = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    clipper = Clipper(
        [("w", param)], mode, max_norm=5.0, skip=skip, skip_factor=factor, skip_z=z_max, warmup_steps=warmup,
        agc_exclude=("w",),  # AGC leaves the grad alone; its total is the norm as given
    )
    flags = []
    for v in values:
        param.grad = torch.tensor([v], dtype=torch.float64)
        clipper()
        flags.append(float(clipper.found_inf))
        assert clipper.found_inf.dtype == torch.float32 and clipper.found_inf.dim() == 0
    expected = _expected_flags(mode, values, skip, factor, z_max, warmup)
    # the z-score is compared with a threshold: allow disagreement only within rounding of the boundary
    for i, (got, want) in enumerate(zip(flags, expected)):
        assert got == want or _near_boundary(mode, values[: i + 1], factor, z_max, warmup), (i, values, flags, expected)
    assert clipper.summary()["skipped_steps"] == sum(flags)
    sd = clipper.state_dict()
    assert float(sd["tensors"]["skipped_steps"]) == sum(flags)


def _near_boundary(mode, values, factor, z_max, warmup):
    """Whether the last value lies within rounding of its threshold (float64 EMAs computed in
    another order can differ in the last bits)."""
    flags_lo = _expected_flags(mode, values, "spike", factor * (1 - 1e-9), z_max * (1 - 1e-9), warmup)
    flags_hi = _expected_flags(mode, values, "spike", factor * (1 + 1e-9), z_max * (1 + 1e-9), warmup)
    return flags_lo[-1] != flags_hi[-1]


def test_without_skip_the_flag_stays_zero_and_nothing_is_counted():
    param = torch.nn.Parameter(torch.ones(1))
    clipper = Clipper([param], "norm")
    for v in (1.0, math.inf, 1e9):
        param.grad = torch.tensor([v])
        clipper()
        assert float(clipper.found_inf) == 0.0
    assert clipper.summary()["skipped_steps"] == 0
    assert "skipped_steps" not in clipper.state_dict()["tensors"]


# -- checkpoints ----------------------------------------------------------------------------------


def _seen(skip, values=(1.0, math.inf, 50.0, 1.0)):
    param = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    clipper = Clipper([param], "norm", skip=skip, skip_factor=5.0)
    for v in values:
        param.grad = torch.tensor([v], dtype=torch.float64)
        clipper()
    return clipper


def test_skipped_steps_resume_and_old_states_load():
    straight = _seen("spike")
    assert straight.summary()["skipped_steps"] == 2
    resumed = _seen("spike", ())
    resumed.load_state_dict(straight.state_dict())
    assert resumed.summary() == straight.summary()
    old = _seen(None).state_dict()  # saved without the key
    assert "skipped_steps" not in old["tensors"]
    fresh = _seen("spike", ())
    fresh.load_state_dict(old)
    assert fresh.summary()["skipped_steps"] == 0 and fresh.steps == 4
    without = _seen(None, ())
    without.load_state_dict(straight.state_dict())  # checked, then dropped
    assert "skipped_steps" not in without.state and without.steps == 4


@pytest.mark.parametrize("bad", [-1.0, 0.5, math.nan, math.inf, 5.0])
@pytest.mark.parametrize("target_skip", ["spike", None])
def test_an_impossible_skipped_count_is_refused_and_changes_nothing(bad, target_skip):
    sd = copy.deepcopy(_seen("spike").state_dict())
    sd["tensors"]["skipped_steps"] = torch.tensor(bad, dtype=torch.float64)  # 5 > the 4 steps taken
    target = _seen(target_skip, (2.0, 3.0))
    before = {k: v.clone() for k, v in target.state.items()}
    with pytest.raises(ValueError):
        target.load_state_dict(sd)
    assert target.steps == 2
    for k, v in before.items():
        assert torch.equal(target.state[k], v)


def test_a_misshapen_skipped_count_is_refused():
    sd = _seen("spike").state_dict()
    sd["tensors"]["skipped_steps"] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        _seen("spike", ()).load_state_dict(sd)


def test_bad_options_are_refused():
    p = torch.nn.Parameter(torch.ones(1))
    for kwargs in (dict(skip="always"), dict(skip="spike", skip_factor=0.5), dict(skip_z=0.0), dict(skip_factor=math.inf)):
        with pytest.raises(ValueError):
            Clipper([p], **kwargs)


# -- no host sync ---------------------------------------------------------------------------------

# the host_reads fixture (tests/conftest.py) counts reads of tensor values on the host


@pytest.mark.parametrize("mode", ["norm", "autoclip", "zclip", "agc"])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_flagging_and_skipping_read_nothing_on_the_host(mode, name, host_reads):
    model = _model()
    optimizer = OPTIMIZERS[name](model.parameters())
    clipper = Clipper(model.named_parameters(), mode, skip="spike", warmup_steps=2)
    for i, scale in enumerate([1.0, 1.0, 1.0, 1e4, math.inf, 1.0]):
        # grads kept in place: new grad tensors would rebuild the plan, which reads its host-side
        # address tables (CPU metadata, no device sync; the CUDA test below covers that case)
        _backward(model, scale, i, set_to_none=False)
        host_reads["n"] = 0
        host_reads["names"].clear()
        clipper()
        clipper.step(optimizer)
        assert i == 0 or host_reads["n"] == 0, host_reads["names"]  # the first call builds the plan
    assert clipper.summary()["skipped_steps"] >= 1


def test_the_host_read_counter_sees_a_sync(host_reads):
    """The deliberately syncing version (sync=True reads the flag) is counted."""
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    clipper = Clipper(model.named_parameters(), skip="nonfinite")
    _backward(model, 1.0, 0)
    clipper()
    host_reads["n"] = 0
    clipper.step(optimizer, sync=True)
    assert host_reads["n"] >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("mode", ["norm", "zclip"])
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_flagging_and_skipping_do_not_synchronise_on_cuda(mode, name):
    model = _model().cuda()
    optimizer = OPTIMIZERS[name](model.parameters())
    clipper = Clipper(model.named_parameters(), mode, skip="spike", warmup_steps=2)
    xs = [torch.randn(8, 6, device="cuda") for _ in range(5)]
    scales = [1.0, 1.0, 1.0, 1e4, math.inf]
    snapshots = []
    for x, scale in zip(xs, scales):
        model.zero_grad()
        (model(x).square().mean() * scale).backward()
        torch.cuda.synchronize()
        with syncs_raise():
            clipper()
            clipper.step(optimizer)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    for i in (3, 4):  # the spike and the inf are skipped
        _same(snapshots[i - 1], snapshots[i])
    assert clipper.summary()["skipped_steps"] == 2
