"""The attack, made permanent: random memory layouts against torch's sequential semantics.

Grads are views into a few shared buffers (slices with steps, transposes, gapped strides, views
sharing elements, the same grad listed twice, expanded and self-overlapping views that must be
refused, inference tensors), clipped under random default devices (cpu, a ``meta`` context, a
``meta`` default) with random truthy flags, by every backend available in the run. Torch clips a
copy of the same buffers; every byte of every buffer is compared, including the bytes between and
around the views. Every refusal must leave every byte untouched.

The property must be able to fail: ``test_the_property_catches_a_broken_overlap_check`` swaps in the
old overlap measure (``numel * itemsize`` from the data address) and asserts the property finds it.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import itertools
import math
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import INTERPRETER
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip import backends, inputs, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _runs_here(name: str) -> bool:
    if name == "triton" and not INTERPRETER:
        return False  # CPU tensors reach the Triton kernels only through the interpreter
    return backends._reason(name, CPU, None) is None


BACKENDS = [name for name in ("cpu", "torch", "triton") if _runs_here(name)]
#: examples per backend: the interpreter runs a launch in tens of milliseconds, the others in less
EXAMPLES = {"cpu": 40, "torch": 25, "triton": 6}


# -- the layouts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    buffer: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def extent(self) -> int:
        """Elements from the first to the last one this view reaches (0 when it has none)."""
        if math.prod(self.shape) == 0:
            return 0
        return 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride))

    def offsets(self) -> list[int]:
        return [
            self.offset + sum(i * s for i, s in zip(index, self.stride))
            for index in itertools.product(*map(range, self.shape))
        ]

    @property
    def self_overlapping(self) -> bool:
        """Two elements at one address (brute force: the oracle for fusedclip's own check)."""
        offsets = self.offsets()
        return len(set(offsets)) != len(offsets)


@dataclass(frozen=True)
class Case:
    dtypes: tuple[torch.dtype, ...]  # one per buffer
    inference: tuple[bool, ...]  # buffers made under torch.inference_mode()
    tails: tuple[int, ...]  # untouched elements after the last view of each buffer
    views: tuple[View, ...]
    order: tuple[int, ...]  # the grads passed: views[i] for i in order (a repeat: one grad listed twice)
    op: str  # norm | with_norm | value | total
    norm_type: float
    ratio: float
    foreach: Any
    error_if_nonfinite: Any
    default_device: str  # cpu | meta-context | meta-default
    warm_up: bool  # first clip another copy of the layout (the next plan may be a rebased one)
    seed: int

    def numels(self) -> list[int]:
        numels = []
        for b, tail in enumerate(self.tails):
            reach = [v.offset + v.extent for v in self.views if v.buffer == b]
            numels.append(max(reach, default=0) + tail + 1)
        return numels

    @property
    def writes(self) -> bool:
        return self.op != "total"

    def refused(self) -> bool:
        """What fusedclip must refuse before touching anything (torch refuses these too, except
        overlapping views with non-zero strides, where it writes in an undefined order)."""
        used = [self.views[i] for i in self.order]
        return self.writes and (
            any(v.self_overlapping for v in used) or any(self.inference[v.buffer] for v in used)
        )


@st.composite
def views(draw: st.DrawFn, buffers: int) -> View:
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.sampled_from([1, 2, 3, 4, 5] * 3 + [0]), min_size=ndim, max_size=ndim))
    order = draw(st.permutations(range(ndim)))  # which dimension is innermost: transposed layouts
    gaps = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=ndim, max_size=ndim))
    stride = [0] * ndim
    reach = 0
    for rank, dim in enumerate(order):  # each stride steps past what the smaller ones reach, plus a gap
        stride[dim] = reach + 1 + gaps[rank]
        reach += max(shape[dim] - 1, 0) * stride[dim]
    bad = draw(st.sampled_from([None] * 10 + ["expand", "overlap"]))
    if bad == "expand":
        dim = draw(st.integers(0, ndim - 1))
        shape[dim] = max(shape[dim], 2)
        stride[dim] = 0
    elif bad == "overlap" and ndim >= 2:
        shape[0], shape[1] = max(shape[0], 3), max(shape[1], 2)
        stride[0], stride[1] = 1, 2  # rows of 2 stepping by 1: offsets repeat
    offset = draw(st.integers(0, 20))
    return View(draw(st.integers(0, buffers - 1)), offset, tuple(shape), tuple(stride))


