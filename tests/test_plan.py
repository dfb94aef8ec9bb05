"""The shared plan: chunk tables, 64-bit offsets, cache safety, staging, aliasing."""

from __future__ import annotations

import gc
import itertools
import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip import _ext, inputs, plan
from fusedclip.plan import DTYPE_CODES, PlanCache, build_tables, is_dense


def test_chunk_table_covers_every_element_once():
    chunk = 8
    numels = [0, 1, 8, 9, 24, 0, 3]
    tables = build_tables([100 * (i + 1) for i in range(len(numels))], numels, [0] * len(numels), chunk)
    assert tables.num_tensors == len(numels)
    assert tables.first_chunk.tolist() == [0, 0, 1, 2, 4, 7, 7, 8]
    covered = {t: [] for t in range(len(numels))}
    for t, start in zip(tables.chunk_tensor.tolist(), tables.chunk_start.tolist()):
        covered[t].extend(range(start, min(start + chunk, numels[t])))
    for t, n in enumerate(numels):
        assert covered[t] == list(range(n))
    assert tables.addresses.tolist() == [100 * (i + 1) for i in range(len(numels))]
    assert tables.numels.tolist() == numels


def test_offsets_are_64_bit_for_tensors_beyond_2_to_the_31():
    huge = 2**33 + 5
    tables = build_tables([4096], [huge], [DTYPE_CODES[torch.bfloat16]], plan.CHUNK_ELEMENTS)
    assert tables.chunk_start.dtype == torch.int64
    assert tables.num_chunks == -(-huge // plan.CHUNK_ELEMENTS)
    assert int(tables.chunk_start[-1]) == (tables.num_chunks - 1) * plan.CHUNK_ELEMENTS > 2**32
    assert int(tables.max_numel) == huge


def test_tables_move_as_one_buffer():
    tables = build_tables([16, 32], [3, 70], [0, 2], 64)
    moved = tables.to(torch.device("cpu"))
    assert moved.chunk_start.tolist() == tables.chunk_start.tolist()
    assert moved.addresses.data_ptr() == moved.packed.data_ptr()


def test_is_dense():
    x = torch.randn(4, 5, 6)
    assert is_dense(x) and is_dense(x.permute(2, 0, 1)) and is_dense(x.transpose(0, 1))
    assert not is_dense(x[:, ::2]) and not is_dense(x[1:3, 1:4])
    assert is_dense(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))
    assert not is_dense(torch.randn(3, 1).expand(3, 4))


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    strides=st.lists(st.integers(0, 40), min_size=4, max_size=4),
)
def test_is_dense_means_the_elements_cover_one_gap_free_span(shape, strides):
    """is_dense against its definition: the element offsets are exactly 0 .. numel - 1."""
    stride = strides[: len(shape)]
    numel = math.prod(shape)
    extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if numel else 0
    view = torch.arange(max(extent, 1)).as_strided(shape, stride)
    offsets = sorted(view.reshape(-1).tolist())
    assert is_dense(view) == (offsets == list(range(numel))), (shape, stride)


def _grads(*shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) for s in shapes]


def test_cache_hits_only_for_the_same_memory_layout():
    cache = PlanCache()
    grads = _grads((5,), (3, 4))
    first = cache.plan_for(grads)
    assert cache.plan_for(grads) is first and cache.hits == 1
    assert cache.plan_for([grads[0], grads[1].clone()]) is not first  # new address
    assert cache.plan_for([grads[0], grads[1].to(torch.float64)]) is not first  # new dtype
    assert cache.plan_for([grads[0], grads[1].view(12)]) is first  # same memory, same meaning
    transposed = [grads[0], grads[1].t()]
    assert cache.plan_for(transposed) is not first  # contiguity is part of the key
    assert cache.misses == 4


def test_same_address_different_size_or_dtype_is_a_different_plan():
    cache = PlanCache()
    storage = torch.zeros(64)
    a = cache.plan_for([storage[:32]])
    b = cache.plan_for([storage[:16]])
    c = cache.plan_for([storage.view(torch.bfloat16)[:32]])
    assert len({id(a), id(b), id(c)}) == 3
    assert b.devices[0].numels == (16,)


def test_cache_keeps_no_reference_to_grads():
    cache = PlanCache()
    grad = torch.randn(100)
    ref = weakref.ref(grad)
    cache.plan_for([grad]).devices[0].kernel_tables([grad])
    del grad
    gc.collect()
    assert ref() is None


