"""patch_torch(): torch's names route through fusedclip; what a patch cannot reach is documented;
patches nest and overlap across threads."""

from __future__ import annotations

import random
import threading

import pytest
import torch
import torch.nn.utils
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch.nn.utils import clip_grad_norm_ as bound_before_patching

import fusedclip
from fusedclip import engine
from fusedclip import patch as patch_module


def _train(steps=4, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(5)
    norms = []
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(10, 6, generator=gen)).pow(2).mean().mul(100).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))  # torch's name
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.05)
        optimizer.step()
    return model, norms


def test_patch_routes_torch_names_through_fusedclip(monkeypatch):
    calls = []
    real_prepare = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: calls.append(1) or real_prepare(*a, **k))
    reference, reference_norms = _train()
    assert not calls
    with fusedclip.patch_torch() as patch:
        assert fusedclip.is_patched() and patch is not None
        assert torch.nn.utils.clip_grad_norm_ is fusedclip.clip_grad_norm_
        assert torch.nn.utils.get_total_norm is fusedclip.get_total_norm
        assert torch.nn.utils.clip_grads_with_norm_ is fusedclip.clip_grads_with_norm_
        assert torch.nn.utils.clip_grad.clip_grad_norm_ is fusedclip.clip_grad_norm_
        patched, patched_norms = _train()
    assert calls, "the training loop did not reach fusedclip"
    assert not fusedclip.is_patched()
    for a, b in zip(patched_norms, reference_norms):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
    for a, b in zip(patched.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_unpatch_restores_torch_and_is_idempotent():
    original = torch.nn.utils.clip_grad_norm_
    fusedclip.patch_torch()
    fusedclip.patch_torch()  # twice: still one original remembered
    fusedclip.unpatch_torch()
    fusedclip.unpatch_torch()
    assert torch.nn.utils.clip_grad_norm_ is original
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is original


def test_patch_with_a_backend_passes_it_on(monkeypatch):
    seen = []
    real_prepare = engine.prepare
    monkeypatch.setattr(
        engine, "prepare", lambda grads, backend=None, foreach=None, **extra: seen.append(backend) or real_prepare(grads, backend, foreach, **extra)
    )
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with fusedclip.patch_torch(backend="torch"):
        torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert seen == ["torch"]


def test_names_bound_before_patching_are_not_reached():
    """The documented limit: `from torch.nn.utils import clip_grad_norm_` at import time keeps torch's."""
    with fusedclip.patch_torch():
        assert bound_before_patching is not fusedclip.clip_grad_norm_
        assert torch.nn.utils.clip_grad_norm_ is fusedclip.clip_grad_norm_


# -- nesting, overlap across threads, unpatch_torch semantics -------------------------------------


TORCH_CLIP = torch.nn.utils.clip_grad.clip_grad_norm_ if not fusedclip.is_patched() else None


@pytest.fixture(autouse=True)
def _always_unpatched_after():
    yield
    fusedclip.unpatch_torch(force=True)
    assert not fusedclip.is_patched()


def _in_effect():
    """(patched?, backend) as seen through torch's names; both modules must agree."""
    states = set()
    for module in (torch.nn.utils, torch.nn.utils.clip_grad):
        fn = module.clip_grad_norm_
        if fn is TORCH_CLIP:
            states.add((False, None))
        else:
            assert (fn.__wrapped__ if hasattr(fn, "_fusedclip_backend") else fn) is fusedclip.clip_grad_norm_
            states.add((True, getattr(fn, "_fusedclip_backend", None)))
    assert len(states) == 1, states
    return states.pop()


def test_leaving_an_inner_with_keeps_the_outer_block_patched():
    with fusedclip.patch_torch():
        with fusedclip.patch_torch():
            assert _in_effect() == (True, None)
        assert _in_effect() == (True, None), "the inner exit unpatched the outer block"
        assert fusedclip.is_patched()
    assert _in_effect() == (False, None)


def test_the_innermost_backend_applies_and_the_outer_one_returns():
    with fusedclip.patch_torch(backend="torch"):
        assert _in_effect() == (True, "torch")
        with fusedclip.patch_torch():
            assert _in_effect() == (True, None)
            with fusedclip.patch_torch(backend="cpu"):
                assert _in_effect() == (True, "cpu")
            assert _in_effect() == (True, None)
        assert _in_effect() == (True, "torch")
    assert _in_effect() == (False, None)


def test_unpatch_torch_closes_only_a_bare_patch_and_force_closes_all():
    with fusedclip.patch_torch():
        fusedclip.unpatch_torch()  # no bare patch open: the with block keeps its patch
        assert _in_effect() == (True, None)
        fusedclip.patch_torch(backend="torch")
        assert _in_effect() == (True, "torch")
        fusedclip.unpatch_torch()
        assert _in_effect() == (True, None)
        fusedclip.patch_torch()
        fusedclip.unpatch_torch(force=True)
        assert _in_effect() == (False, None)
    assert _in_effect() == (False, None)  # leaving the block after a forced unpatch is harmless


def test_patches_close_in_any_order():
    first, second = fusedclip.patch_torch(backend="torch"), fusedclip.patch_torch(backend="cpu")
    first.close()
    assert _in_effect() == (True, "cpu")
    first.close()  # closing twice is a no-op
    assert patch_module.open_patches() == 1 and second.active and not first.active
    second.close()
    assert _in_effect() == (False, None)


def test_a_name_rebound_by_someone_else_while_patched_is_left_alone():
    def theirs(*args, **kwargs):
        return "theirs"

    original = torch.nn.utils.clip_grad_value_
    try:
        with fusedclip.patch_torch():
            torch.nn.utils.clip_grad_value_ = theirs
            with fusedclip.patch_torch(backend="torch"):  # a nested patch does not overwrite it either
                assert torch.nn.utils.clip_grad_value_ is theirs
        assert torch.nn.utils.clip_grad_value_ is theirs
        assert torch.nn.utils.clip_grad_norm_ is TORCH_CLIP
        assert torch.nn.utils.clip_grad.clip_grad_value_ is original
    finally:
        torch.nn.utils.clip_grad_value_ = original


def test_an_unknown_backend_fails_at_patch_time_and_patches_nothing():
    with pytest.raises(ValueError):
        fusedclip.patch_torch(backend="nope")
    assert _in_effect() == (False, None) and patch_module.open_patches() == 0


def test_overlapping_with_blocks_in_threads():
    """Threads enter and leave their own with blocks in random overlapping order: torch stays
    patched while any block is open, and is restored after the last."""
    n = 6
    entered = threading.Barrier(n)
    order = list(range(n))
    random.Random(0).shuffle(order)
    turn = threading.Condition()
    next_to_leave = [0]
    seen = []
    errors = []

    def worker(i):
        try:
            with fusedclip.patch_torch():
                entered.wait(timeout=30)
                with turn:  # leave in a shuffled order
                    turn.wait_for(lambda: order[next_to_leave[0]] == i, timeout=30)
                    seen.append(_in_effect())
            with turn:
                # after leaving: patched exactly while some other thread is still inside
                seen.append((_in_effect()[0], next_to_leave[0] < n - 1))
                next_to_leave[0] += 1
                turn.notify_all()
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    inside, after = seen[0::2], seen[1::2]
    assert all(state == (True, None) for state in inside)
    assert all(patched == expected for patched, expected in after)
    assert _in_effect() == (False, None)


# A model of the patch stack, and random programs run against it. Patches are kept after they
# close, so a program may enter, leave or close the same Patch object again at any time.
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("open-with"), st.sampled_from([None, "torch", "cpu"])),
        st.tuples(st.just("open-bare"), st.sampled_from([None, "torch", "cpu"])),
        st.tuples(st.just("exit"), st.integers(0, 10)),  # leave a block of an open patch
        st.tuples(st.just("enter"), st.integers(0, 10)),  # enter any patch made so far, open or closed
        st.tuples(st.just("exit-any"), st.integers(0, 10)),  # leave a block of any patch, open or closed
        st.tuples(st.just("close"), st.integers(0, 10)),
        st.tuples(st.just("unpatch"), st.booleans()),
    ),
    max_size=25,
)


