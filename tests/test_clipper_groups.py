"""Clipper parameter groups: each group against torch's clip_grad_norm_ on that group's params,
excluded groups untouched bit for bit, the per-tensor mode (adagc) against a plain reference written
here, the skip flag over all groups, validation before any grad is touched, and no host reads."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip import Clipper, adaptive, groups

from conftest import syncs_raise

SHAPES = [(4, 3), (5,), (2, 3, 2), (7,), (3, 3), (1,)]


def _params(n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(SHAPES[i % len(SHAPES)], generator=gen, dtype=dtype)) for i in range(n)]


def _twins(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _grad(shape, step, i, scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7919 * step + i)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int64)


def _torch_total(grads, p):
    """torch's total norm (its own definition: the p-norm of the per-tensor norms), in float64."""
    norms = torch.stack([torch.linalg.vector_norm(g.double(), p) for g in grads])
    return float(torch.linalg.vector_norm(norms, p))


# -- "norm" groups against torch, excluded groups untouched -------------------------------------


def _check_groups_against_torch(assignment, modes, max_norms, norm_type, steps, has_grad):
    """Clip ``len(assignment)`` parameters grouped by ``assignment`` (group of each parameter);
    group g has mode ``modes[g]`` ("norm" or None) and ``max_norms[g]``. Every step, each "norm"
    group must equal torch's clip_grad_norm_ on a copy of that group's parameters, each excluded
    group's grads must be bit-identical to before, and the returned total must be torch's total over
    all grads. Raises AssertionError otherwise."""
    params = _params(len(assignment))
    twins = _twins(params)
    ids = sorted(set(assignment))
    spec = []
    for g in ids:
        group = {"params": [p for p, a in zip(params, assignment) if a == g], "mode": modes[g]}
        if modes[g] is not None:
            group["max_norm"] = max_norms[g]
        spec.append(group)
    clipper = Clipper(spec, norm_type=norm_type)
    for step in range(steps):
        for i, (p, t) in enumerate(zip(params, twins)):
            present = has_grad[(step + i) % len(has_grad)]
            p.grad = _grad(p.shape, step, i, scale=1.0 + 20.0 * (step % 3 == 2)) if present else None
            t.grad = None if p.grad is None else p.grad.clone()
        before = [None if p.grad is None else p.grad.clone() for p in params]
        grads = [p.grad for p in params if p.grad is not None]
        total = clipper()
        if grads:
            assert float(total) == pytest.approx(_torch_total([b for b in before if b is not None], norm_type), rel=1e-5)
        for k, g in enumerate(ids):
            members = [i for i, a in enumerate(assignment) if a == g]
            mine = [params[i] for i in members]
            if modes[g] is None:
                for i in members:
                    if before[i] is not None:
                        assert torch.equal(_bits(params[i].grad), _bits(before[i])), f"excluded group {g} was written"
                continue
            theirs = [twins[i] for i in members]
            if all(t.grad is None for t in theirs):
                continue
            expected_total = torch.nn.utils.clip_grad_norm_(theirs, max_norms[g], norm_type=norm_type)
            reported = float(clipper.state[f"groups.{k}.last_norm"])
            assert reported == pytest.approx(float(expected_total), rel=1e-5), f"group {g} total at step {step}"
            for a, b in zip(mine, theirs):
                if b.grad is not None:
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=f"group {g} at step {step}")
    return clipper


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    assignment=st.lists(st.integers(0, 3), min_size=2, max_size=6),
    modes=st.lists(st.sampled_from(["norm", None]), min_size=4, max_size=4),
    max_norms=st.lists(st.floats(0.5, 20.0), min_size=4, max_size=4),
    norm_type=st.sampled_from([1.0, 2.0, math.inf]),
    has_grad=st.lists(st.booleans(), min_size=1, max_size=4).filter(any),
)
def test_each_norm_group_is_clipped_as_torch_clips_that_group_alone(assignment, modes, max_norms, norm_type, has_grad):
    _check_groups_against_torch(assignment, modes, max_norms, norm_type, steps=4, has_grad=has_grad)