def test_cache_is_bounded():
    cache = PlanCache(size=3)
    keep = [_grads((4,)) for _ in range(5)] + [_grads((n,)) for n in range(5, 10)]  # 6 layouts
    for g in keep:
        cache.plan_for(g)
    assert len(cache) == 3 and len(cache._layouts) == 3


def test_strided_grads_are_staged_in_buffers_of_one_call_and_dense_ones_are_not():
    base = torch.randn(6, 8)
    grads = [base.t(), base[:, ::2], torch.randn(5)]
    device_plan = PlanCache().plan_for(grads).devices[0]
    assert device_plan.strided == (1,)
    with pytest.raises(RuntimeError, match="bound"):
        device_plan.kernel_tables(grads)  # the cached plan has no staging buffers of its own
    bound = device_plan.bind(grads)
    assert bound is not device_plan and device_plan.bind(grads) is not bound  # one per call
    tables = bound.kernel_tables(grads)
    addresses = tables.addresses.tolist()
    assert addresses[0] == base.data_ptr() and addresses[2] == grads[2].data_ptr()
    staged = bound._staging[1]
    assert addresses[1] == staged.data_ptr() != grads[1].data_ptr()
    bound.stage_in(grads)
    assert torch.equal(staged, grads[1])
    staged.mul_(2)
    expected = grads[1] * 2
    bound.stage_out(grads)
    assert torch.equal(grads[1], expected)
    assert device_plan._staging is None and device_plan.retained_bytes() <= device_plan.table_bytes_bound()
    dense = PlanCache().plan_for([grads[0], grads[2]]).devices[0]
    assert dense.bind([grads[0], grads[2]]) is dense


def test_the_cache_keeps_no_staging_buffer_alive():
    cache = PlanCache()
    grad = torch.randn(64, 64)[:, ::2]
    device_plan = cache.plan_for([grad]).devices[0]
    bound = device_plan.bind([grad])
    ref = weakref.ref(bound._staging[0])
    del bound
    gc.collect()
    assert ref() is None and cache.retained_bytes() <= device_plan.table_bytes_bound()


def test_aliasing_is_detected():
    buffer = torch.randn(100)
    assert not PlanCache().plan_for([buffer[:50], buffer[50:]]).devices[0].aliased
    assert PlanCache().plan_for([buffer[:50], buffer[40:60]]).devices[0].aliased
    same = torch.randn(10)
    assert PlanCache().plan_for([same, same]).devices[0].aliased
    # strided views reach beyond numel * itemsize from their address
    assert PlanCache().plan_for([buffer[:8:2], buffer[4:8]]).devices[0].aliased
    assert PlanCache().plan_for([buffer[:8].view(2, 4).t()[:2], buffer[4:5]]).devices[0].aliased
    assert PlanCache().plan_for([buffer[0:10:2], buffer[1:10:2]]).devices[0].aliased  # interleaved: conservative
    assert not PlanCache().plan_for([buffer[:9:2], buffer[9:20]]).devices[0].aliased


def test_span_bytes_is_the_true_extent():
    buffer = torch.randn(64, dtype=torch.float64)
    assert plan.span_bytes(buffer[::2]) == 63 * 8
    assert plan.span_bytes(buffer[:60].view(6, 10)[:, 1:3]) == (5 * 10 + 2) * 8
    assert plan.span_bytes(buffer[:12].view(3, 4).t()) == 12 * 8
    assert plan.span_bytes(buffer[:0]) == plan.span_bytes(buffer.view(8, 8)[:, :0]) == 0
    assert plan.span_bytes(torch.randn(1).expand(7)) == 4
    assert plan.span_bytes(buffer[3:5]) == 16


@pytest.mark.parametrize(
    "shape,stride,expected",
    [
        ((3, 4), (4, 1), False),
        ((3, 4), (1, 3), False),
        ((5,), (0,), True),
        ((1, 5), (0, 1), False),
        ((3, 3), (1, 1), True),
        ((3, 2), (2, 3), False),  # interleaved strides, no shared element (decided exactly)
        ((3, 2), (2, 4), True),
        ((0, 4), (0, 0), False),
        ((2, 2, 2), (4, 1, 2), False),
    ],
)
def test_self_overlap_is_decided_exactly(shape, stride, expected):
    assert plan.self_overlapping(shape, stride) is expected
    if math.prod(shape):
        offsets = [sum(i * s for i, s in zip(index, stride)) for index in itertools.product(*map(range, shape))]
        assert (len(set(offsets)) != len(offsets)) is expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.integers(0, 12), st.sampled_from([1, 2, 4, 8])), max_size=10))
