"""Clipper.load_state_dict against hostile and mismatched states: validate everything, then apply
atomically; a refused state changes nothing (deep-compared, bit for bit) and valid states of any run
load."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedclip import Clipper

MODES = ["norm", "autoclip", "zclip", "agc"]
SIZES = dict(warmup_steps=3, history_size=4)
REFUSED = (TypeError, ValueError)


def _clipper(mode, values=(1.0, math.inf, 2.0, 7.0, math.nan, 3.0), n_params=2, **sizes):
    """A Clipper over ``n_params`` parameters that has seen one-element-grad norms ``values``."""
    params = [torch.nn.Parameter(torch.ones(1, dtype=torch.float64)) for _ in range(n_params)]
    clipper = Clipper(params, mode, max_norm=5.0, **{**SIZES, **sizes})
    for value in values:
        for p in params:
            p.grad = torch.tensor([value], dtype=torch.float64)
        clipper()
    return clipper, params


def _snapshot(clipper, params):
    """Everything a load could touch: step count, state tensor objects and their bits, grads, params."""
    return (
        clipper.steps,
        {k: (v, v.detach().clone()) for k, v in clipper.state.items()},
        [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in params],
    )


def _bits(t):
    return t.view(torch.int64) if t.dtype == torch.float64 else t


def _assert_unchanged(clipper, params, snapshot):
    steps, tensors, tensors_of_params = snapshot
    assert clipper.steps == steps
    assert set(clipper.state) == set(tensors)
    for key, (obj, copy_) in tensors.items():
        now = clipper.state[key]
        assert now is obj, f"state tensor {key!r} was replaced"
        assert now.dtype == copy_.dtype and now.shape == copy_.shape and now.device == copy_.device
        assert torch.equal(_bits(now), _bits(copy_)), f"state tensor {key!r} was modified"
    for p, (data, grad) in zip(params, tensors_of_params):
        assert torch.equal(p.detach(), data)
        assert (p.grad is None and grad is None) or torch.equal(_bits(p.grad), _bits(grad))


def _assert_refused(clipper, params, state_dict, loader=None):
    snapshot = _snapshot(clipper, params)
    original = copy.deepcopy(state_dict)
    with pytest.raises(REFUSED):
        (loader or Clipper.load_state_dict)(clipper, state_dict)
    _assert_unchanged(clipper, params, snapshot)
    _assert_same_state_dict(state_dict, original)  # the caller's dict is not modified either


def _assert_same_state_dict(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state_dict(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state_dict(x, y)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=True)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.layout == b.layout
        if a.layout == torch.strided and not a.is_meta:
            assert torch.equal(_bits(a), _bits(b))
    else:
        assert a == b or (a != a and b != b)


# -- corruptions ------------------------------------------------------------------------------


def _illegal_values(key, sd):
    """(index, value) pairs that make tensor ``key`` of state ``sd`` impossible for its Clipper."""
    t = sd["tensors"][key]
    steps = sd["steps"]
    if key in ("clipped_steps", "nonfinite_steps", "finite_steps"):
        return [((), v) for v in (-1.0, 0.5, math.nan, math.inf, float(steps + 1))]
    if key in ("ema_norm", "mean", "var"):
        return [((), v) for v in (math.nan, math.inf, -1.0)]
    if key in ("last_norm", "threshold"):
        return [((), v) for v in (-1.0, -math.inf)]
    if key == "param_norms":
        return [((i,), v) for i in range(t.numel()) for v in (-1.0, -math.inf)]
    assert key in ("history", "warmup"), key
    filled = int(torch.isfinite(t).sum())
    bad = [((i,), v) for i in range(filled) for v in (math.nan, math.inf, -1.0)]
    bad += [((i,), 1.0) for i in range(filled, t.numel())]  # a value past the filled slots
    return bad


def _corruptions(sd, draw):
    """One corrupted copy of ``sd``; ``draw`` picks among the options."""
    sd = copy.deepcopy(sd)
    tensors = sd["tensors"]
    keys = sorted(tensors)
    kind = draw(
        st.sampled_from(
            [
                "drop-top", "extra-top", "mode", "steps", "tensors-type", "drop-tensor", "extra-tensor",
                "not-a-tensor", "shape", "dtype", "meta", "sparse", "value", "steps-below-counts", "not-a-mapping",
            ]
        ),
        "kind",
    )
    key = draw(st.sampled_from(keys), "key")
    if kind == "drop-top":
        del sd[draw(st.sampled_from(["mode", "steps", "tensors"]), "top key")]
    elif kind == "extra-top":
        sd["names"] = ["w"]
    elif kind == "mode":
        sd["mode"] = draw(st.sampled_from([m for m in MODES if m != sd["mode"]] + [None, 3, "NORM"]), "mode")
    elif kind == "steps":
        sd["steps"] = draw(st.sampled_from([-1, -(2**40), True, 2.0, 2.5, "7", None, torch.tensor(7), math.nan]), "steps")
    elif kind == "tensors-type":
        sd["tensors"] = list(tensors.values())
    elif kind == "drop-tensor":
        del tensors[key]
    elif kind == "extra-tensor":
        tensors["momentum"] = torch.zeros(())
    elif kind == "not-a-tensor":
        tensors[key] = draw(st.sampled_from([tensors[key].tolist(), None, "0.0", np.zeros(tensors[key].shape)]), "value")
    elif kind == "shape":
        t = tensors[key]
        tensors[key] = draw(st.sampled_from([t.reshape(-1, 1), torch.zeros(t.numel() + 1, dtype=t.dtype), t.reshape(1, *t.shape)]), "shape")
    elif kind == "dtype":
        dtype = draw(st.sampled_from([torch.complex128, torch.complex64, torch.int64, torch.int32, torch.bool, torch.uint8]), "dtype")
        tensors[key] = tensors[key].to(dtype) if dtype != torch.bool else tensors[key] > 0
    elif kind == "meta":
        tensors[key] = tensors[key].to("meta")
    elif kind == "sparse":
        t = tensors[key]
        tensors[key] = t.reshape(1, -1).to_sparse() if t.dim() == 0 else t.to_sparse()
    elif kind == "value":
        index, value = draw(st.sampled_from(_illegal_values(key, sd)), "illegal value")
        t = tensors[key].clone()
        t[index] = value
        tensors[key] = t
    elif kind == "steps-below-counts":
        sd["steps"] = 1  # the clippers of these tests have seen several steps, finite and not
    elif kind == "not-a-mapping":
        sd = draw(st.sampled_from([None, [sd], "state", 3]), "not a mapping")
    return sd


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), data=st.data())
def test_any_corrupted_state_is_refused_and_changes_nothing(mode, data):
    clipper, params = _clipper(mode, values=(4.0, 2.0, math.inf, 9.0))
    source, _ = _clipper(mode)
    corrupted = _corruptions(source.state_dict(), lambda strategy, label: data.draw(strategy, label=label))
    _assert_refused(clipper, params, corrupted)


@pytest.mark.parametrize("mode", MODES)
def test_a_state_of_a_clipper_over_other_parameters_is_refused_before_anything_is_written(mode):
    clipper, params = _clipper(mode, values=(4.0, 2.0))
    for other in (_clipper(mode, n_params=3)[0], _clipper(mode, history_size=5, warmup_steps=2)[0]):
        if other.state.keys() == clipper.state.keys() and all(
            other.state[k].shape == clipper.state[k].shape for k in clipper.state
        ):
            continue  # norm/agc modes have no buffer sized by these options
        _assert_refused(clipper, params, other.state_dict())
    other_mode = "zclip" if mode != "zclip" else "autoclip"
    _assert_refused(clipper, params, _clipper(other_mode)[0].state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_negative_step_counts_and_complex_tensors_are_refused(mode):
    clipper, params = _clipper(mode)
    sd = clipper.state_dict()
    _assert_refused(clipper, params, {**sd, "steps": -1})
    for key in sd["tensors"]:
        bad = copy.deepcopy(sd)
        bad["tensors"][key] = bad["tensors"][key].to(torch.complex128)
        _assert_refused(clipper, params, bad)


# -- valid states load ------------------------------------------------------------------------

_NORMS = st.one_of(st.floats(0.0, 1e6), st.sampled_from([math.inf, -math.inf, math.nan]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), values=st.lists(_NORMS, max_size=12), warmup=st.integers(1, 4), history=st.integers(1, 5))
def test_the_state_of_any_run_loads_and_continues_identically(mode, values, warmup, history):
    sizes = dict(warmup_steps=warmup, history_size=history)
    straight, straight_params = _clipper(mode, values, **sizes)
    fresh, fresh_params = _clipper(mode, (), **sizes)
    fresh.load_state_dict(straight.state_dict())
    assert fresh.steps == straight.steps
    for key, value in straight.state.items():
        assert torch.equal(_bits(fresh.state[key]), _bits(value)), key
    for value in (1.0, 50.0, math.inf, 2.0):
        for p in straight_params + fresh_params:
            p.grad = torch.tensor([value], dtype=torch.float64)
        assert torch.equal(straight(), fresh())
        for a, b in zip(straight_params, fresh_params):
            assert torch.equal(_bits(a.grad), _bits(b.grad))


def test_a_state_in_another_float_dtype_or_on_the_cpu_loads():
    clipper, _ = _clipper("zclip")
    sd = clipper.state_dict()
    as_float32 = {**sd, "tensors": {k: v.float() for k, v in sd["tensors"].items()}}
    fresh, _ = _clipper("zclip", ())
    fresh.load_state_dict(as_float32)
    for key, value in fresh.state.items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, sd["tensors"][key].float().double(), equal_nan=True)
    fresh.load_state_dict({**sd, "steps": np.int64(sd["steps"])})  # numpy integers are integers
    assert fresh.steps == sd["steps"] and type(fresh.steps) is int


# -- the deep comparison would catch a loader that writes as it checks ---------------------------


def _load_writing_as_it_checks(clipper, state_dict):
    """The deliberately broken loader: each tensor is copied as soon as it is checked."""
    if state_dict["mode"] != clipper.mode:
        raise ValueError("mode")
    for key, value in state_dict["tensors"].items():
        if value.shape != clipper.state[key].shape:
            raise ValueError(f"shape of {key}")
        clipper.state[key].copy_(value)
    clipper.steps = int(state_dict["steps"])


def test_the_deep_comparison_catches_a_partial_load():
    clipper, params = _clipper("autoclip", values=(4.0, 2.0))
    other = _clipper("autoclip", n_params=3)[0].state_dict()  # param_norms has another shape
    # param_norms comes after several tensors that the broken loader overwrites first
    assert list(other["tensors"]).index("param_norms") > 0
    _assert_refused(clipper, params, other)
    with pytest.raises(AssertionError, match="was modified"):
        _assert_refused(clipper, params, other, loader=_load_writing_as_it_checks)


# -- a refused call changes nothing ------------------------------------------------------------

CALL_MODES = ["norm", "autoclip", "zclip", "agc", "adagc", "grouped"]
_SHAPES = [(3, 4), (4,), (2, 3), (5,)]


def _call_clipper(mode, skip):
    """A Clipper over four float32 parameters, in ``mode`` ("grouped": zclip, excluded and adagc groups)."""
    params = [torch.nn.Parameter(torch.ones(shape)) for shape in _SHAPES]
    options = dict(max_norm=2.0, skip=skip, warmup_steps=2, history_size=3)
    if mode == "grouped":
        groups = [
            {"params": params[:2], "mode": "zclip"},
            {"params": params[2:3], "mode": None},
            {"params": params[3:], "mode": "adagc"},
        ]
        return Clipper(groups, **options), params
    return Clipper(params, mode, **options), params


def _feed(params, values):
    for p, value in zip(params, values):
        p.grad = torch.full(p.shape, value)


def _unwritable(shape, value, kind):
    if kind == "inference":
        with torch.inference_mode():
            return torch.full(shape, value)
    return torch.full((1,), value).expand(shape)  # elements share memory


def _raw(t):
    """The bits of a float tensor (NaN compares equal to the same NaN)."""
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, t.dtype))


def _everything(clipper, params):
    """What a call may change: state dict (bits), found_inf, the fresh flag, grads and parameters."""
    sd = clipper.state_dict()
    return (
        sd["steps"],
        {k: _raw(v).clone() for k, v in sd["tensors"].items()},
        _raw(clipper.found_inf.clone()),
        clipper._flag_fresh,
        [(_raw(p.detach().clone()), None if p.grad is None else _raw(p.grad.clone())) for p in params],
    )


def _same(a, b):
    def equal(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(equal(u, v) for u, v in zip(x, y))
        return x == y

    return equal(a, b)


def _refused_call_leaves_everything(mode, skip, history, stepped, bad_index, kind, bad_value):
    """Run a Clipper through ``history`` (per-step grad values), optionally take an optimizer step,
    then make one call with an unwritable grad; returns whether nothing changed and ``step()`` after
    it behaves as without the call (and the next good call matches a Clipper that never saw it)."""
    stepped = stepped and bool(history)  # step() needs a call before it
    clipper, params = _call_clipper(mode, skip)
    twin, twin_params = _call_clipper(mode, skip)
    opt = torch.optim.SGD(params, lr=0.1, fused=True) if stepped else None
    twin_opt = torch.optim.SGD(twin_params, lr=0.1, fused=True) if stepped else None
    for values in history:
        for c, ps in ((clipper, params), (twin, twin_params)):
            _feed(ps, values)
            c()
    if stepped:
        clipper.step(opt)
        twin.step(twin_opt)
    _feed(params, [bad_value] * len(params))
    params[bad_index].grad = _unwritable(params[bad_index].shape, bad_value, kind)
    before = _everything(clipper, params)
    with pytest.raises(RuntimeError):
        clipper()
    if not _same(before, _everything(clipper, params)):
        return False
    if stepped:  # no call since the last step: step() refuses, as it does without the refused call
        with pytest.raises(RuntimeError, match="needs a Clipper call"):
            clipper.step(opt)
    # the run continues as if the refused call had not happened
    for c, ps in ((clipper, params), (twin, twin_params)):
        _feed(ps, [3.0, 0.5, 7.0, 1.0])
    if not torch.equal(_raw(clipper()), _raw(twin())):
        return False
    return _same(_everything(clipper, params)[:4], _everything(twin, twin_params)[:4])


_HISTORY = st.lists(
    st.lists(st.sampled_from([0.5, 1.0, 3.0, 40.0, math.inf, math.nan]), min_size=4, max_size=4), max_size=4
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(CALL_MODES),
    skip=st.sampled_from([None, "nonfinite", "spike"]),
    history=_HISTORY,
    stepped=st.booleans(),
    bad_index=st.integers(0, len(_SHAPES) - 1),
    kind=st.sampled_from(["inference", "expanded"]),
    bad_value=st.sampled_from([1000.0, math.inf, 0.5]),
)
def test_a_refused_call_changes_nothing_in_any_mode(mode, skip, history, stepped, bad_index, kind, bad_value):
    assert _refused_call_leaves_everything(mode, skip, history, stepped, bad_index, kind, bad_value)


@pytest.mark.parametrize("mode", CALL_MODES)
@pytest.mark.parametrize("stepped", [False, True])
def test_a_refused_call_changes_nothing_parametrized(mode, stepped):
    history = [[1.0, 2.0, 0.5, 1.0], [3.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]]
    for skip in (None, "spike"):
        assert _refused_call_leaves_everything(mode, skip, history, stepped, 0, "inference", 1000.0)


def test_the_refused_call_check_catches_a_call_that_checks_writability_only_when_it_writes(monkeypatch):
    """The deliberately broken Clipper: no check before the call's work (the scale pass still
    refuses the grad, after the statistics, the flag and the fresh-flag changed)."""
    import fusedclip.adaptive

    monkeypatch.setattr(fusedclip.adaptive, "_check_writable", lambda call: None)
    history = [[1.0, 2.0, 0.5, 1.0], [3.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]]
    for mode in ("zclip", "autoclip"):  # thresholds update before the scale pass
        assert not _refused_call_leaves_everything(mode, "spike", history, False, 0, "inference", 1000.0)
    for mode in CALL_MODES:  # the fresh-flag is set before the work: step() would run
        with pytest.raises(BaseException):
            assert _refused_call_leaves_everything(mode, None, history, True, 0, "inference", 1000.0)