@pytest.mark.parametrize("norm_type", [0.0, 3.0, -math.inf, 1.0, 2.0, math.inf])
def test_group_totals_for_every_kind_of_norm(norm_type):
    """p = 0 (counts of non-zero tensors), a general p and -inf too (norms from one pass, combined per group)."""
    _check_groups_against_torch([0, 1, 0, 2, 1, 2], ["norm", "norm", None, None], [1.0, 3.0, 1.0, 1.0], norm_type, 4, [True])


def _layout_over_all_tensors(self, positions, device):
    """The deliberately broken version: every group's total is taken over all tensors."""
    layout = _REAL_LAYOUT(self, positions, device)
    everything = torch.arange(len(positions), device=device)
    return [None if entry is None else (everything, entry[1], entry[2]) for entry in layout]


_REAL_LAYOUT = Clipper._layout


def _two_norm_of_norms(norms, norm):
    """The deliberately broken version: the group total is always the 2-norm of the per-tensor norms."""
    return torch.linalg.vector_norm(norms, 2.0)


@pytest.mark.parametrize(
    "target, broken, norm_type",
    [
        ((Clipper, "_layout"), _layout_over_all_tensors, 2.0),
        ((adaptive, "combine_norms"), _two_norm_of_norms, math.inf),
        ((adaptive, "combine_norms"), _two_norm_of_norms, 1.0),
    ],
    ids=["total-over-all-tensors", "inf-as-2", "1-as-2"],
)
def test_the_torch_comparison_catches_a_wrong_group_total(monkeypatch, target, broken, norm_type):
    case = ([0, 1, 0, 1, 1], ["norm", "norm", None, None], [1.0, 2.0, 1.0, 1.0], norm_type, 3, [True])
    _check_groups_against_torch(*case)  # the real code passes
    monkeypatch.setattr(*target, broken)
    with pytest.raises(AssertionError):
        _check_groups_against_torch(*case)


# -- groups behave as separate Clippers ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["norm", "autoclip", "zclip", "agc", "adagc"])
def test_a_group_clips_as_a_clipper_of_its_own_parameters(mode):
    """A group of any mode, next to other groups, does exactly what a Clipper over only its
    parameters does (the others' grads and modes do not leak into it)."""
    options = dict(max_norm=2.0, warmup_steps=3, percentile=50.0, history_size=5, agc_clipping=0.05, adagc_lambda=1.1)
    relevant = {k: v for k, v in options.items() if k in groups.MODE_OPTIONS[mode]}
    params = _params(6)
    alone = _twins(params[1:4])
    names = [f"w{i}" for i in range(6)]
    clipper = Clipper(
        [
            {"params": list(zip(names[:1], params[:1])), "mode": "norm", "max_norm": 0.1},
            {"params": list(zip(names[1:4], params[1:4])), "mode": mode, **relevant},
            {"params": list(zip(names[4:], params[4:])), "mode": None},
        ]
    )
    single = Clipper(list(zip(names[1:4], alone)), mode, **options)
    for step in range(10):
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, step, i, scale=30.0 if step in (6, 8) and i == 2 else 1.0)
        for i, p in enumerate(alone, start=1):
            p.grad = params[i].grad.clone()
        clipper()
        single()
        for a, b in zip(params[1:4], alone):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9, msg=f"{mode} at step {step}")
        assert float(clipper.state["groups.1.last_norm"]) == pytest.approx(float(single.state["last_norm"]), rel=1e-6)
    assert clipper.summary()["groups"]["group1"]["clipped_fraction"] == pytest.approx(single.summary()["clipped_fraction"])


# -- adagc against a plain reference -----------------------------------------------------------