@st.composite
def cases(draw: st.DrawFn, backend: str) -> Case:
    buffers = draw(st.integers(1, 3))
    dtypes = tuple(draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16])) for _ in range(buffers))
    inference = tuple(draw(st.sampled_from([False] * 9 + [True])) for _ in range(buffers))
    tails = tuple(draw(st.integers(0, 4)) for _ in range(buffers))
    vs: list[View] = []
    for _ in range(draw(st.sampled_from([1, 2, 2, 3, 3, 4, 5]))):
        view = draw(views(buffers))
        if vs and draw(st.booleans()):  # starting at an element of an earlier view: they share memory
            anchor = draw(st.sampled_from(vs))
            offsets = sorted(anchor.offsets()) or [anchor.offset]
            # mostly its far end: past ``numel`` elements from its start when the anchor has gaps
            offset = draw(st.sampled_from(offsets[len(offsets) // 2 :]) | st.sampled_from(offsets))
            view = replace(view, buffer=anchor.buffer, offset=offset)
        vs.append(view)
    order = list(range(len(vs)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # the same grad listed again
        order.insert(draw(st.integers(0, len(order))), draw(st.integers(0, len(vs) - 1)))
    order = draw(st.permutations(order))
    op = draw(st.sampled_from(["norm", "norm", "with_norm", "value", "total"]))
    has_empty = any(math.prod(vs[i].shape) == 0 for i in order)
    # torch raises for inf with an empty grad, where fusedclip deliberately does not
    norm_type = draw(st.sampled_from([2.0, 1.0, 3.0] + ([] if has_empty else [math.inf])))
    return Case(
        dtypes=dtypes,
        inference=inference,
        tails=tails,
        views=tuple(vs),
        order=tuple(order),
        op=op,
        norm_type=norm_type,
        ratio=draw(st.sampled_from([0.05, 0.2, 0.45])),
        foreach=draw(st.sampled_from(TRUTHY_FOREACH)),
        error_if_nonfinite=draw(st.sampled_from(TRUTHY_ERROR)),
        default_device=draw(st.sampled_from(["cpu", "cpu", "meta-context", "meta-default"])),
        warm_up=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


TRUTHY_FOREACH = [None, False, True, 0, 1, np.bool_(True), np.bool_(False), torch.tensor(True), torch.tensor(False)]
TRUTHY_ERROR = [False, True, 0, 1, None, np.bool_(True), torch.tensor(False), torch.tensor(1)]


@dataclass
class Materialized:
    buffers: list[torch.Tensor]
    params: list[torch.nn.Parameter]

    @property
    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]


def materialize(case: Case) -> Materialized:
    """The case's buffers (random values from its seed) and parameters whose grads view them."""
    gen = torch.Generator(device=CPU).manual_seed(case.seed)
    buffers = []
    for numel, dtype, inference in zip(case.numels(), case.dtypes, case.inference):
        values = (torch.randn(numel, generator=gen, dtype=torch.float64, device=CPU) * 4).to(dtype)
        if inference:
            with torch.inference_mode():
                values = values.clone()
        buffers.append(values)
    grads = [buffers[v.buffer].as_strided(v.shape, v.stride, v.offset) for v in case.views]
    params = []
    for i in case.order:
        param = torch.nn.Parameter(torch.empty(case.views[i].shape, dtype=grads[i].dtype, device=CPU))
        param.grad = grads[i]  # a repeated index: one grad object under two parameters
        params.append(param)
    return Materialized(buffers, params)


@contextlib.contextmanager
def default_device(mode: str) -> Iterator[None]:
    """Run with a default device other than the grads' (a context, or the process-wide default)."""
    if mode == "meta-context":
        with torch.device("meta"):
            yield
    elif mode == "meta-default":
        torch.set_default_device("meta")
        try:
            yield
        finally:
            torch.set_default_device(None)
    else:
        yield


# -- running one case on both sides ---------------------------------------------------------------


def _arguments(case: Case, grads: list[torch.Tensor]) -> dict[str, Any]:
    """The op's numeric arguments, the same for fusedclip and torch."""
    wide = [g.detach().to(torch.float64) for g in grads]
    if case.op == "norm":
        ideal = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w, case.norm_type) for w in wide]), case.norm_type))
        return {"max_norm": case.ratio * ideal if ideal > 0 else 1.0}
    if case.op == "with_norm":
        # 1 / ((2 - 1e-6) + 1e-6) is exactly 0.5 in float64: both sides scale by 0.5 exactly
        return {"max_norm": 1.0, "total_norm": torch.tensor(2.0 - 1e-6, dtype=torch.float64, device=CPU)}
    if case.op == "value":
        largest = max((float(w.abs().max()) for w in wide if w.numel()), default=0.0)
        return {"clip_value": case.ratio * largest if largest > 0 else 1.0}
    return {}