def test_the_overlap_check_agrees_with_comparing_every_pair(spans):
    addresses = tuple(address for address, _, _ in spans)
    sizes = tuple(numel * itemsize for _, numel, itemsize in spans)
    ends = [address + size for address, size in zip(addresses, sizes)]
    expected = any(
        sizes[i] and sizes[j] and addresses[i] < ends[j] and addresses[j] < ends[i]
        for i in range(len(spans))
        for j in range(i + 1, len(spans))
    )
    starts, extents = plan._byte_spans(addresses, sizes)
    assert plan._spans_overlap(starts, extents) == expected


# ---- grads reallocated between calls (zero_grad(set_to_none=True)): the layout's plan is rebased ----


def test_grads_reallocated_with_the_same_layout_reuse_the_chunk_tables():
    cache = PlanCache()
    old = _grads((5,), (3, 4), (plan.CHUNK_ELEMENTS + 7,)) + _grads((9,), dtype=torch.bfloat16)
    first = cache.plan_for(old).devices[0]
    first_tables = first.kernel_tables(old)
    first.scratch["workspace"] = object()
    new = [g.clone() for g in old]
    second = cache.plan_for(new).devices[0]
    assert (cache.misses, cache.rebased) == (2, 1)
    assert second.addresses == tuple(g.data_ptr() for g in new)
    tables = second.kernel_tables(new)
    assert tables.addresses.tolist() == [g.data_ptr() for g in new]
    assert first_tables.addresses.tolist() == [g.data_ptr() for g in old], "the first plan is untouched"
    for name in ("numels", "dtype_codes", "first_chunk", "chunk_tensor", "chunk_start"):
        assert torch.equal(getattr(tables, name), getattr(first_tables, name)), name
    assert second.scratch == {}, "workspaces are never shared between plans"
    assert cache.plan_for(new).devices[0] is second and cache.hits == 1


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 200), st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
)
def test_a_rebased_plan_equals_a_plan_built_for_the_new_grads(layout, gathered):
    cache = PlanCache(chunk_elements=64)  # small chunks: tensors span several
    old = [torch.randn(n + 1, dtype=d) for n, d in layout]  # no empty grads: those are never rebased
    cache.plan_for(old).devices[0].kernel_tables(old)
    new = [g.clone() for g in old]
    if gathered and _ext.C is not None:  # through the extension's gather, with its address column
        params = [torch.nn.Parameter(torch.empty_like(g)) for g in new]
        for param, grad in zip(params, new):
            param.grad = grad
        new = inputs.grads_of(params)
        assert new.key_parts is not None
    rebased = cache.plan_for(new).devices[0]
    assert cache.rebased == 1
    built = plan.build_plan(new, True, chunk_elements=64).devices[0]
    for name in (
        "positions",
        "numels",
        "dtypes",
        "dtype_groups",
        "strided",
        "addresses",
        "whole_call",
        "kernel_reason",
    ):
        assert getattr(rebased, name) == getattr(built, name), name
    ours, reference = rebased.kernel_tables(new), built.kernel_tables(new)
    assert torch.equal(ours.packed, reference.packed)
    assert (ours.num_tensors, ours.num_chunks, ours.max_numel) == (
        reference.num_tensors,
        reference.num_chunks,
        reference.max_numel,
    )
    assert rebased.aliased is built.aliased is False


def test_a_rebased_plan_checks_aliasing_at_its_own_addresses():
    cache = PlanCache()
    assert not cache.plan_for([torch.randn(10), torch.randn(10)]).devices[0].aliased
    same = torch.randn(10)
    rebased = cache.plan_for([same, same]).devices[0]
    assert cache.rebased == 1 and rebased.aliased


