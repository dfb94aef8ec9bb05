"""Streams, CUDA graphs and misaligned grads: the bookkeeping on the CPU, the real thing on a GPU.

* Table uploads are ordered for the streams that read them (``plan.UploadOrder``): a reading stream
  other than the upload's waits on the upload's event once and records the table memory as used.
* Workspaces (``DevicePlan.workspace``): one per (plan, stream) for eager launches; a fresh one, owned
  by the graph, for every launch captured in a CUDA graph, never handed to an eager call or another
  graph. Checked with a fake capture state through the emulated ``cuda`` backend and Triton's
  interpreter, and with real graphs on a GPU (the ``gpu`` tests).
* Grads at addresses that are not a multiple of their element size are refused by every kernel
  backend before any grad is read or written; the automatic choice gives them to the torch backend.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import HAS_CUDA, require_backend
from reference import check_clip_against_torch, clone_params, grads, make_params

import fusedclip
from fusedclip import plan
from fusedclip.backends import cuda_backend

KERNEL_BACKENDS = ["cpu", "triton", "cuda"]


# --------------------------------------------------------------------------------------------
# upload ordering (plan.UploadOrder), with fake streams
# --------------------------------------------------------------------------------------------
class _FakeStream:
    def __init__(self, handle: int, log: list) -> None:
        self.cuda_stream = handle
        self.log = log

    def wait_event(self, event) -> None:
        self.log.append(("wait", self.cuda_stream, event))


class _FakePacked:
    def __init__(self, log: list) -> None:
        self.log = log

    def record_stream(self, stream) -> None:
        self.log.append(("record", stream.cuda_stream))


def test_a_reading_stream_waits_on_the_upload_once_and_records_the_memory():
    log: list = []
    event = object()
    order = plan.UploadOrder(event, _FakePacked(log), upload_stream=1)
    upload, other, third = (_FakeStream(h, log) for h in (1, 2, 3))
    order.ready_on(upload)
    assert log == [], "the upload's own stream is ordered after it already"
    for _ in range(3):
        order.ready_on(other)
    assert log == [("wait", 2, event), ("record", 2)], "one wait and one record per new stream"
    order.ready_on(third)
    order.ready_on(upload)
    assert log[2:] == [("wait", 3, event), ("record", 3)]


def test_upload_ordering_is_done_once_per_stream_under_threads():
    log: list = []
    order = plan.UploadOrder(object(), _FakePacked(log), upload_stream=0)
    streams = [_FakeStream(h, log) for h in range(1, 9)]
    barrier = threading.Barrier(8)

    def run() -> None:
        barrier.wait()
        for stream in streams * 20:
            order.ready_on(stream)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [("wait", h) for h in range(1, 9)] + [("record", h) for h in range(1, 9)]
    assert sorted(entry[:2] for entry in log) == sorted(expected)


def _cuda_looking_plan(monkeypatch: pytest.MonkeyPatch, capturing: list[bool], current: list[int], log: list):
    """A dense plan that claims the device cuda:0, with device tables given an UploadOrder over fake
    streams, and torch.cuda's capture state and current stream answered by the lists."""
    grad = torch.randn(10)
    device_plan = plan.build_plan([grad], True).devices[0]
    cpu_tables = device_plan._cpu_tables()
    cuda = torch.device("cuda", 0)
    order = plan.UploadOrder(object(), _FakePacked(log), upload_stream=1)
    device_plan.device = cuda
    device_plan._tables[cuda] = plan.replace(cpu_tables, order=order)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(current[0], log))
    return device_plan, grad


def test_eager_table_reads_order_the_current_stream(monkeypatch):
    log: list = []
    capturing, current = [False], [1]
    device_plan, grad = _cuda_looking_plan(monkeypatch, capturing, current, log)
    device_plan.kernel_tables([grad])
    assert log == []
    current[0] = 7  # the plan was built on stream 1 and is now used on stream 7
    first = device_plan.kernel_tables([grad])
    assert [entry[:2] for entry in log] == [("wait", 7), ("record", 7)]
    assert device_plan.kernel_tables([grad]) is first and len(log) == 2


def test_captured_launches_get_tables_of_their_own(monkeypatch):
    log: list = []
    capturing, current = [True], [1]
    device_plan, grad = _cuda_looking_plan(monkeypatch, capturing, current, log)
    eager = device_plan._tables[device_plan.device]
    made = []
    monkeypatch.setattr(plan.DevicePlan, "_captured_tables", lambda self: made.append(object()) or made[-1])
    assert device_plan.kernel_tables([grad]) is made[0]
    assert device_plan.kernel_tables([grad]) is made[1], "every captured launch gets its own upload"
    capturing[0] = False
    assert device_plan.kernel_tables([grad]) is eager and log == []