def _call(module: Any, case: Case, params: list[torch.nn.Parameter], args: dict[str, Any], backend: str | None) -> Any:
    extra = {} if backend is None else {"backend": backend}
    if case.op == "norm":
        return module.clip_grad_norm_(
            params, args["max_norm"], case.norm_type, case.error_if_nonfinite, case.foreach, **extra
        )
    if case.op == "with_norm":
        return module.clip_grads_with_norm_(params, args["max_norm"], args["total_norm"], case.foreach, **extra)
    if case.op == "value":
        return module.clip_grad_value_(params, args["clip_value"], case.foreach, **extra)
    return module.get_total_norm(
        [p.grad for p in params], case.norm_type, case.error_if_nonfinite, case.foreach, **extra
    )


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8)


def _multiplicity(case: Case) -> list[torch.Tensor]:
    """How many of the grads passed hold each element of each buffer."""
    counts = [torch.zeros(n, dtype=torch.int64, device=CPU) for n in case.numels()]
    for i in case.order:
        view = case.views[i]
        for offset in view.offsets():
            counts[view.buffer][offset] += 1
    return counts


#: relative difference allowed per scaling between fusedclip and torch (the coefficients differ in
#: the last bits: fusedclip's comes from an unrounded float64 total, torch's from the rounded one;
#: a bf16-only call rounds torch's total and coefficient to bf16)
_RTOL = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 2**-6}


def check_case(case: Case, backend: str) -> None:
    """Run ``case`` through fusedclip (``backend``) and through torch; assert torch's semantics."""
    if case.warm_up:  # a first call on another copy of the layout: the next may rebase its plan
        other = materialize(case)
        with contextlib.suppress(RuntimeError):
            _call(fusedclip, case, other.params, _arguments(case, other.grads), backend)
    ours, theirs = materialize(case), materialize(case)
    pristine = [b.clone() for b in ours.buffers]
    grads_before = [(g, g.data_ptr(), g.stride()) for g in ours.grads]
    args = _arguments(case, ours.grads)

    if case.refused():
        with pytest.raises(RuntimeError, match="share memory|inference tensor"):
            with default_device(case.default_device):
                _call(fusedclip, case, ours.params, args, backend)
        for buffer, before in zip(ours.buffers, pristine):
            assert torch.equal(_bits(buffer), _bits(before)), "a refused call modified memory"
        used = [case.views[i] for i in case.order]
        if any(case.inference[v.buffer] for v in used) or any(0 in v.stride and v.self_overlapping for v in used):
            with pytest.raises(RuntimeError):  # torch refuses these too
                _call(torch.nn.utils, case, theirs.params, args, None)
        return

    with default_device(case.default_device):
        result = _call(fusedclip, case, ours.params, args, backend)
    expected = _call(torch.nn.utils, case, theirs.params, args, None)

    for (grad, address, stride), param in zip(grads_before, ours.params):
        assert param.grad is grad and grad.data_ptr() == address and grad.stride() == stride, "not in place"
    if case.op in ("norm", "total"):
        assert result.device == CPU and result.dtype == expected.dtype and result.shape == ()
        rtol = max(_RTOL[d] for d in {g.dtype for g in ours.grads})
        torch.testing.assert_close(result, expected, rtol=rtol, atol=1e-30, equal_nan=True)

    counts = _multiplicity(case)
    # torch rounds each grad's norm to the grad's dtype: its coefficient is as coarse as the coarsest grad
    rtol = max(_RTOL[g.dtype] for g in ours.grads)
    for b, (mine, torchs, before, count) in enumerate(zip(ours.buffers, theirs.buffers, pristine, counts)):
        untouched = count == 0
        assert torch.equal(_bits(mine[untouched]), _bits(before[untouched])), f"buffer {b}: bytes outside the views changed"
        if case.op in ("with_norm", "value", "total"):  # exact on both sides: every byte equal
            assert torch.equal(_bits(mine), _bits(torchs)), f"buffer {b} differs from torch's:\n{mine}\n{torchs}"
            continue
        # clip_grad_norm_: each element scaled once per grad holding it; coefficients may differ in the last bits
        allowed = rtol * count.to(torch.float64) * torchs.to(torch.float64).abs() + 1e-30
        diff = (mine.to(torch.float64) - torchs.to(torch.float64)).abs()
        assert bool((diff <= allowed).all()), f"buffer {b} differs from torch's:\n{mine}\n{torchs}\ncounts {count}"