def test_layouts_with_strided_or_empty_grads_are_never_rebased():
    cache = PlanCache()
    alive = []  # no address may be reused: every call must miss
    for _ in range(2):
        alive += [torch.randn(6, 8)[:, ::2], torch.randn(3)]
        strided = cache.plan_for([alive[-2]]).devices[0]
        with_empty = cache.plan_for([alive[-1], torch.empty(0)]).devices[0]
    assert cache.rebased == 0 and cache.misses == 4
    assert strided.strided == (0,) and with_empty.numels == (3, 0)
    with pytest.raises(ValueError, match="rebased"):
        strided.rebased(bytes(8))


@pytest.mark.gpu
def test_a_layout_seen_on_one_device_is_not_reused_for_grads_on_two():
    cache = PlanCache()
    cache.plan_for([torch.randn(4), torch.randn(4)])
    mixed = cache.plan_for([torch.randn(4), torch.randn(4, device="cuda")])
    assert cache.rebased == 0 and [d.device.type for d in mixed.devices] == ["cpu", "cuda"]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_clipping_grads_reallocated_every_step_matches_torch(backend):
    if backend == "cpu" and _ext.C is None:
        pytest.skip(f"fusedclip._C is not built: {_ext.MISSING_REASON}")
    ours = [torch.nn.Parameter(torch.empty(s)) for s in [(7,), (7,), (plan.CHUNK_ELEMENTS + 3,)]]
    theirs = [torch.nn.Parameter(torch.empty(p.shape)) for p in ours]
    plan.PLANS.clear()
    rebased_before = plan.PLANS.rebased
    alive = []  # earlier grads stay alive, so no new grad can reuse an old address (a cache hit)
    for step in range(4):
        alive += [p.grad for p in ours]
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        if step == 3:  # two parameters sharing one grad: the rebased plan must see the aliasing
            ours[1].grad, theirs[1].grad = ours[0].grad, theirs[0].grad
        total = fusedclip.clip_grad_norm_(ours, 1.0, backend=backend)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        torch.testing.assert_close(total, expected)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, q.grad)
    assert plan.PLANS.rebased - rebased_before == 3


def test_result_dtype_and_grouping():
    p = PlanCache().plan_for(_grads((3,), dtype=torch.bfloat16) + _grads((2,)) + _grads((4,), dtype=torch.bfloat16))
    assert p.result_dtype == torch.float32
    (device_plan,) = p.devices
    assert device_plan.dtype_groups == {torch.bfloat16: (0, 2), torch.float32: (1,)}
    complex_plan = PlanCache().plan_for([torch.randn(3, dtype=torch.complex64)])
    assert complex_plan.result_dtype == torch.float32
    assert "complex64" in complex_plan.devices[0].kernel_reason


# ---- the extension's one-pass gather of .grad and the cache key (csrc/gather.h) ---------------------

needs_gather = pytest.mark.skipif(_ext.C is None, reason=f"fusedclip._C is not built: {_ext.MISSING_REASON}")


def _python_path_key(grads):
    """The key as the pure-Python path computes it (a plain list carries no gathered parts)."""
    return plan._cache_key(list(grads))


@needs_gather
def test_the_gathered_grads_and_key_equal_what_python_reads():
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.float32]
    params = [torch.nn.Parameter(torch.randn(3, 4, dtype=d)) for d in dtypes] + [torch.randn(0, requires_grad=True)]
    for i, param in enumerate(params):
        if i != 2:  # one parameter without a grad is skipped
            param.grad = torch.randn_like(param)
    params[4].grad = torch.randn(4, 3).t()  # a non-contiguous grad
    params[5].grad = torch.empty(0)  # an empty grad
    grads = inputs.grads_of(params)
    expected = [p.grad for p in params if p.grad is not None]
    assert isinstance(grads, plan.PlainTensors) and grads.key_parts is not None
    assert len(grads) == len(expected) and all(a is b for a, b in zip(grads, expected))
    assert plan._cache_key(grads) == _python_path_key(grads)
    addresses, nbytes, dtypes, contiguous = (memoryview(column) for column in grads.key_parts)
    assert addresses.cast("q").tolist() == [g.data_ptr() for g in expected]
    assert nbytes.cast("q").tolist() == [g.nbytes for g in expected]
    assert dtypes.cast("q").tolist() == [id(g.dtype) for g in expected]
    assert contiguous.tolist() == [int(g.is_contiguous()) for g in expected]
    assert contiguous[3] == 0
    assert grads.null_address is (0 in addresses.cast("q").tolist()) is True  # the empty grad


