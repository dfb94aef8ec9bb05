"""The shared plan: chunk tables, 64-bit offsets, cache safety, staging, aliasing."""

from __future__ import annotations

import gc
import weakref

import torch

from fusedclip import plan
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
    keep = [_grads((4,)) for _ in range(5)]
    for g in keep:
        cache.plan_for(g)
    assert len(cache) == 3


def test_strided_grads_are_staged_and_dense_ones_are_not():
    base = torch.randn(6, 8)
    grads = [base.t(), base[:, ::2], torch.randn(5)]
    device_plan = PlanCache().plan_for(grads).devices[0]
    assert device_plan.strided == (1,)
    tables = device_plan.kernel_tables(grads)
    addresses = tables.addresses.tolist()
    assert addresses[0] == base.data_ptr() and addresses[2] == grads[2].data_ptr()
    assert addresses[1] != grads[1].data_ptr()  # the staging buffer
    device_plan.stage_in(grads)
    staged = device_plan._staging[1]
    assert torch.equal(staged, grads[1])
    staged.mul_(2)
    expected = grads[1] * 2
    device_plan.stage_out(grads)
    assert torch.equal(grads[1], expected)


def test_aliasing_is_detected():
    buffer = torch.randn(100)
    assert not PlanCache().plan_for([buffer[:50], buffer[50:]]).devices[0].aliased
    assert PlanCache().plan_for([buffer[:50], buffer[40:60]]).devices[0].aliased
    same = torch.randn(10)
    assert PlanCache().plan_for([same, same]).devices[0].aliased


def test_result_dtype_and_grouping():
    p = PlanCache().plan_for(_grads((3,), dtype=torch.bfloat16) + _grads((2,)) + _grads((4,), dtype=torch.bfloat16))
    assert p.result_dtype == torch.float32
    (device_plan,) = p.devices
    assert device_plan.dtype_groups == {torch.bfloat16: (0, 2), torch.float32: (1,)}
    complex_plan = PlanCache().plan_for([torch.randn(3, dtype=torch.complex64)])
    assert complex_plan.result_dtype == torch.float32
    assert "complex64" in complex_plan.devices[0].kernel_reason