def _property(backend: str, examples: int, *, phases: tuple[Phase, ...] = tuple(Phase)) -> Any:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @example(ATTACK_CASE)
    @given(cases(backend))
    def prop(case: Case) -> None:
        check_case(case, backend)

    return prop


#: the outside attack: buf = arange(1., 9.); a.grad, b.grad = buf[::2], buf[4:8]
ATTACK_CASE = Case(
    dtypes=(torch.float32,),
    inference=(False,),
    tails=(0,),
    views=(View(0, 0, (4,), (2,)), View(0, 4, (4,), (1,))),
    order=(0, 1),
    op="norm",
    norm_type=2.0,
    ratio=0.05,
    foreach=None,
    error_if_nonfinite=False,
    default_device="cpu",
    warm_up=False,
    seed=1,
)


@pytest.fixture(autouse=True)
def _fresh_plans() -> Iterator[None]:
    plan.PLANS.clear()
    yield
    plan.PLANS.clear()


@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=[pytest.mark.interpreter] if b == "triton" else []) for b in BACKENDS]
)
def test_random_layouts_follow_torchs_sequential_semantics(backend: str) -> None:
    _property(backend, EXAMPLES[backend])()


def test_the_property_catches_a_broken_overlap_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the old measure (a strided grad spans numel * itemsize bytes from its address), overlaps
    reaching past that are missed, the staged copy hides them, and the property must fail."""
    backend = "cpu" if "cpu" in BACKENDS else BACKENDS[0]
    if backend == "torch":
        pytest.skip("the torch backend never stages, so it cannot show the broken check")
    monkeypatch.setattr(plan, "span_bytes", lambda tensor: tensor.numel() * tensor.element_size())
    plan.PLANS.clear()
    with pytest.raises(AssertionError):
        check_case(ATTACK_CASE, backend)
    plan.PLANS.clear()
    # and the random search finds such a layout by itself (no explicit example, no shrinking)
    with pytest.raises(AssertionError):
        _random_search(backend)


def _random_search(backend: str) -> None:
    @settings(max_examples=200, deadline=None, database=None, phases=(Phase.generate,), derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(cases(backend).filter(lambda case: not case.refused()))
    def prop(case: Case) -> None:
        plan.PLANS.clear()  # every example builds its plan with the broken measure
        check_case(case, backend)

    prop()


# -- deterministic attacks ------------------------------------------------------------------------


def _pair(device: str = "cpu") -> tuple[torch.Tensor, list[torch.nn.Parameter]]:
    buf = torch.arange(1.0, 9.0, device=device)
    a, b = (torch.nn.Parameter(torch.zeros(4, device=device)) for _ in range(2))
    a.grad, b.grad = buf[::2], buf[4:8]
    return buf, [a, b]


@pytest.mark.parametrize("op", ["norm", "with_norm", "value"])
def test_the_reported_overlap_on_every_backend(device_backend: tuple[str, str], op: str) -> None:
    device, backend = device_backend
    if device != "cpu":
        pytest.skip("CPU layouts; the GPU variant is below")
    case = replace(ATTACK_CASE, op=op)
    check_case(case, backend)


def test_a_grad_re_strided_in_place_never_reuses_another_layouts_plan() -> None:
    """Same tensor object, address, bytes and contiguity flag; only the strides differ: the key must
    tell the layouts apart (through the extension's gather too)."""
    storage = torch.randn(16, device=CPU)
    param = torch.nn.Parameter(torch.empty(4, device=CPU))
    param.grad = storage.as_strided((4,), (2,))
    layouts = [((4,), (2,)), ((2, 2), (2, 4)), ((2, 2), (4, 3)), ((4,), (3,))]
    keys = []
    for shape, stride in layouts * 2:
        param.grad.as_strided_(shape, stride)  # same tensor object, re-strided
        gathered = inputs.grads_of([param])
        key = plan._cache_key(gathered)
        assert key == plan._cache_key(list(gathered))  # the Python path computes the same key
        keys.append(key)
        twin = torch.nn.Parameter(torch.empty(shape, device=CPU))
        twin_storage = storage.clone()
        twin.grad = twin_storage.as_strided(shape, stride)
        total = fusedclip.clip_grad_norm_([param], 0.5)
        expected = torch.nn.utils.clip_grad_norm_([twin], 0.5)
        torch.testing.assert_close(total, expected)
        torch.testing.assert_close(storage, twin_storage, rtol=2e-6, atol=0)
    assert len(set(keys)) == len(layouts), "two layouts share a key"


def test_a_rebased_plan_sees_overlap_at_its_own_addresses() -> None:
    """Dense layouts are rebased, not rebuilt, when only addresses change: overlap must still be seen."""
    steps = []
    for step in range(3):
        buf = torch.randn(12, device=CPU)
        twin = buf.clone()
        params = [torch.nn.Parameter(torch.empty(8, device=CPU)) for _ in range(2)]
        twins = [torch.nn.Parameter(torch.empty(8, device=CPU)) for _ in range(2)]
        if step < 2:  # disjoint buffers of the same layout: seeds the layout, then rebases
            other = torch.randn(8, device=CPU)
            params[0].grad, params[1].grad = buf[:8], other
            twins[0].grad, twins[1].grad = twin[:8], other.clone()
        else:  # the same layout, sharing four elements
            params[0].grad, params[1].grad = buf[:8], buf[4:12]
            twins[0].grad, twins[1].grad = twin[:8], twin[4:12]
        steps.append((buf, params))  # keep every buffer alive: new addresses each step
        rebased = plan.PLANS.rebased
        fusedclip.clip_grad_norm_(params, 0.1)
        torch.nn.utils.clip_grad_norm_(twins, 0.1)
        torch.testing.assert_close(buf, twin, rtol=2e-6, atol=0)
    assert plan.PLANS.rebased > rebased, "the last call did not go through a rebased plan"


# -- grads that cannot be written in place: refused before any grad is touched ---------------------


def _write_ops(params: list[torch.nn.Parameter], backend: str) -> list[Any]:
    return [
        lambda: fusedclip.clip_grad_norm_(params, 1e-3, backend=backend),
        lambda: fusedclip.clip_grads_with_norm_(params, 1e-3, torch.tensor(5.0, device=CPU), backend=backend),
        lambda: fusedclip.clip_grad_value_(params, 1e-3, backend=backend),
    ]


@pytest.mark.parametrize("bad", ["expand", "overlap", "inference"])
def test_unwritable_grads_are_refused_before_any_grad_is_written(device_backend: tuple[str, str], bad: str) -> None:
    device, backend = device_backend
    gen = torch.Generator(device=CPU).manual_seed(7)
    good = [torch.randn(6, generator=gen, device=CPU).to(device) for _ in range(2)]
    if bad == "expand":
        worst = torch.randn(3, 1, generator=gen, device=CPU).to(device).expand(3, 4)
    elif bad == "overlap":
        worst = torch.randn(10, generator=gen, device=CPU).to(device).as_strided((3, 3), (1, 2))
    else:
        with torch.inference_mode():
            worst = torch.randn(5, generator=gen, device=CPU).to(device)
    grads = [good[0], worst, good[1]]  # the refused grad is not the first: nothing may be written first
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.empty(grad.shape, device=device))
        param.grad = grad
        params.append(param)
    before = [_storage_bytes(g) for g in grads]
    for op in _write_ops(params, backend):
        with pytest.raises(RuntimeError, match="share memory" if bad != "inference" else "inference tensor"):
            op()
        after = [_storage_bytes(g) for g in grads]
        assert all(map(torch.equal, after, before)), "a grad was modified before the refusal"
    # reading is fine, as in torch
    torch.testing.assert_close(
        fusedclip.get_total_norm(grads, backend=backend), torch.nn.utils.get_total_norm([g.clone() for g in grads])
    )
    if bad == "inference":  # inside inference mode torch writes inference tensors, and so do we
        twins = [g.clone() for g in grads]
        with torch.inference_mode():
            twins[1] = twins[1].clone()
            total = fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
        twin_params = []
        for twin in twins:
            param = torch.nn.Parameter(torch.empty(twin.shape, device=device))
            param.grad = twin
            twin_params.append(param)
        with torch.inference_mode():
            expected = torch.nn.utils.clip_grad_norm_(twin_params, 0.5)
        torch.testing.assert_close(total, expected)
        for g, t in zip(grads, twins):
            torch.testing.assert_close(g, t, rtol=2e-6, atol=0)