class _RefAdaGC:
    """AdaGC as documented (fusedclip.groups.adagc_rule), in Python floats per tensor."""

    def __init__(self, n, p, max_norm, lam, beta, warmup):
        self.p, self.max_norm, self.lam, self.beta, self.warmup = p, max_norm, lam, beta, warmup
        self.gamma = [None] * n
        self.finite = 0

    def coefficients(self, grads):
        """Coefficient for each grad (None: no grad), updating gamma."""
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return [None] * len(grads)
        norms = {i: float(torch.linalg.vector_norm(grads[i].double(), self.p)) for i in present}
        total = float(torch.linalg.vector_norm(torch.tensor(list(norms.values()), dtype=torch.float64), self.p))
        coefs = [None] * len(grads)
        warm = self.finite < self.warmup
        for i in present:
            n, gamma = norms[i], self.gamma[i]
            if warm:
                h = 0.0 if total == math.inf else min(self.max_norm / (total + 1e-6), 1.0)
            elif n == math.inf:
                h = 0.0
            else:
                h = 1.0 if gamma is None else min(self.lam * gamma / (n + 1e-6), 1.0)
            coefs[i] = h
            if math.isfinite(n) and n > 0 and (math.isfinite(total) or not warm):
                clipped = h * n
                if gamma is None:
                    self.gamma[i] = clipped
                else:
                    self.gamma[i] = min(gamma, clipped) if warm else self.beta * gamma + (1 - self.beta) * clipped
        if math.isfinite(total):
            self.finite += 1
        return coefs


def _check_adagc(p, warmup, lam, beta, max_norm, scales, absent, dtype=torch.float32):
    """Run an adagc group (next to an excluded one) over ``scales[step][i]`` (grad scale of tensor
    i; inf puts an inf in it, 0 makes it all zeros) with tensors ``absent`` (step, i) having no grad;
    compare grads and gamma with :class:`_RefAdaGC` every step. Raises AssertionError otherwise."""
    n = len(scales[0])
    params = _params(n + 1, seed=1, dtype=dtype)
    rtol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2.0**-7}[dtype]
    clipper = Clipper(
        [
            {"params": params[:n], "mode": "adagc", "max_norm": max_norm, "warmup_steps": warmup, "adagc_lambda": lam, "adagc_beta": beta},
            {"params": params[n:], "mode": None},
        ],
        norm_type=p,
    )
    ref = _RefAdaGC(n, p, max_norm, lam, beta, warmup)
    for step, row in enumerate(scales):
        for i, scale in enumerate(row):
            if (step, i) in absent:
                params[i].grad = None
                continue
            g = _grad(params[i].shape, step, i, 1.0 if scale == math.inf else scale, dtype)
            if scale == math.inf:
                g.view(-1)[0] = math.inf
            params[i].grad = g
        params[n].grad = _grad(params[n].shape, step, n, 50.0, dtype)
        before = [None if q.grad is None else q.grad.double().clone() for q in params]
        coefs = ref.coefficients(before[:n])
        clipper()
        where = f"step {step} (p={p}, warmup={warmup}, scales={row})"
        for i in range(n):
            if coefs[i] is not None:
                expected = before[i] * coefs[i]
                torch.testing.assert_close(params[i].grad.double(), expected, rtol=rtol, atol=1e-30, equal_nan=True, msg=where)
        assert torch.equal(params[n].grad.double(), before[n]), f"the excluded group was written at {where}"
        gamma = clipper.state["groups.0.tensor_ema"]
        for i in range(n):
            if ref.gamma[i] is None:
                assert math.isnan(float(gamma[i])), f"gamma[{i}] set without an observation at {where}"
            else:
                assert float(gamma[i]) == pytest.approx(ref.gamma[i], rel=1e-6), f"gamma[{i}] at {where}"