def _run_against_model(ops):
    """Apply ``ops``; after each, torch's names must match the model: patched while any patch is
    open, with the backend of the most recently opened one.

    The model: a stack of open patches, oldest first, each with the number of its with blocks not
    yet left. Entering an open patch counts one more block; entering a closed one opens it on top
    with one block; leaving a block of an open patch counts one less and closes it at none (or when
    it had none: a patch opened without a with block); leaving a block of a closed patch, or
    closing a closed patch, changes nothing. unpatch_torch() closes the most recent patch with no
    block; force closes all."""
    made = []  # every patch made: (patch, backend)
    model = []  # open patches, oldest first: [patch, backend, blocks]

    def find(patch):
        return next((i for i, entry in enumerate(model) if entry[0] is patch), None)

    def leave(patch):
        i = find(patch)
        patch.__exit__(None, None, None)
        if i is not None:
            if model[i][2] > 1:
                model[i][2] -= 1
            else:
                del model[i]

    for op, arg in ops:
        if op in ("open-with", "open-bare"):
            p = fusedclip.patch_torch(backend=arg)
            if op == "open-with":
                p.__enter__()
            made.append((p, arg))
            model.append([p, arg, 1 if op == "open-with" else 0])
        elif op == "exit" and model:
            leave(model[arg % len(model)][0])
        elif op == "exit-any" and made:
            leave(made[arg % len(made)][0])
        elif op == "enter" and made:
            p, backend = made[arg % len(made)]
            p.__enter__()
            i = find(p)
            if i is None:
                model.append([p, backend, 1])
            else:
                model[i][2] += 1
        elif op == "close" and made:
            p, _ = made[arg % len(made)]
            p.close()
            i = find(p)
            if i is not None:
                del model[i]
        elif op == "unpatch":
            if arg:
                model.clear()
            else:
                bare = [i for i, entry in enumerate(model) if entry[2] == 0]
                if bare:
                    del model[bare[-1]]
            fusedclip.unpatch_torch(force=arg)
        expected = (True, model[-1][1]) if model else (False, None)
        assert _in_effect() == expected, (ops, expected)
        assert patch_module.open_patches() == len(model)
        assert [p.active for p, _ in made] == [find(p) is not None for p, _ in made]
    for p, _ in made:
        p.close()
    assert _in_effect() == (False, None)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS)