def _storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of every byte of the tensor's storage (the view's elements and all around them)."""
    whole = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    with torch.inference_mode(tensor.is_inference()):
        return whole.set_(tensor.untyped_storage()).clone().cpu()


def test_torch_refuses_the_same_grads() -> None:
    """The refusals match torch's exception type (torch raises while writing, after scaling others)."""
    with torch.inference_mode():
        inference = torch.randn(3, device=CPU)
    for worst in (torch.randn(3, 1, device=CPU).expand(3, 4), inference):
        param = torch.nn.Parameter(torch.empty(worst.shape, device=CPU))
        param.grad = worst
        with pytest.raises(RuntimeError):
            torch.nn.utils.clip_grad_norm_([param], 1e-3)


def test_a_tensor_subclass_grad_with_a_kernel_backend_says_why() -> None:
    class Wrapped(torch.Tensor):
        pass

    param = torch.nn.Parameter(torch.zeros(3, device=CPU))
    param.grad = torch.randn(3, device=CPU).as_subclass(Wrapped)
    before = param.grad.clone()
    for backend in [b for b in ("cpu", "triton") if b in BACKENDS]:
        with pytest.raises(RuntimeError, match=r"Wrapped, a torch.Tensor subclass.*backend='torch'"):
            fusedclip.clip_grad_norm_([param], 1e-3, backend=backend)
        assert torch.equal(param.grad, before)
    fusedclip.clip_grad_norm_([param], 1e-3)  # the automatic choice runs it on the torch backend