def test_adagc_matches_the_reference_through_warm_up_spikes_inf_zero_and_missing_grads():
    scales = [
        [1.0, 0.0, 1.0],  # tensor 1 all zeros: no observation (gamma stays unset)
        [1.0, 1.0, 1.0],
        [math.inf, 1.0, 1.0],  # a non-finite warm-up step: clipped to 0, enters nothing
        [1.0, 2.0, 1.0],  # warm-up ends after 3 finite norms
        [1.0, 1.0, 40.0],  # a spike in tensor 2 only: only it is clipped
        [1.0, 1.0, 1.0],
        [30.0, 1.0, 1.0],
        [math.inf, 1.0, 1.0],  # after the warm-up: tensor 0 zeroed, the others clipped on their own
        [1.0, 1.0, 1.0],
    ]
    for p in (2.0, 1.0, math.inf):
        _check_adagc(p, 3, 1.05, 0.9, 5.0, scales, absent={(1, 2), (5, 0)})


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_adagc_coefficients_per_dtype(dtype):
    """float64 grads are scaled by the float64 coefficient; bfloat16 ones round once more (on the CPU)."""
    scales = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 30.0, 1.0], [1.0, 1.0, math.inf], [1.0, 1.0, 1.0]]
    _check_adagc(2.0, 2, 1.05, 0.9, 4.0, scales, absent={(4, 1)}, dtype=dtype)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    p=st.sampled_from([1.0, 2.0, math.inf]),
    warmup=st.integers(1, 4),
    lam=st.floats(1.0, 2.0),
    beta=st.floats(0.5, 0.99),
    max_norm=st.floats(0.5, 20.0),
    scales=st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 3.0, 50.0, math.inf]), min_size=3, max_size=3), min_size=1, max_size=10),
    absent=st.sets(st.tuples(st.integers(0, 9), st.integers(0, 2)), max_size=5),
)
def test_adagc_matches_the_reference_on_random_runs(p, warmup, lam, beta, max_norm, scales, absent):
    _check_adagc(p, warmup, lam, beta, max_norm, scales, absent)


def _adagc_on_unclipped_norms(norms, gamma, group_total, in_warmup, *, max_norm, lam, beta):
    """The deliberately broken version: the EMA follows the norms before clipping."""
    coef, _ = _REAL_ADAGC(norms, gamma, group_total, in_warmup, max_norm=max_norm, lam=lam, beta=beta)
    _, new_gamma = _REAL_ADAGC(norms, gamma, group_total, in_warmup, max_norm=math.inf, lam=math.inf, beta=beta)
    return coef, new_gamma


_REAL_ADAGC = groups.adagc_rule


def test_the_adagc_reference_catches_an_ema_of_unclipped_norms(monkeypatch):
    scales = [[1.0, 1.0], [1.0, 1.0], [1.0, 60.0], [1.0, 1.0], [1.0, 1.0]]
    _check_adagc(2.0, 2, 1.05, 0.9, 1e9, scales, absent=set())
    monkeypatch.setattr(adaptive, "adagc_rule", _adagc_on_unclipped_norms)
    with pytest.raises(AssertionError):
        _check_adagc(2.0, 2, 1.05, 0.9, 1e9, scales, absent=set())


def test_adagc_without_groups_is_one_adagc_group():
    a, b = _params(4), _params(4)
    one = Clipper(a, "adagc", warmup_steps=2, max_norm=3.0)
    grouped = Clipper([{"params": b, "mode": "adagc", "warmup_steps": 2, "max_norm": 3.0}])
    for step in range(6):
        for i, (x, y) in enumerate(zip(a, b)):
            x.grad = _grad(x.shape, step, i, scale=25.0 if step == 4 and i == 1 else 1.0)
            y.grad = x.grad.clone()
        assert torch.equal(one(), grouped())
        for x, y in zip(a, b):
            assert torch.equal(x.grad, y.grad)
    assert one.mode == "adagc" and one.summary()["clipped_fraction"] == grouped.summary()["clipped_fraction"]


# -- skipping considers every group ------------------------------------------------------------


