"""torch.compile(fullgraph=True): every public function compiles without graph breaks and gives eager's results."""

from __future__ import annotations

import pytest
import torch
from reference import clone_params, grads, make_params

import fusedclip
from fusedclip import ops

SHAPES = ((17,), (4, 9), (130,), (3, 5, 2))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(dtypes=(torch.float32, torch.bfloat16)):
    return make_params(SHAPES, dtypes, none_grad=True, zero_tensor=False)


def _compiled(fn, backend="aot_eager"):
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_clip_grad_norm_compiles_and_matches_eager(compiler):
    params, twin = _params(), None
    twin = clone_params(params)
    eager = fusedclip.clip_grad_norm_(twin, 0.5)
    compiled = _compiled(lambda ps: fusedclip.clip_grad_norm_(ps, 0.5), compiler)(params)
    assert torch.equal(compiled, eager)
    for a, b in zip(grads(params), grads(twin)):
        assert torch.equal(a, b)


def test_generator_and_tensor_max_norm_and_norm_types():
    params, twin = _params(), None
    twin = clone_params(params)
    model_like = torch.nn.ParameterList(params)

    def step(module, max_norm):
        return fusedclip.clip_grad_norm_(module.parameters(), max_norm, norm_type="inf")

    compiled = _compiled(step)(model_like, torch.tensor(0.25))
    eager = fusedclip.clip_grad_norm_(twin, torch.tensor(0.25), norm_type="inf")
    assert torch.equal(compiled, eager)
    for a, b in zip(grads(params), grads(twin)):
        assert torch.equal(a, b)


def test_split_api_and_value_clipping_compile():
    params = _params()
    twin = clone_params(params)

    def split(ps):
        gs = [p.grad for p in ps if p.grad is not None]
        total = fusedclip.get_total_norm(gs, 2.0)
        fusedclip.clip_grads_with_norm_(ps, 0.3, total)
        fusedclip.clip_grad_value_(ps, 0.01)
        return total

    compiled = _compiled(split)(params)
    eager = split(twin)
    assert torch.equal(compiled, eager)
    for a, b in zip(grads(params), grads(twin)):
        assert torch.equal(a, b)


def test_no_graph_breaks_are_reported():
    params = _params()
    explanation = torch._dynamo.explain(lambda ps: fusedclip.clip_grad_norm_(ps, 1.0))(params)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_bad_constant_arguments_still_raise_under_compile():
    params = _params()
    with pytest.raises(Exception, match="non-negative"):
        _compiled(lambda ps: fusedclip.clip_grad_norm_(ps, -1.0))(params)


def test_opcheck_on_every_op():
    tensors = grads(_params())
    samples = [
        (ops.clip_grad_norm_op, ([t.clone() for t in tensors], 0.5, None, 2.0, False, None, None)),
        (ops.clip_grad_norm_op, ([t.clone() for t in tensors], float("nan"), torch.tensor(0.5), 1.0, False, None, None)),
        (ops.get_total_norm_op, ([t.clone() for t in tensors], 2.0, False, None, None)),
        (ops.clip_grads_with_norm_op, ([t.clone() for t in tensors], 0.5, None, torch.tensor(3.0), None, None)),
        (ops.clip_grad_value_op, ([t.clone() for t in tensors], 0.01, None, None)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)