# -- truthy flags ---------------------------------------------------------------------------------

# torch reads these with ``if flag:``, correctly: so does fusedclip
ACCEPTED_FLAGS = [
    False, True, 0, 1, 2, -1, 0.5, np.bool_(True), np.bool_(False), np.int64(1), np.float32(0.0),
    torch.tensor(True), torch.tensor(0), torch.tensor([3]), 1.0,
]  # fmt: skip
# torch misreads a string ("False" is true) and fails on a several-element tensor
REFUSED_FLAGS = ["False", "yes", b"1", [True], torch.tensor([True, False]), torch.tensor(True, device="meta")]


@pytest.mark.parametrize("flag", ACCEPTED_FLAGS, ids=repr)
@pytest.mark.parametrize("name", ["foreach", "error_if_nonfinite"])
def test_flags_torch_accepts_are_accepted(name: str, flag: Any) -> None:
    gen = torch.Generator(device=CPU).manual_seed(3)
    values = [torch.randn(5, generator=gen, device=CPU) for _ in range(2)]
    ours = [torch.nn.Parameter(torch.empty(5, device=CPU)) for _ in values]
    theirs = [torch.nn.Parameter(torch.empty(5, device=CPU)) for _ in values]
    for p, q, v in zip(ours, theirs, values):
        p.grad, q.grad = v.clone(), v.clone()
    torch.testing.assert_close(
        fusedclip.clip_grad_norm_(ours, 0.5, **{name: flag}), torch.nn.utils.clip_grad_norm_(theirs, 0.5, **{name: flag})
    )
    if name == "foreach":
        fusedclip.clip_grad_value_(ours, 0.1, foreach=flag)
        torch.nn.utils.clip_grad_value_(theirs, 0.1, foreach=flag)
        fusedclip.clip_grads_with_norm_(ours, 0.1, torch.tensor(3.0, device=CPU), foreach=flag)
        torch.nn.utils.clip_grads_with_norm_(theirs, 0.1, torch.tensor(3.0, device=CPU), foreach=flag)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)
    if name == "error_if_nonfinite" and bool(flag):
        ours[0].grad[0] = math.inf
        with pytest.raises(RuntimeError, match="non-finite"):
            fusedclip.clip_grad_norm_(ours, 0.5, error_if_nonfinite=flag)