def test_a_non_finite_norm_in_any_group_flags_the_step_and_spikes_only_in_clipped_groups():
    params = _params(4)
    clipper = Clipper(
        [{"params": params[:2], "mode": "norm", "max_norm": 1.0}, {"params": params[2:], "mode": None}],
        skip="spike",
        skip_factor=5.0,
    )
    flags = []
    # (group of the event, kind): a spike or an inf in the clipped or in the excluded group
    events = {2: (1, 100.0), 3: (1, math.inf), 5: (0, 100.0), 7: (0, math.inf)}
    for step in range(9):
        group, scale = events.get(step, (None, 1.0))
        for i, p in enumerate(params):
            mine = (i < 2) == (group == 0) and group is not None
            p.grad = _grad(p.shape, step, i, 1.0 if not mine or scale == math.inf else scale)
            if mine and scale == math.inf:
                p.grad.view(-1)[0] = math.inf
        before = [p.grad.clone() for p in params[2:]]
        clipper()
        flags.append(int(clipper.found_inf))
        for p, b in zip(params[2:], before):
            assert torch.equal(_bits(p.grad), _bits(b)), "the excluded group was written"
    assert flags == [0, 0, 0, 1, 0, 1, 0, 1, 0]
    summary = clipper.summary()
    assert summary["skipped_steps"] == 3 and summary["nonfinite_steps"] == 2
    assert summary["groups"]["group1"]["nonfinite_steps"] == 1 and summary["groups"]["group0"]["nonfinite_steps"] == 1


def test_found_inf_skips_a_fused_optimizer_step_for_an_inf_in_an_excluded_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    clipper = Clipper([{"params": named[:2], "mode": "zclip"}, {"params": named[2:], "mode": None}], skip="nonfinite")
    model(torch.randn(5, 4)).square().mean().backward()
    model[1].weight.grad[0, 0] = math.inf
    before = [p.detach().clone() for p in model.parameters()]
    clipper()
    clipper.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert float(clipper.found_inf) == 1.0


# -- bad input: refused before any grad is touched ---------------------------------------------


def _bad_groups():
    a, b, c = _params(3)
    return [
        ([{"params": [a, b]}, {"params": [b, c]}], ValueError, "one group only"),
        ([{"params": [a, a]}], ValueError, "one group only"),
        ([{"params": [a], "lr": 0.1}], ValueError, "unknown keys"),
        ([{"params": [a], "norm_type": 1.0}], ValueError, "norm type"),
        ([{"params": [a], "skip": "spike"}], ValueError, "whole step"),
        ([{"params": [a], "mode": "median"}], ValueError, "unknown mode"),
        ([{"params": [a], "mode": None, "max_norm": 1.0}], ValueError, "excluded"),
        ([{"params": [a], "mode": "norm", "percentile": 5.0}], ValueError, "does not use"),
        ([{"params": []}], ValueError, "no parameters"),
        ([{"mode": "norm"}], ValueError, "no 'params'"),
        ([{"params": [a], "name": "x"}, {"params": [b], "name": "x"}], ValueError, "distinct"),
        ([{"params": [a], "max_norm": -1.0}], ValueError, "max_norm"),
        ([{"params": [a], "mode": "autoclip", "percentile": 150}], ValueError, "percentile"),
        ([{"params": [a], "mode": "zclip", "warmup_steps": 2.5}], TypeError, "warmup_steps"),
        ([{"params": [a], "mode": "adagc", "adagc_lambda": 0.5}], ValueError, "adagc_lambda"),
        ([{"params": [a], "mode": "agc", "agc_exclude": "head"}], TypeError, "agc_exclude"),
        ([{"params": [a]}, b], TypeError, "mixes"),
        ({"params": [a]}, TypeError, "inside a list"),
        ([{"params": [a, 3]}], TypeError, "expected a Tensor"),
        ([{"params": "a"}], TypeError, "params"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_groups())))
def test_bad_groups_are_refused_with_a_clear_message(case):
    spec, error, match = _bad_groups()[case]
    with pytest.raises(error, match=match):
        Clipper(spec)


def test_adagc_refuses_norm_type_zero_and_mode_none_needs_groups():
    a = _params(1)
    with pytest.raises(ValueError, match="adagc"):
        Clipper([{"params": a, "mode": "adagc"}], norm_type=0)
    with pytest.raises(ValueError, match="unknown Clipper mode"):
        Clipper(a, mode=None)
    Clipper([{"params": a}], mode=None)  # the default mode of groups: all excluded unless they say