@needs_gather
def test_the_gather_declines_what_only_the_python_path_handles():
    class Subclass(torch.Tensor):
        pass

    sub = torch.nn.Parameter(torch.randn(3))
    sub.grad = torch.randn(3).as_subclass(Subclass)
    meta = torch.randn(3, device="meta", requires_grad=True)
    meta.grad = torch.randn(3, device="meta")
    plain = torch.nn.Parameter(torch.randn(3))
    plain.grad = torch.randn(3)
    descriptors, types = inputs._GATHERED_DESCRIPTORS, inputs._GATHERED_TYPES
    assert _ext.C.gather_grads([plain, sub], types, descriptors) is None, "a subclass grad"
    assert _ext.C.gather_grads([plain, 3.0], types, descriptors) is None, "not a tensor"
    assert _ext.C.gather_grads((plain,), types, descriptors) is None, "not a list"
    wrong = (descriptors[1],) + descriptors[1:]  # a method where a getter is expected
    assert _ext.C.gather_grads([plain], types, wrong) is None
    assert _ext.C.gather_grads([plain], types, descriptors) is not None
    meta_grads = inputs.grads_of([plain, meta])  # gathered: meta tensors report address 0, as in Python
    assert plan._cache_key(meta_grads) == _python_path_key(meta_grads)
    # the public path still raises the proper error for a non-tensor
    with pytest.raises(TypeError, match=r"parameters\[1\] is a float"):
        inputs.grads_of([plain, 3.0])


@needs_gather
def test_the_gathered_key_sees_a_grad_changed_in_place():
    param = torch.nn.Parameter(torch.randn(30, 40))
    param.grad = torch.randn(30, 40)
    first = plan._cache_key(inputs.grads_of([param]))
    param.grad.t_()  # same tensor object, same address and bytes, no longer contiguous
    second = plan._cache_key(inputs.grads_of([param]))
    param.grad.t_().resize_(10)  # same tensor object, same address, fewer bytes
    third = plan._cache_key(inputs.grads_of([param]))
    assert len({first, second, third}) == 3
    assert third == _python_path_key(inputs.grads_of([param]))


def test_the_plan_key_changes_with_every_fact_a_plan_is_built_from():
    """Same grads: same key (and the cache hits). Any change a plan depends on: a different key, with
    its layout key equal only where the tables could be shared (same sizes, dtypes, contiguity)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(
        sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
        change=st.sampled_from(["none", "address", "size", "dtype", "strides", "transpose"]),
        which=st.integers(0, 5),
    )
    def check(sizes, change, which):
        grads = [torch.randn(n, 3) for n in sizes]
        k = which % len(grads)
        key = plan._cache_key(grads)
        assert key == plan._cache_key(list(grads)) and hash(key) == hash(plan._cache_key(list(grads)))
        changed = list(grads)
        if change == "address":
            changed[k] = torch.randn(sizes[k], 3)
        elif change == "size":
            changed[k] = torch.randn(sizes[k] + 1, 3)
        elif change == "dtype":
            changed[k] = grads[k].view(torch.int32) if sizes[k] else torch.randn(0, 3, dtype=torch.float64)
        elif change == "strides":
            changed[k] = torch.randn(sizes[k] + 1, 6)[:-1, ::2]
        elif change == "transpose":
            changed[k] = torch.randn(3, sizes[k] + 2).t()
        other = plan._cache_key(changed)
        if change == "none":
            assert other == key
            return
        if change in ("address", "strides") and sizes[k] == 0:
            return  # an empty tensor has no address, and an empty view is contiguous
        assert other != key, change
        same_layout = change == "address"
        assert (key.layout() is not None and key.layout() == other.layout()) is same_layout or key.layout() is None

    check()


def test_the_key_comparison_catches_a_missing_field(monkeypatch):
    """The planted bug: a key that forgets the dtype column would let an int32 view of a float32 grad
    (same address, same bytes) hit the float32 plan and skip the dtype check."""
    grads = [torch.randn(4)]
    other = [grads[0].view(torch.int32)]
    assert plan._cache_key(grads) != plan._cache_key(other)

    def without_dtypes(addresses, nbytes, dtypes, contiguous):
        return plan.array("q", addresses).tobytes(), plan.array("q", nbytes).tobytes(), b"", bytes(map(int, contiguous))

    monkeypatch.setattr(plan, "_key_columns", without_dtypes)
    assert plan._cache_key(grads) == plan._cache_key(other)