# --------------------------------------------------------------------------------------------
# workspace keying (DevicePlan.workspace)
# --------------------------------------------------------------------------------------------
def test_workspace_keying_rule():
    device_plan = plan.build_plan([torch.randn(3)], True).devices[0]
    made: list[object] = []

    def make() -> object:
        made.append(object())
        return made[-1]

    eager_a = device_plan.workspace("k", 10, make, capturing=False)
    assert device_plan.workspace("k", 10, make, capturing=False) is eager_a
    eager_b = device_plan.workspace("k", 11, make, capturing=False)
    assert eager_b is not eager_a, "two streams never share a workspace"
    # captures on the same stream as eager calls: a fresh workspace each, never an eager one
    graph_1 = device_plan.workspace("k", 10, make, capturing=True)
    graph_2 = device_plan.workspace("k", 10, make, capturing=True)
    assert len({id(eager_a), id(eager_b), id(graph_1), id(graph_2)}) == 4
    # eager calls after the captures still get their own, unchanged
    assert device_plan.workspace("k", 10, make, capturing=False) is eager_a
    assert device_plan.workspace("k", 11, make, capturing=False) is eager_b
    # the graphs' workspaces are kept alive by the plan for their replays
    kept = [v for k, v in device_plan.scratch.items() if k[1] == plan._CAPTURED_WORKSPACES]
    assert kept == [[graph_1, graph_2]]
    assert device_plan.workspace("other", 10, make, capturing=False) not in (eager_a, eager_b)


@pytest.fixture(params=["cuda", "triton"])
def kernel_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda":
        request.getfixturevalue("emulated_cuda")
    require_backend("cpu", request.param)
    return request.param


def _workspaces(device_plan: plan.DevicePlan) -> tuple[dict, list]:
    eager = {k: v for k, v in device_plan.scratch.items() if isinstance(k, tuple) and k[1] != plan._CAPTURED_WORKSPACES}
    captured = [w for k, v in device_plan.scratch.items() if isinstance(k, tuple) and k[1] == plan._CAPTURED_WORKSPACES
                for w in v]  # fmt: skip
    return eager, captured


def test_backends_give_captured_launches_their_own_workspace(kernel_backend, monkeypatch):
    """With a fake capture state, the real backends (emulated cuda, interpreted Triton) take a fresh
    workspace per captured norm launch and leave the eager one alone; results stay torch's."""
    from fusedclip.backends import triton_backend

    plan.PLANS.clear()
    params = make_params([(300,), (17,), (64,)], [torch.float32, torch.bfloat16], device="cpu", zero_tensor=False,
                         none_grad=False)  # fmt: skip
    capturing = [False]
    monkeypatch.setattr(cuda_backend, "_capturing", lambda device: capturing[0])
    monkeypatch.setattr(triton_backend, "_capturing", lambda device: capturing[0])

    def clip_and_check(max_norm: float) -> None:
        before = [p.grad.clone() for p in params]
        theirs = clone_params(params)
        total = fusedclip.clip_grad_norm_(params, max_norm, backend=kernel_backend)
        reference = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        check_clip_against_torch(params, theirs, before, total, reference, max_norm, 2.0)

    clip_and_check(1e3)
    device_plan = plan.PLANS.plan_for(grads(params)).single
    eager, captured = _workspaces(device_plan)
    assert len(eager) == 1 and captured == []
    eager_space = next(iter(eager.values()))
    capturing[0] = True
    clip_and_check(0.5)
    clip_and_check(0.25)
    capturing[0] = False
    clip_and_check(0.1)
    eager_after, captured = _workspaces(device_plan)
    assert eager_after == eager and next(iter(eager_after.values())) is eager_space
    assert len(captured) == 2 and all(w is not eager_space for w in captured)
    assert captured[0] is not captured[1]
    plan.PLANS.clear()


# --------------------------------------------------------------------------------------------
# grads not aligned to their element size
# --------------------------------------------------------------------------------------------
def _misaligned(numel: int, dtype: torch.dtype, device: str = "cpu", offset: int = 1) -> torch.Tensor:
    """A dense grad starting ``offset`` bytes into a byte storage (not a multiple of its itemsize)."""
    storage = torch.zeros(numel * dtype.itemsize + 16, dtype=torch.uint8, device=device).untyped_storage()
    grad = torch.empty(0, dtype=dtype, device=device).set_(storage[offset:], 0, (numel,), (1,))
    grad.copy_(torch.randn(numel, dtype=torch.float64).to(device, dtype) * 10)
    assert grad.data_ptr() % dtype.itemsize != 0
    return grad