def test_an_unwritable_grad_in_a_later_group_refuses_the_call_before_any_grad_is_written():
    params = _params(3)
    clipper = Clipper([{"params": params[:2], "max_norm": 0.01}, {"params": params[2:], "max_norm": 0.01}])
    for i, p in enumerate(params[:2]):
        p.grad = _grad(p.shape, 0, i, 10.0)
    params[2].grad = torch.full((1,), 50.0).expand(params[2].shape)  # elements share memory
    before = [p.grad.clone() for p in params]
    state = {k: v.clone() for k, v in clipper.state.items()}
    with pytest.raises(RuntimeError):
        clipper()
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)
    for key, value in clipper.state.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True, msg=key)


# -- checkpoints and reports --------------------------------------------------------------------


def _grouped(params):
    return Clipper(
        [
            {"params": params[:2], "mode": "zclip", "warmup_steps": 2, "name": "adamw"},
            {"params": params[2:4], "mode": None, "name": "muon"},
            {"params": params[4:], "mode": "adagc", "warmup_steps": 2, "name": "embed"},
        ],
        skip="spike",
    )


def test_grouped_state_dict_round_trip_continues_identically():
    straight_params, resumed_params = _params(6), _params(6)
    straight, first = _grouped(straight_params), _grouped(resumed_params)

    def feed(step):
        for i, (x, y) in enumerate(zip(straight_params, resumed_params)):
            x.grad = _grad(x.shape, step, i, 20.0 if step in (5, 9) else 1.0)
            y.grad = x.grad.clone()

    for step in range(5):
        feed(step)
        straight()
        first()
    resumed = _grouped(resumed_params)
    resumed.load_state_dict(first.state_dict())
    for step in range(5, 11):
        feed(step)
        assert torch.equal(straight(), resumed())
        for x, y in zip(straight_params, resumed_params):
            assert torch.equal(x.grad, y.grad)
    assert repr(straight.summary()) == repr(resumed.summary())  # NaN thresholds compare by repr
    assert set(straight.summary()["groups"]) == {"adamw", "muon", "embed"}


def test_grouped_load_refuses_another_layout_and_bad_group_values():
    params = _params(6)
    clipper = _grouped(params)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, step, i)
        clipper()
    saved = clipper.state_dict()
    other = Clipper([{"params": params[:2], "mode": "zclip", "warmup_steps": 2, "name": "adamw"}, {"params": params[2:], "mode": None}], skip="spike")

    def snapshot(target):
        state = target.state_dict()
        return (
            {k: v for k, v in state.items() if k != "tensors"},
            {k: (v, v.detach().clone()) for k, v in target.state.items()},
            [(p.detach().clone(), p.grad.clone()) for p in params],
        )

    def assert_unchanged(target, before):
        """Nothing a load could touch has changed: state (same tensor objects, same bits), grads, params."""
        plain, tensors, tensors_of_params = before
        assert {k: v for k, v in target.state_dict().items() if k != "tensors"} == plain
        assert target.state.keys() == tensors.keys()
        for key, (obj, copy_) in tensors.items():
            assert target.state[key] is obj, key
            assert obj.dtype == copy_.dtype and torch.equal(obj.reshape(-1).view(torch.uint8), copy_.reshape(-1).view(torch.uint8)), key
        for p, (data, grad) in zip(params, tensors_of_params):
            assert torch.equal(_bits(p.detach()), _bits(data)) and torch.equal(_bits(p.grad), _bits(grad))

    before = snapshot(other)
    with pytest.raises(ValueError):
        other.load_state_dict(saved)
    assert_unchanged(other, before)
    before = snapshot(clipper)
    bad = clipper.state_dict()
    bad["tensors"]["groups.2.tensor_ema"][0] = -1.0
    with pytest.raises(ValueError, match="groups.2.tensor_ema"):
        clipper.load_state_dict(bad)
    assert_unchanged(clipper, before)
    bad = clipper.state_dict()
    bad["tensors"]["groups.0.finite_steps"].fill_(99)
    with pytest.raises(ValueError, match="groups.0.finite_steps"):
        clipper.load_state_dict(bad)
    assert_unchanged(clipper, before)
    clipper.load_state_dict(saved)


