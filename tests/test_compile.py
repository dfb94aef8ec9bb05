"""torch.compile(fullgraph=True): every public function compiles without graph breaks and gives eager's results."""

from __future__ import annotations

import subprocess
import sys

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
    before = clone_params(params)
    with pytest.raises(Exception, match="non-negative"):
        _compiled(lambda ps: fusedclip.clip_grad_norm_(ps, -1.0))(params)
    bits = lambda t: t.detach().reshape(-1).view(torch.uint8)  # noqa: E731
    for p, q in zip(params, before):  # no grad modified, bit for bit
        assert torch.equal(bits(p), bits(q))
        assert (p.grad is None and q.grad is None) or torch.equal(bits(p.grad), bits(q.grad))


def test_opcheck_on_every_op():
    tensors = grads(_params())
    samples = [
        (ops.clip_grad_norm_op, ([t.clone() for t in tensors], 0.5, None, 2.0, False, None, None)),
        (ops.clip_grad_norm_op, ([t.clone() for t in tensors], float("nan"), torch.tensor(0.5), 1.0, False, None, None)),
        (ops.get_total_norm_op, ([t.clone() for t in tensors], 2.0, False, None, None)),
        (ops.clip_grads_with_norm_op, ([t.clone() for t in tensors], 0.5, None, torch.tensor(3.0), None, None)),
        (ops.clip_grad_value_op, ([t.clone() for t in tensors], 0.01, None, None)),
        (ops.total_norm_op, ([t.clone() for t in tensors], 2.0, 0.5, None, True, None, True, None)),
        (ops.total_norm_op, ([t.clone() for t in tensors], 3.0, 0.0, None, False, torch.tensor(0.25), False, None)),
        (ops.total_norm_op, ([t.double() for t in tensors], 1.0, float("nan"), torch.tensor(0.5), True, None, False, None)),
        (ops.scale_op, ([t.clone() for t in tensors], torch.tensor(0.5, dtype=torch.float64), None)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_a_plain_import_registers_the_custom_ops():
    """A saved graph holding fusedclip's ops loads after ``import fusedclip`` alone."""
    code = (
        "import torch, fusedclip\n"
        "names = ['clip_grad_norm_', 'get_total_norm', 'clip_grads_with_norm_', 'clip_grad_value_', 'total_norm', 'scale_']\n"
        "print(all(hasattr(torch.ops.fusedclip, name) for name in names))\n"
        "print(torch.ops.fusedclip.clip_grad_norm_.default._schema)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "True" and lines[1].startswith("fusedclip::clip_grad_norm_(Tensor(a0!)[] grads"), done.stdout


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ps: fusedclip.clip_grads_with_norm_(ps, 0.5, True), "total_norm must be a tensor or a real number"),
        (lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, foreach="yes"), "foreach must be"),
        (lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, error_if_nonfinite="no"), "error_if_nonfinite must be"),
        (lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend="tpu"), "unknown fusedclip backend"),
        (lambda ps: fusedclip.get_total_norm([ps[0].grad, 3]), r"tensors\[1\] is a int"),
    ],
    ids=["total-norm-bool", "foreach-string", "flag-string", "backend-name", "non-tensor"],
)
def test_compiled_and_eager_calls_refuse_the_same_arguments(call, message):
    params = _params()
    with pytest.raises(Exception, match=message):
        call(params)
    with pytest.raises(Exception, match=message):
        _compiled(call)(params)


def test_get_norms_compiles():
    params = _params()
    compiled = _compiled(lambda gs: fusedclip.get_norms(gs, 3.0))(grads(params))
    eager = fusedclip.get_norms(grads(params), 3.0)
    for a, b in zip(compiled, eager):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["norm", "zclip", "autoclip", "agc"])
def test_clipper_call_compiles(mode):
    params = _params((torch.float32,))
    twin = clone_params(params)
    compiled, eager = (fusedclip.Clipper(ps, mode, max_norm=0.5, warmup_steps=2) for ps in (params, twin))
    assert torch.equal(_compiled(compiled.__call__)(), eager())
    for a, b in zip(grads(params), grads(twin)):
        assert torch.equal(a, b)
    for key, value in eager.state.items():
        if value.dim():  # the 0-d statistics: see the next test
            torch.testing.assert_close(compiled.state[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.xfail(
    strict=True,
    reason="torch 2.13's AOTAutograd drops in-place writes to 0-d float64 CPU tensors held as attributes"
    " (reproduced without fusedclip: a 0-d float64 attribute's copy_ inside torch.compile leaves it unchanged;"
    " shape (1,) and float32 are kept), so a compiled Clipper's scalar statistics stay at their old values",
)
def test_clipper_scalar_statistics_under_compile():
    params = _params((torch.float32,))
    twin = clone_params(params)
    compiled, eager = (fusedclip.Clipper(ps, "norm", max_norm=0.5) for ps in (params, twin))
    _compiled(compiled.__call__)()
    eager()
    assert torch.equal(compiled.state["last_norm"], eager.state["last_norm"])


def _scaled(params, init_scale=8.0):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    scaler.scale(torch.ones(()))  # initialise the scale as a backward would
    return scaler


def test_unscale_and_clip_compiles():
    params = _params((torch.float32, torch.bfloat16))
    twin = clone_params(params)
    (opt, opt_twin) = (torch.optim.SGD(ps, lr=0.1) for ps in (params, twin))
    scaler, scaler_twin = _scaled(params), _scaled(twin)
    compiled = _compiled(lambda: fusedclip.unscale_and_clip_(scaler, opt, 0.5))()
    eager = fusedclip.unscale_and_clip_(scaler_twin, opt_twin, 0.5)
    assert torch.equal(compiled, eager)
    for a, b in zip(grads(params), grads(twin)):
        assert torch.equal(a, b)
    ours, theirs = scaler._per_optimizer_states[id(opt)], scaler_twin._per_optimizer_states[id(opt_twin)]
    assert ours["stage"] is theirs["stage"]
    assert [(d, v.item()) for d, v in ours["found_inf_per_device"].items()] == [
        (d, v.item()) for d, v in theirs["found_inf_per_device"].items()
    ]


def test_clip_and_step_compiles():
    """fusedclip's part of clip_and_step_ compiles without a graph break; torch's optimizer step
    itself breaks the graph on purpose (torch.optim's ``_use_grad`` wrapper), so the whole call is
    compared with eager under torch.compile without fullgraph."""
    params = _params((torch.float32,))
    twin, traced = clone_params(params), clone_params(params)
    optimizers = [torch.optim.SGD(ps, lr=0.1, fused=True) for ps in (params, twin, traced)]
    compiled = torch.compile(lambda: fusedclip.clip_and_step_(optimizers[0], 0.5), backend="aot_eager")()
    eager = fusedclip.clip_and_step_(optimizers[1], 0.5)
    assert torch.equal(compiled, eager)
    for a, b in zip(params + grads(params), twin + grads(twin)):
        assert torch.equal(a, b)
    seen = []
    optimizers[2].step = lambda: seen.append(optimizers[2].grad_scale * 1)  # a step Dynamo traces
    _compiled(lambda: fusedclip.clip_and_step_(optimizers[2], 0.5))()
    assert len(seen) == 1 and torch.equal(seen[0], (eager / 0.5).float())
