"""How the CPU backend shares a pass's chunks out to its threads (csrc/cpu/work_ranges.h).

Each thread owns a contiguous range and walks it from one end; a thread whose range is done steals
from the far end of the others. Whatever subset of the threads shows up, every chunk must be
claimed exactly once: a chunk claimed twice would be scaled twice, a chunk never claimed would
be left out of the norm.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedclip import _ext

pytestmark = pytest.mark.skipif(_ext.C is None, reason=f"fusedclip._C is not built: {_ext.MISSING_REASON}")


def _owned_range(chunks: int, threads: int, worker: int) -> tuple[int, int]:
    return chunks * worker // threads, chunks * (worker + 1) // threads


def _claimed_chunks(claims: list[tuple[int, int, int]]) -> list[int]:
    return sorted(chunk for _, begin, end in claims for chunk in range(begin, end))


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.integers(0, 300),
    threads=st.integers(1, 6),
    grain=st.integers(1, 40),
    backwards=st.booleans(),
    data=st.data(),
)
def test_every_chunk_is_claimed_exactly_once_whichever_threads_show_up(chunks, threads, grain, backwards, data):
    workers = data.draw(st.lists(st.integers(0, threads - 1), min_size=1, max_size=threads, unique=True))
    claims = _ext.C.testing.cpu_work_claims(chunks, threads, grain, backwards, workers)
    assert _claimed_chunks(claims) == list(range(chunks))
    assert all(0 < end - begin <= grain for _, begin, end in claims)


@pytest.mark.parametrize("backwards", [False, True])
def test_owners_stream_through_their_own_range_in_order(backwards):
    chunks, threads, grain = 1000, 4, 7
    claims = _ext.C.testing.cpu_work_claims(chunks, threads, grain, backwards, list(range(threads)))
    for worker in range(threads):
        first, last = _owned_range(chunks, threads, worker)
        mine = [(begin, end) for who, begin, end in claims if who == worker]
        # with every thread working at the same pace, nobody steals: each walks only its own range
        assert all(first <= begin and end <= last for begin, end in mine)
        ordered = sorted(mine, reverse=backwards)
        assert mine == ordered, "claims follow each other in the pass's direction"
        assert (mine[0][1] == last) if backwards else (mine[0][0] == first)
        for (b0, e0), (b1, e1) in zip(mine, mine[1:]):
            assert (e1 == b0) if backwards else (b1 == e0), "consecutive claims are adjacent memory"


def test_a_lone_thread_finishes_its_own_range_then_steals_the_rest_from_the_far_end():
    chunks, threads, grain = 100, 2, 10
    claims = _ext.C.testing.cpu_work_claims(chunks, threads, grain, False, [1])
    first, last = _owned_range(chunks, threads, 1)
    own = [(begin, end) for _, begin, end in claims[: (last - first) // grain]]
    assert own == [(b, b + grain) for b in range(first, last, grain)]
    stolen = [(begin, end) for _, begin, end in claims[len(own) :]]
    assert stolen[0] == (first - grain, first), "thieves take from the end the owner is walking towards last"
    assert _claimed_chunks(claims) == list(range(chunks))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="worker index"):
        _ext.C.testing.cpu_work_claims(10, 2, 1, False, [2])
    with pytest.raises(ValueError, match="2\\^32"):
        _ext.C.testing.cpu_work_claims(1 << 32, 2, 1, False, [0])