@pytest.mark.parametrize("flag", REFUSED_FLAGS, ids=repr)
@pytest.mark.parametrize("name", ["foreach", "error_if_nonfinite"])
def test_flags_torch_would_misread_are_refused(name: str, flag: Any) -> None:
    param = torch.nn.Parameter(torch.empty(5, device=CPU))
    param.grad = torch.randn(5, device=CPU)
    before = param.grad.clone()
    with pytest.raises((TypeError, ValueError), match=name):
        fusedclip.clip_grad_norm_([param], 1e-3, **{name: flag})
    if name == "foreach":
        with pytest.raises((TypeError, ValueError), match=name):
            fusedclip.clip_grad_value_([param], 1e-3, foreach=flag)
    assert torch.equal(param.grad, before)


# -- a default device other than the grads' -------------------------------------------------------


@pytest.mark.parametrize("mode", ["meta-context", "meta-default"])
def test_cpu_grads_under_a_meta_default_device(device_backend: tuple[str, str], mode: str) -> None:
    device, backend = device_backend
    if device != "cpu":
        pytest.skip("CPU grads")
    gen = torch.Generator(device=CPU).manual_seed(5)
    base, other = torch.randn(6, 8, generator=gen, device=CPU), torch.randn(7, generator=gen, device=CPU)
    twin_base, twin_other = base.clone(), other.clone()
    grads = [base[:, ::2], other, base.t()[1:3]]  # the first and the last share a column
    twins = [twin_base[:, ::2], twin_other, twin_base.t()[1:3]]
    with default_device(mode):
        total = fusedclip.get_total_norm(grads, backend=backend)
        norms = fusedclip.get_norms(grads, backend=backend)
    assert total.device == norms[0].device == norms[1].device == CPU
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(twins))
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty(g.shape, device=CPU))
        p.grad = g
        params.append(p)
    twin_params = []
    for t in twins:
        p = torch.nn.Parameter(torch.empty(t.shape, device=CPU))
        p.grad = t
        twin_params.append(p)
    with default_device(mode):
        total = fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
        fusedclip.clip_grads_with_norm_(params, 0.3, torch.tensor(2.0, device=CPU), backend=backend)
        fusedclip.clip_grads_with_norm_(params, 0.3, 2.0, backend=backend)
        fusedclip.clip_grad_value_(params, 0.01, backend=backend)
        nothing = fusedclip.clip_grad_norm_([], 1.0, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(twin_params, 0.5)
    torch.nn.utils.clip_grads_with_norm_(twin_params, 0.3, torch.tensor(2.0, device=CPU))
    torch.nn.utils.clip_grads_with_norm_(twin_params, 0.3, torch.tensor(2.0, device=CPU))
    torch.nn.utils.clip_grad_value_(twin_params, 0.01)
    assert total.device == CPU
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(base, twin_base, rtol=2e-6, atol=0)
    torch.testing.assert_close(other, twin_other, rtol=2e-6, atol=0)
    assert nothing.device.type == "meta"  # torch's empty result: torch.tensor(0.) on the default device


@pytest.mark.gpu
def test_cpu_grads_under_a_cuda_default_device() -> None:
    buf, params = _pair()
    twin_buf, twin_params = _pair()
    for backend in ("cpu", "torch"):
        with torch.device("cuda"):
            total = fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
            fusedclip.clip_grad_value_(params, 0.1, backend=backend)
        assert total.device == CPU
        torch.nn.utils.clip_grad_norm_(twin_params, 0.5)
        torch.nn.utils.clip_grad_value_(twin_params, 0.1)
        torch.testing.assert_close(buf, twin_buf, rtol=2e-6, atol=0)


@pytest.mark.gpu
def test_the_reported_overlap_on_cuda() -> None:
    for backend in ("cuda", "triton", "torch"):
        buf, params = _pair("cuda")
        twin_buf, twin_params = _pair("cuda")
        fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
        torch.nn.utils.clip_grad_norm_(twin_params, 1.0, foreach=False)  # torch's foreach kernel races here
        torch.testing.assert_close(buf, twin_buf, rtol=2e-6, atol=0)


_FACTORIES = {
    "tensor", "as_tensor", "asarray", "empty", "zeros", "ones", "full", "arange", "range", "linspace",
    "logspace", "eye", "empty_strided", "empty_permuted", "scalar_tensor", "rand", "randn", "randint",
    "randperm", "tril_indices", "triu_indices",
}  # fmt: skip


def test_every_tensor_the_library_makes_names_its_device() -> None:
    """A factory without ``device=`` follows the caller's default device (``meta``, ``cuda``) and breaks
    CPU grads; the library must never rely on the default."""
    missing = []
    for path in sorted((ROOT / "fusedclip").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _FACTORIES
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(keyword.arg == "device" for keyword in node.keywords)
            ):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: torch.{node.func.attr}(...)")
    assert not missing, "factories without device=:\n" + "\n".join(missing)


# -- memory the plan cache keeps ------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096
    except OSError:
        return None


def _clip_non_dense_grads_freed_every_step(backend: str, rows: int, steps: int = 16) -> int:
    """Clip ``steps`` steps of non-dense grads that die after each step; returns the RSS growth."""
    rss_before = _rss_bytes()
    for step in range(steps):
        base = torch.randn(rows, 1024, device=CPU)
        params = [torch.nn.Parameter(torch.empty(rows, 512, device=CPU)), torch.nn.Parameter(torch.empty(16, device=CPU))]
        params[0].grad, params[1].grad = base[:, ::2], torch.randn(64, device=CPU)[::4]
        fusedclip.clip_grad_norm_(params, 1e-3, backend=backend)
        fusedclip.clip_grad_value_(params, 1e-4, backend=backend)
        del base, params
    gc.collect()
    bound = plan.PLANS.table_bytes_bound()
    retained = plan.PLANS.retained_bytes()
    assert len(plan.PLANS) <= plan.PLANS.size
    assert retained <= bound, f"the plan cache keeps {retained} bytes, more than its tables ({bound})"
    rss_after = _rss_bytes()
    return 0 if rss_before is None or rss_after is None else rss_after - rss_before


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in BACKENDS])
def test_the_plan_cache_keeps_no_grad_sized_memory(backend: str) -> None:
    if backend == "cpu":  # 4 MiB buffers: cached staging kept ~130 MiB after 16 steps, the tables ~0
        growth = _clip_non_dense_grads_freed_every_step(backend, 1024)
        assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB after the grads were freed"
    else:  # the interpreter: small grads, fewer steps; what the cache keeps is what counts
        _clip_non_dense_grads_freed_every_step(backend, 16, steps=3)


def test_the_memory_check_catches_a_plan_that_keeps_its_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = next((b for b in ("cpu", "triton") if b in BACKENDS), None)
    if backend is None:
        pytest.skip("no kernel backend stages here")
    bind = plan.DevicePlan.bind

    def leaky_bind(self: plan.DevicePlan, grads: list[torch.Tensor]) -> plan.DevicePlan:
        bound = bind(self, grads)
        self.scratch.setdefault("leak", []).append(bound)  # what a cached staging buffer amounts to
        return bound

    monkeypatch.setattr(plan.DevicePlan, "bind", leaky_bind)
    with pytest.raises(AssertionError, match="plan cache keeps"):
        _clip_non_dense_grads_freed_every_step(backend, 16, steps=2)