def test_any_sequence_of_patches_matches_the_stack_model(ops):
    _run_against_model(ops)


def test_the_model_catches_an_exit_that_unpatches_everything(monkeypatch):
    """The deliberately broken version: leaving any block restores torch (no depth count)."""
    ops = [("open-with", None), ("open-with", None), ("exit", 1)]
    _run_against_model(ops)
    monkeypatch.setattr(patch_module.Patch, "__exit__", lambda self, *exc: fusedclip.unpatch_torch(force=True))
    with pytest.raises(AssertionError):
        _run_against_model(ops)


def test_the_same_patch_entered_twice_stays_open_until_its_outer_block_ends():
    patch = fusedclip.patch_torch(backend="torch")
    with patch:
        with patch:
            assert _in_effect() == (True, "torch")
        assert _in_effect() == (True, "torch"), "the inner exit closed the outer block's patch"
        assert patch.active
    assert _in_effect() == (False, None) and not patch.active


def test_entering_a_closed_patch_opens_it_again_on_top():
    patch = fusedclip.patch_torch(backend="torch")
    with patch:
        pass
    assert not patch.active
    with fusedclip.patch_torch(backend="cpu"):
        with patch:  # reopened as the most recent patch: its backend applies
            assert patch.active and _in_effect() == (True, "torch")
        assert not patch.active and _in_effect() == (True, "cpu")
    patch.close()
    with patch:
        assert _in_effect() == (True, "torch")
        fusedclip.unpatch_torch(force=True)
        assert _in_effect() == (False, None)
    assert _in_effect() == (False, None)  # leaving a block of a patch closed inside it changes nothing


def _non_reentrant_enter(self):
    """The broken version the model must catch: entering only marks the patch, no count, no reopen."""
    self._depth = 1
    return self


def _non_reentrant_exit(self, *exc):
    self.close()


@pytest.mark.parametrize(
    "ops",
    [
        [("open-with", None), ("enter", 0), ("exit", 0)],  # with P: with P: ... (the inner exit)
        [("open-with", "torch"), ("exit", 0), ("enter", 0)],  # with P: ... then with P: ... again
    ],
    ids=["nested", "reopened"],
)
def test_the_model_catches_a_patch_that_is_not_reentrant(monkeypatch, ops):
    _run_against_model(ops)
    monkeypatch.setattr(patch_module.Patch, "__enter__", _non_reentrant_enter)
    monkeypatch.setattr(patch_module.Patch, "__exit__", _non_reentrant_exit)
    with pytest.raises(AssertionError):
        _run_against_model(ops)


def test_the_random_programs_find_a_patch_that_is_not_reentrant(monkeypatch):
    monkeypatch.setattr(patch_module.Patch, "__enter__", _non_reentrant_enter)
    monkeypatch.setattr(patch_module.Patch, "__exit__", _non_reentrant_exit)

    @settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate], report_multiple_bugs=False)
    @given(ops=_OPS)
    def search(ops):
        try:
            _run_against_model(ops)
        finally:
            fusedclip.unpatch_torch(force=True)

    with pytest.raises(AssertionError):
        search()
