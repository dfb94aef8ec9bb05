"""The GPU contract of the kernel backends (``triton`` and ``cuda``), checked on a CUDA device.

* exactly two kernel launches per ``clip_grad_norm_`` call, for any tensor count and dtype mix, and
  no copies or memsets (counted with torch.profiler);
* CUDA-graph capture and replay, with grads changed in place between replays;
* no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``);
* an unclipped call touches no grad byte (the scale kernel is pointed at unmapped memory);
* one tensor of more than 2**31 elements; 10**5 tensors in one call;
* work is issued on the current stream, and concurrent calls on two streams do not interfere (two
  streams clipping their own grads with nothing synchronising them; graph replays interleaved with
  eager calls of other norm types on the same grads);
* a plan's tables uploaded on one stream are read safely on another, and an evicted plan's tables
  are not reused while another stream still reads them; two graphs captured on one stream replay
  interleaved with eager calls, and concurrently, each with a workspace of its own.

Every test needs a GPU (the ``gpu`` marker skips them elsewhere); a backend that cannot run is
skipped with its reason.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import HAS_CUDA, require_backend, syncs_raise
from reference import (
    DTYPE_SETS,
    assert_no_worse_than_torch,
    check_clip_against_torch,
    clone_params,
    grads,
    ideal_total_norm,
    make_params,
)

import fusedclip
from fusedclip import plan

pytestmark = pytest.mark.gpu

KERNEL_BACKENDS = ["triton", "cuda"]


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if not HAS_CUDA:
        pytest.skip("no CUDA device on this machine")
    require_backend("cuda", request.param)
    return request.param


def _shapes(count: int) -> list[tuple[int, ...]]:
    """``count`` shapes of varied sizes, some spanning several 64 Ki-element chunks."""
    sizes = [1, 17, 4096, 65536 + 3, 300_001, 255, 8]
    return [(sizes[i % len(sizes)],) for i in range(count)]


def _cuda_params(count: int, dtypes: str, seed: int = 0) -> list[torch.nn.Parameter]:
    return make_params(_shapes(count), DTYPE_SETS[dtypes], device="cuda", seed=seed, zero_tensor=False, none_grad=False)


# --------------------------------------------------------------------------------------------
# launches
# --------------------------------------------------------------------------------------------
def _device_activity(fn) -> tuple[list[str], list[str]]:
    """(kernel names, copy/memset names) that ``fn`` put on the device."""
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    transfers = [e.name for e in device_events if e.name.startswith(("Memcpy", "Memset"))]
    kernels = [e.name for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    return kernels, transfers


@pytest.mark.parametrize("count", [1, 7, 300, 2000])
@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "all4"])
def test_exactly_two_kernel_launches_per_clip_grad_norm(backend, count, dtypes):
    params = _cuda_params(count, dtypes)
    fusedclip.clip_grad_norm_(params, 1e-3, backend=backend)  # compile, plan, workspace
    for max_norm in (1e-3, math.inf):  # clipped, and unclipped (the scale kernel exits at once)
        kernels, transfers = _device_activity(lambda: fusedclip.clip_grad_norm_(params, max_norm, backend=backend))
        assert len(kernels) == 2, f"expected 2 kernels, got {kernels}"
        assert transfers == [], f"a call must not copy or memset: {transfers}"
    # general p (3) adds one launch: the norm scale max |x| before the scaled sum (engine.total_norm)
    for norm_type, launches in ((0.0, 2), (1.0, 2), (math.inf, 2), (-math.inf, 2), (3.0, 3), (-1.0, 3)):
        kernels, transfers = _device_activity(
            lambda: fusedclip.clip_grad_norm_(params, 1e-3, norm_type, backend=backend)  # noqa: B023
        )
        assert len(kernels) == launches and transfers == [], (norm_type, kernels, transfers)
    kernels, transfers = _device_activity(lambda: fusedclip.clip_grad_value_(params, 0.1, backend=backend))
    assert len(kernels) == 1 and transfers == [], (kernels, transfers)


# --------------------------------------------------------------------------------------------
# graphs and syncs
# --------------------------------------------------------------------------------------------
def test_cuda_graph_capture_and_replay_follows_grads_changed_in_place(backend):
    params = _cuda_params(40, "all4", seed=1)
    max_norm = 0.5
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up where the capture will run: compile, plan, workspace
        for _ in range(2):
            fusedclip.clip_grad_norm_(params, max_norm, backend=backend)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = fusedclip.clip_grad_norm_(params, max_norm, backend=backend)

    # other calls push the captured plan out of the LRU; captured plans are pinned, so the graph's
    # tables and workspaces must survive that
    keep = [torch.randn(5, device="cuda") for _ in range(plan.CACHE_SIZE + 4)]
    for tensor in keep:
        fusedclip.get_total_norm([tensor], backend=backend)
    gc.collect()

    generator = torch.Generator().manual_seed(5)
    for step in range(4):
        scale = [1e-3, 1.0, 30.0, 1e3][step]  # unclipped first, clipped after
        fresh = [(torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale).to("cuda", p.dtype)
                 for p in params]
        for p, f in zip(params, fresh):
            p.grad.copy_(f)  # in place: the captured addresses stay valid
        theirs = clone_params(params)
        graph.replay()
        reference_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        check_clip_against_torch(params, theirs, fresh, total, reference_total, max_norm, 2.0)


def test_no_host_synchronisation(backend):
    params = _cuda_params(30, "bf16+fp32", seed=2)
    device_max_norm = torch.tensor(0.5, device="cuda")
    calls = [
        lambda: fusedclip.clip_grad_norm_(params, 0.5, backend=backend),
        lambda: fusedclip.clip_grad_norm_(params, device_max_norm, 0.0, backend=backend),
        lambda: fusedclip.clip_grad_norm_(params, 0.5, math.inf, backend=backend),
        lambda: fusedclip.clip_grads_with_norm_(
            params, 0.5, fusedclip.get_total_norm(grads(params), 3.0, backend=backend), backend=backend
        ),
        lambda: fusedclip.clip_grad_value_(params, 0.01, backend=backend),
    ]
    for call in calls:  # warm up: compile, plan (its first table upload may sync), workspace
        call()
    torch.cuda.synchronize()
    with syncs_raise():
        for call in calls:
            call()
    torch.cuda.synchronize()


_SCALE_AT_UNMAPPED_MEMORY = textwrap.dedent(
    """
    import sys
    import torch
    from fusedclip import backends, plan
    from fusedclip.backends.base import DeviceWork

    name, coef = sys.argv[1], float(sys.argv[2])
    numel = 1 << 20
    holder = torch.ones(numel, device="cuda")
    work = DeviceWork(plan.build_plan([holder], True).devices[0], [holder])
    # one float32 tensor of 1 Mi elements at address 64 KiB, which no CUDA allocation maps
    packed = torch.tensor([1 << 16, numel, 0, 0, 1, 0, 0], dtype=torch.int64, device="cuda")
    tables = plan._slice_tables(packed, 1, 1, numel, numel)
    coef = torch.tensor(coef, dtype=torch.float64, device="cuda")
    backends.get_backend(name).launch_scale(work, tables, coef)
    torch.cuda.synchronize()
    print("no grad byte touched")
    """
)


def _scale_at_unmapped_memory(backend: str, coef: float) -> subprocess.CompletedProcess:
    # A fault poisons the CUDA context, so each launch runs in its own process.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", _SCALE_AT_UNMAPPED_MEMORY, backend, repr(coef)],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )  # fmt: skip


def test_unclipped_scale_touches_no_grad_byte(backend):
    done = _scale_at_unmapped_memory(backend, 1.0)
    assert done.returncode == 0 and "no grad byte touched" in done.stdout, done.stderr[-2000:]
    # the control: any other coefficient (above 1 too: a folded grad scale) dereferences the grad
    for coef in (0.5, 2.5, math.nan):
        done = _scale_at_unmapped_memory(backend, coef)
        assert done.returncode != 0, f"coef {coef}: the scale kernel never read the grad"


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------
def test_one_bfloat16_tensor_beyond_2_to_the_31_elements(backend):
    numel = 2**31 + 2**20 + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * numel * 2:
        pytest.skip(f"needs {3 * numel * 2 / 2**30:.1f} GiB of free GPU memory")
    grad = torch.zeros(numel, dtype=torch.bfloat16, device="cuda")
    marks = {0: 4.0, 2**31 - 1: 1.0, 2**31 + 5: 2.0, numel - 2: -3.0, numel - 1: 3.0}
    for index, value in marks.items():
        grad[index] = value
    param = torch.nn.Parameter(torch.zeros((), dtype=torch.bfloat16, device="cuda").expand(numel), requires_grad=False)
    param.grad = grad

    sum_squares = sum(v * v for v in marks.values())
    expectations = {2.0: math.sqrt(sum_squares), 1.0: sum(abs(v) for v in marks.values()), math.inf: 4.0, 0.0: 1.0}
    for norm_type, expected in expectations.items():
        total = fusedclip.get_total_norm([grad], norm_type, backend=backend)
        assert total.dtype == torch.bfloat16
        assert float(total) == float(torch.tensor(expected, dtype=torch.float64).to(torch.bfloat16)), norm_type

    total = fusedclip.clip_grad_norm_([param], 1.0, backend=backend)
    coef = torch.tensor(1.0 / (math.sqrt(sum_squares) + 1e-6), dtype=torch.float64).float()
    for index, value in marks.items():
        expected = (torch.tensor(value, dtype=torch.float32) * coef).to(torch.bfloat16)
        assert float(grad[index]) == float(expected), index
    assert int(torch.count_nonzero(grad)) == len(marks), "a zero became non-zero: offsets wrapped"


def test_a_hundred_thousand_tensors_in_one_call(backend):
    generator = torch.Generator().manual_seed(4)
    count = 100_000
    sizes = torch.randint(1, 65, (count,), generator=generator).tolist()
    dtypes = [torch.float32, torch.bfloat16]
    params = []
    for i, size in enumerate(sizes):
        param = torch.nn.Parameter(torch.empty(size, dtype=dtypes[i % 2], device="cuda"), requires_grad=False)
        params.append(param)
    for dtype in dtypes:  # fill the grads of one dtype from one random buffer (one upload)
        group = [p for p in params if p.dtype == dtype]
        values = torch.randn(sum(p.numel() for p in group), generator=generator).to("cuda", dtype)
        for p, v in zip(group, torch.split(values, [p.numel() for p in group])):
            p.grad = v.clone()
    theirs = clone_params(params)
    before = [p.grad.clone() for p in params]
    max_norm = 1.0

    ours_total = fusedclip.clip_grad_norm_(params, max_norm, backend=backend)
    torch_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    ideal = ideal_total_norm(before, 2.0)
    assert_no_worse_than_torch(ours_total, torch_total, ideal, what="total norm")
    coef = torch.clamp(max_norm / (ideal + 1e-6), max=1.0)
    for dtype in dtypes:  # every element of every grad, one comparison per dtype
        pick = [i for i, p in enumerate(params) if p.dtype == dtype]
        mine = torch.cat([params[i].grad for i in pick])
        reference = torch.cat([theirs[i].grad for i in pick])
        ideal_grads = torch.cat([before[i] for i in pick]).double().cpu() * coef
        assert_no_worse_than_torch(mine, reference, ideal_grads, what=f"{dtype} grads")


# --------------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------------
def test_work_is_ordered_on_the_current_stream(backend):
    params = make_params([(4_000_000,), (3_000_001,), (64,)], [torch.bfloat16, torch.float32], device="cuda",
                         zero_tensor=False, none_grad=False)  # fmt: skip
    fusedclip.clip_grad_norm_(params, 1.0, backend=backend)  # warm up
    generator = torch.Generator().manual_seed(9)
    fresh_host = [torch.randn(p.shape, generator=generator) * 50 for p in params]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for p, f in zip(params, fresh_host):
            p.grad.copy_(f.to("cuda", p.dtype))  # the new values exist on `side` only
        total = fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    torch.cuda.synchronize()
    fresh = [f.to("cuda", p.dtype) for f, p in zip(fresh_host, params)]
    theirs = [torch.nn.Parameter(f.clone()) for f in fresh]
    for t, f in zip(theirs, fresh):
        t.grad = f.clone()
    reference_total = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    check_clip_against_torch(params, theirs, fresh, total, reference_total, 1.0, 2.0)


@pytest.mark.parametrize("norm_type", [2.0, 0.0])
def test_concurrent_calls_on_two_streams_do_not_share_a_workspace(backend, norm_type):
    params = _cuda_params(60, "all4", seed=3)
    tensors = grads(params)
    expected = fusedclip.get_total_norm(tensors, norm_type, backend=backend)
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    results = []
    for _ in range(25):
        for stream in streams:
            with torch.cuda.stream(stream):
                results.append(fusedclip.get_total_norm(tensors, norm_type, backend=backend))
    torch.cuda.synchronize()
    assert all(torch.equal(r, expected) for r in results)


def _fresh_values(params: list[torch.nn.Parameter], generator: torch.Generator, scale: float) -> list[torch.Tensor]:
    """New random grads made on the device, on the current stream (no host transfer, no sync)."""
    return [
        (torch.randn(p.shape, device="cuda", generator=generator) * scale).to(p.dtype)
        for p in params
    ]


def test_two_streams_clip_their_own_grads_with_no_synchronisation_between(backend):
    sets = [_cuda_params(25, "all4", seed=7), _cuda_params(33, "bf16+fp32", seed=8)]
    for params in sets:  # plans and first workspaces, on the default stream
        fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    generators = [torch.Generator(device="cuda").manual_seed(20 + i) for i in range(2)]
    records = []  # (set index, grads before, returned total, grads after), all still on the device
    max_norm = 0.5
    for step in range(8):
        for index, (stream, params) in enumerate(zip(streams, sets)):
            with torch.cuda.stream(stream):  # the two streams' work overlaps: nothing waits in between
                before = _fresh_values(params, generators[index], [1e-3, 30.0][(step + index) % 2])
                for p, value in zip(params, before):
                    p.grad.copy_(value)
                total = fusedclip.clip_grad_norm_(params, max_norm, backend=backend)
                records.append((index, before, total, [p.grad.clone() for p in params]))
    torch.cuda.synchronize()
    for index, before, total, after in records:
        ours = []
        for value, grad in zip(before, after):
            param = torch.nn.Parameter(torch.empty_like(value), requires_grad=False)
            param.grad = grad
            ours.append(param)
        theirs = []
        for value in before:
            param = torch.nn.Parameter(torch.empty_like(value), requires_grad=False)
            param.grad = value.clone()
            theirs.append(param)
        reference_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        check_clip_against_torch(ours, theirs, before, total, reference_total, max_norm, 2.0)


def test_graph_replays_interleaved_with_eager_calls_on_the_same_grads(backend):
    params = _cuda_params(40, "all4", seed=6)
    max_norm = 0.5
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up where the capture will run
        for _ in range(2):
            fusedclip.clip_grad_norm_(params, max_norm, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_total = fusedclip.clip_grad_norm_(params, max_norm, backend=backend)

    generator = torch.Generator().manual_seed(12)
    # the same plan (same grads) run by the graph and eagerly, the eager calls with other norm
    # types too (other kernel variants over the same workspace and counters)
    steps = [("graph", 2.0), ("eager", 2.0), ("graph", 2.0), ("eager", math.inf), ("graph", 2.0), ("eager", 0.0),
             ("eager", 2.0), ("graph", 2.0)]  # fmt: skip
    for step, (how, norm_type) in enumerate(steps):
        scale = [1e-3, 30.0][step % 2]
        fresh = [(torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale).to("cuda", p.dtype)
                 for p in params]  # fmt: skip
        for p, f in zip(params, fresh):
            p.grad.copy_(f)
        theirs = clone_params(params)
        if how == "graph":
            graph.replay()
            total = captured_total
        else:
            total = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend)
        reference_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
        check_clip_against_torch(params, theirs, fresh, total, reference_total, max_norm, norm_type)


# --------------------------------------------------------------------------------------------
# tables and workspaces across streams and graphs
# --------------------------------------------------------------------------------------------
_DELAY_CYCLES = 200_000_000  # torch.cuda._sleep: long enough for the host to queue everything after it


def _reference_clip(before: list[torch.Tensor], max_norm: float, norm_type: float = 2.0):
    theirs = []
    for value in before:
        param = torch.nn.Parameter(torch.empty_like(value), requires_grad=False)
        param.grad = value.clone()
        theirs.append(param)
    return theirs, torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)


def test_plan_uploaded_on_one_stream_is_read_safely_on_another(backend):
    params = _cuda_params(30, "all4", seed=13)
    fusedclip.clip_grad_norm_(params, 1.0, backend=backend)  # compile
    plan.PLANS.clear()
    before = [p.grad.clone() for p in params]
    torch.cuda.synchronize()
    upload, reader = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(upload):  # the upload waits behind a long kernel on its stream
        torch.cuda._sleep(_DELAY_CYCLES)
        device_plan = plan.PLANS.plan_for(grads(params)).single
        device_plan.kernel_tables(grads(params))
    with torch.cuda.stream(reader):  # nothing orders `reader` after `upload` but the plan's event
        total = fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
    torch.cuda.synchronize()
    theirs, reference = _reference_clip(before, 0.5)
    check_clip_against_torch(params, theirs, before, total, reference, 0.5, 2.0)


def test_evicted_plan_memory_is_not_reused_while_another_stream_reads_it(backend):
    params = _cuda_params(30, "all4", seed=14)
    fusedclip.clip_grad_norm_(params, 1.0, backend=backend)  # compile
    plan.PLANS.clear()
    before = [p.grad.clone() for p in params]
    torch.cuda.synchronize()
    upload, reader = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(upload):
        device_plan = plan.PLANS.plan_for(grads(params)).single
        table_bytes = device_plan.kernel_tables(grads(params)).packed.nbytes
    with torch.cuda.stream(reader):  # the kernels run long after the plan is gone
        torch.cuda._sleep(_DELAY_CYCLES)
        total = fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
    del device_plan
    plan.PLANS.clear()
    gc.collect()
    with torch.cuda.stream(upload):  # allocations on the upload's stream, filled with garbage
        junk = [torch.full((table_bytes // 8,), -1, dtype=torch.int64, device="cuda") for _ in range(64)]
    torch.cuda.synchronize()
    del junk
    theirs, reference = _reference_clip(before, 0.5)
    check_clip_against_torch(params, theirs, before, total, reference, 0.5, 2.0)


def test_two_graphs_on_one_stream_interleaved_with_eager_calls(backend):
    sets = [_cuda_params(20, "all4", seed=15), _cuda_params(27, "bf16+fp32", seed=16)]
    capture_stream = torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture_stream):  # warm up where the captures and eager calls run
        for params in sets:
            fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
    torch.cuda.current_stream().wait_stream(capture_stream)
    graphs, totals = [], []
    for params in sets:  # both graphs captured on the same stream, each over its own grads
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream):
            totals.append(fusedclip.clip_grad_norm_(params, 0.5, backend=backend))
        graphs.append(graph)
    # norm-only graphs of the first set's grads: replayed concurrently on two streams they would
    # mix their partials if they shared a workspace
    norm_graphs, norm_totals = [], []
    for _ in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream):
            norm_totals.append(fusedclip.get_total_norm(grads(sets[0]), backend=backend))
        norm_graphs.append(graph)

    generator = torch.Generator(device="cuda").manual_seed(30)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    records = []
    for step in range(6):
        scale = [1e-3, 30.0][step % 2]
        for index, params in enumerate(sets):
            stream = streams[index]
            with torch.cuda.stream(stream):
                before = [(torch.randn(p.shape, device="cuda", generator=generator) * scale).to(p.dtype)
                          for p in params]  # fmt: skip
                for p, value in zip(params, before):
                    p.grad.copy_(value)
                if (step + index) % 2:
                    graphs[index].replay()
                    total = totals[index]
                else:  # eager, on the graphs' capture stream, between replays
                    capture_stream.wait_stream(stream)
                    with torch.cuda.stream(capture_stream):
                        total = fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
                    stream.wait_stream(capture_stream)
                records.append((before, total.clone(), [p.grad.clone() for p in params]))
    torch.cuda.synchronize()
    for before, total, after in records:
        ours = []
        for value, grad in zip(before, after):
            param = torch.nn.Parameter(torch.empty_like(value), requires_grad=False)
            param.grad = grad
            ours.append(param)
        theirs, reference = _reference_clip(before, 0.5)
        check_clip_against_torch(ours, theirs, before, total, reference, 0.5, 2.0)

    expected = fusedclip.get_total_norm(grads(sets[0]), backend=backend)
    torch.cuda.synchronize()
    for _ in range(20):  # the two norm graphs at once, with an eager norm on the capture stream too
        for stream, graph in zip(streams, norm_graphs):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                graph.replay()
        with torch.cuda.stream(capture_stream):
            eager = fusedclip.get_total_norm(grads(sets[0]), backend=backend)
        torch.cuda.synchronize()
        assert all(torch.equal(t, expected) for t in norm_totals) and torch.equal(eager, expected)


def test_no_host_synchronisation_across_streams_and_captures(backend):
    params = _cuda_params(12, "bf16+fp32", seed=17)
    fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
    plan.PLANS.clear()
    torch.cuda.synchronize()
    other = torch.cuda.Stream()
    with syncs_raise():
        fusedclip.clip_grad_norm_(params, 0.5, backend=backend)  # builds and uploads the plan
        other.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(other):  # first read on another stream: an event wait, no sync
            fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
        torch.cuda.current_stream().wait_stream(other)
    torch.cuda.synchronize()