def test_norm_log_records_a_grouped_clipper(tmp_path):
    params = _params(6)
    clipper = _grouped(params)
    with fusedclip.NormLog(clipper, tmp_path / "log.jsonl", flush_every=2) as log:
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = _grad(p.shape, step, i)
            clipper()
            log.record()
    header, rows = fusedclip.read_log(tmp_path / "log.jsonl")
    assert header["mode"] == "groups" and len(rows) == 3
    assert math.isnan(rows[0]["threshold"])  # no single threshold
    assert rows[-1]["norm"] == pytest.approx(float(clipper.state["last_norm"]))


# -- no host sync -------------------------------------------------------------------------------

# the host_reads fixture (tests/conftest.py) counts reads of tensor values on the host


def _all_modes(params, norm_type=2.0):
    return Clipper(
        [
            {"params": params[0:1], "mode": "norm"},
            {"params": params[1:2], "mode": "autoclip"},
            {"params": params[2:3], "mode": "zclip", "warmup_steps": 2},
            {"params": params[3:4], "mode": "agc"},
            {"params": params[4:6], "mode": "adagc", "warmup_steps": 2},
            {"params": params[6:], "mode": None},
        ],
        skip="spike",
        norm_type=norm_type,
    )


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_a_grouped_step_reads_nothing_on_the_host(norm_type, host_reads):
    params = _params(8)
    clipper = _all_modes(params, norm_type)
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
    for i, p in enumerate(params):
        p.grad = _grad(p.shape, 0, i)
    for step, scale in enumerate([1.0, 1.0, 1.0, 1e4, math.inf, 1.0]):
        # grads kept in place: new grad tensors would rebuild the plans (host metadata, no sync)
        for i, p in enumerate(params):
            p.grad.copy_(_grad(p.shape, step, i, 1.0 if scale == math.inf else scale))
        if scale == math.inf:
            params[7].grad.view(-1)[0] = math.inf
        host_reads["n"] = 0
        host_reads["names"].clear()
        clipper()
        clipper.step(optimizer)
        assert step == 0 or host_reads["n"] == 0, host_reads["names"]  # the first call builds plans and indices
    assert clipper.summary()["skipped_steps"] >= 2


def test_the_host_read_counter_sees_a_read_in_the_grouped_path(host_reads, monkeypatch):
    """The deliberately syncing version (a group total read back as a Python float) is counted."""
    params = _params(8)
    clipper = _all_modes(params)
    for i, p in enumerate(params):
        p.grad = _grad(p.shape, 0, i)
    clipper()
    real = groups.combine_norms
    monkeypatch.setattr(adaptive, "combine_norms", lambda norms, norm: torch.tensor(float(real(norms, norm)), dtype=torch.float64))
    host_reads["n"] = 0
    clipper()
    assert host_reads["n"] >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_a_grouped_step_does_not_synchronise_on_cuda(norm_type):
    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params(8)]
    clipper = _all_modes(params, norm_type)
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
    for step, scale in enumerate([1.0, 1.0, 1.0, 1e4, math.inf, 1.0]):
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, step, i, 1.0 if scale == math.inf else scale).cuda()
        if scale == math.inf:
            params[7].grad.view(-1)[0] = math.inf
        torch.cuda.synchronize()
        with syncs_raise(step >= 2):  # the first calls build plans and index tensors (host-to-device copies)
            clipper()
            clipper.step(optimizer)
    assert clipper.summary()["skipped_steps"] >= 2


# -- adagc's per-tensor coefficients: every product rounded once, at any coefficient --------------