def _param(grad: torch.Tensor) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.empty(grad.shape, dtype=grad.dtype, device=grad.device), requires_grad=False)
    param.grad = grad
    return param


@pytest.fixture(params=KERNEL_BACKENDS)
def any_kernel_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda":
        request.getfixturevalue("emulated_cuda")
    require_backend("cpu", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_misaligned_grads_are_refused_before_any_grad_is_touched(any_kernel_backend, dtype):
    plan.PLANS.clear()
    aligned = torch.randn(50, dtype=torch.float32) * 10
    bad = _misaligned(33, dtype)
    params = [_param(aligned), _param(bad)]
    before = [p.grad.clone() for p in params]
    calls = [
        lambda: fusedclip.clip_grad_norm_(params, 1e-3, backend=any_kernel_backend),
        lambda: fusedclip.get_total_norm(grads(params), backend=any_kernel_backend),
        lambda: fusedclip.clip_grad_value_(params, 1e-3, backend=any_kernel_backend),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="gradient 1 .* not a multiple of its element size"):
            call()
        for p, b in zip(params, before):
            assert torch.equal(p.grad, b), "a refused call modified a grad"
    # the automatic choice takes them (the torch backend) and gives torch's result
    theirs = clone_params(params)
    total = fusedclip.clip_grad_norm_(params, 0.5)
    reference = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    check_clip_against_torch(params, theirs, before, total, reference, 0.5, 2.0)
    plan.PLANS.clear()


def test_alignment_is_judged_per_address_not_per_layout(any_kernel_backend):
    """A plan rebased from a layout seen aligned must refuse misaligned grads of that layout, and
    a layout first seen misaligned must not refuse aligned grads later."""
    plan.PLANS.clear()
    dtype = torch.float32
    for first_aligned in (True, False):
        plan.PLANS.clear()
        order = [True, False] if first_aligned else [False, True]
        for is_aligned in order:
            grad = torch.randn(40, dtype=dtype) if is_aligned else _misaligned(40, dtype, offset=2)
            params = [_param(grad)]
            if is_aligned:
                theirs = clone_params(params)
                before = [grad.clone()]
                total = fusedclip.clip_grad_norm_(params, 0.5, backend=any_kernel_backend)
                reference = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
                check_clip_against_torch(params, theirs, before, total, reference, 0.5, 2.0)
            else:
                with pytest.raises(RuntimeError, match="not a multiple of its element size"):
                    fusedclip.clip_grad_norm_(params, 0.5, backend=any_kernel_backend)
    plan.PLANS.clear()


def test_alignment_reason_names_the_first_misaligned_grad():
    assert plan._alignment_reason((0, 1), (4096, 8192), (torch.float32, torch.float64)) is None
    assert plan._alignment_reason((), (), ()) is None
    # a 2-byte offset is fine for 16-bit grads, not for float32
    assert plan._alignment_reason((0,), (4098,), (torch.bfloat16,)) is None
    reason = plan._alignment_reason((3, 5), (4098, 4098), (torch.float16, torch.float32))
    assert reason is not None and reason.startswith("gradient 5 (torch.float32)")


# --------------------------------------------------------------------------------------------
# on a GPU
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request: pytest.FixtureRequest) -> str:
    if not HAS_CUDA:
        pytest.skip("no CUDA device on this machine")
    require_backend("cuda", request.param)
    return request.param


def _cuda_params(count: int, seed: int) -> list[torch.nn.Parameter]:
    sizes = [1, 17, 4096, 65536 + 3, 300_001, 255, 8]
    shapes = [(sizes[i % len(sizes)],) for i in range(count)]
    return make_params(shapes, [torch.float32, torch.bfloat16, torch.float16], device="cuda", seed=seed,
                       zero_tensor=False, none_grad=False)  # fmt: skip


@pytest.mark.gpu
def test_gpu_misaligned_grads_are_refused(gpu_backend):
    bad = _misaligned(1000, torch.float32, device="cuda")
    params = [_param(torch.randn(100, device="cuda")), _param(bad)]
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="not a multiple of its element size"):
        fusedclip.clip_grad_norm_(params, 1e-3, backend=gpu_backend)
    torch.cuda.synchronize()
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