def _correctly_rounded(x, coef, np_dtype):
    """``x * coef`` (exact rational product) rounded to nearest-even in ``np_dtype``: the float64
    guess and its neighbours, the closest chosen by exact arithmetic."""
    import numpy as np
    from fractions import Fraction

    exact = Fraction(float(x)) * Fraction(float(coef))
    guess = np_dtype(float(exact))
    with np.errstate(over="ignore"):
        candidates = [np.nextafter(guess, np_dtype(-np.inf)), guess, np.nextafter(guess, np_dtype(np.inf))]
    bits = {np.float32: np.uint32, np.float16: np.uint16}[np_dtype]

    def key(c):
        return (abs(Fraction(float(c)) - exact), int(np.array(c).view(bits)) & 1)

    return float(min((c for c in candidates if np.isfinite(c)), key=key))


def _expected(x, coef, np_dtype):
    """What a grad element must become: ``x * float32(coef)`` rounded once when ``float32(coef)``
    stands for the coefficient, else the exact ``x * coef`` rounded once."""
    from fusedclip.backends.torch_backend import coef_needs_wide

    applied = coef if coef_needs_wide(coef) else float(torch.tensor(coef, dtype=torch.float32))
    return _correctly_rounded(x, applied, np_dtype)


_COEFS = st.one_of(
    st.floats(1e-45, 1.0),
    st.floats(1e-320, 1e-37),  # below float32's normal range (float64 subnormals included)
    st.sampled_from([0.0, 1.0, 2.0**-126, 2.0**-126 * (1 - 2.0**-53), 2.0**-149, 3.0 * 2.0**-151]),
)
_VALUES = st.floats(allow_nan=False, allow_infinity=False, width=32)


def _mismatches(scale_each, values, coefs, *, half=False):
    """Elements where ``scale_each`` (``_scale_each_``'s signature) differs from exact rational
    products correctly rounded, for float32 (or float16) grads."""
    import numpy as np

    dtype, np_dtype = (torch.float16, np.float16) if half else (torch.float32, np.float32)
    grads = [torch.tensor(v, dtype=torch.float32).clamp(-65504.0, 65504.0).to(dtype) if half else torch.tensor(v) for v in values]
    inputs = [g.clone() for g in grads]
    scale_each(grads, torch.tensor(coefs[: len(grads)], dtype=torch.float64))
    wrong = []
    for grad, before, coef in zip(grads, inputs, coefs):
        for x, got in zip(before.float().tolist(), grad.float().tolist()):
            if got != _expected(x, coef, np_dtype):
                wrong.append((x, coef, got, _expected(x, coef, np_dtype)))
    return wrong


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.lists(_VALUES, min_size=1, max_size=6), min_size=1, max_size=4),
    coefs=st.lists(_COEFS, min_size=4, max_size=4),
    half=st.booleans(),
)
def test_per_tensor_coefficients_round_each_product_once(values, coefs, half):
    assert _mismatches(adaptive._scale_each_, values, coefs, half=half) == []


def test_adagc_warm_up_applies_a_tiny_coefficient_as_a_norm_group_does():
    """Huge grads and a tiny max_norm: the warm-up coefficient is below float32's normal range."""
    results = {}
    for mode in ("norm", "adagc"):
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.full((4,), 1e30)
        Clipper([{"params": [p], "mode": mode}], max_norm=1e-14)()
        results[mode] = p.grad.clone()
    assert torch.equal(results["adagc"], results["norm"])
    assert abs(results["adagc"][0].item() - 5e-15) / 5e-15 < 2**-23


def test_the_rounding_check_catches_coefficients_applied_in_float32():
    """The deliberately broken version: every coefficient rounded to float32 first."""

    def in_float32(grads, coefs):
        narrow = coefs.to(torch.float32)
        torch._foreach_mul_(grads, [narrow[k] for k in range(len(grads))])

    values, coefs = [[1e30, -3e29, 7.0], [3.0, -7.0, 1.5]], [2.5e-45, 3e-40]
    assert _mismatches(adaptive._scale_each_, values, coefs) == []
    assert _mismatches(in_float32, values, coefs)
