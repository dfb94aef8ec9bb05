"""One-line global swap: route torch's clipping functions through fusedclip.

    fusedclip.patch_torch()          # Hugging Face Trainer, Accelerate, Lightning now use fusedclip
    with fusedclip.patch_torch():    # or only inside a block
        trainer.train()

What a patch reaches: every call that looks the function up through ``torch.nn.utils`` or
``torch.nn.utils.clip_grad`` at call time (``torch.nn.utils.clip_grad_norm_(...)``,
``nn.utils.clip_grad_norm_(...)``), which is how Trainer, Accelerate and Lightning call it.
What it cannot reach: a name bound before patching, e.g. ``from torch.nn.utils import
clip_grad_norm_`` executed at import time, keeps pointing at torch's function.

Nesting. Patches nest and may overlap across threads: every :func:`patch_torch` call opens one
patch, and torch stays patched until every open patch is closed. A patch is closed by leaving its
(outermost) ``with`` block, by its :meth:`Patch.close`, or by :func:`unpatch_torch`, which closes
the most recent patch opened *without* a ``with`` block (so ``patch_torch()`` / ``unpatch_torch()``
pairs nest like ``with`` blocks and never end an enclosing block's patch);
``unpatch_torch(force=True)`` closes every patch at once.

One :class:`Patch` object may be entered again. Entering it while it is open only counts (``with
P: with P: ...`` keeps torch patched until the outer block ends); entering it after it was closed
opens it again, as the most recently opened patch, so a patch kept in a variable can wrap several
blocks one after another (``with P: train()`` then ``with P: evaluate()``). While several patches are open, the
``backend`` of the most recently opened one applies. The patch is process-wide (module
attributes), so a patch opened by one thread reaches every thread; all bookkeeping happens under
one lock. When the last patch closes, torch's functions are restored, except a name that someone
else has rebound in the meantime, which is left as they set it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch.nn.utils
import torch.nn.utils.clip_grad

from . import clip

#: the names patched, each in both modules that export it
PATCHED_NAMES = ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_")
_MODULES: tuple[ModuleType, ...] = (torch.nn.utils, torch.nn.utils.clip_grad)

_lock = threading.RLock()
_originals: dict[tuple[ModuleType, str], Any] = {}  # torch's functions, while any patch is open
_installed: dict[tuple[ModuleType, str], Any] = {}  # what we set each name to
_open: list[Patch] = []  # open patches, oldest first


def _replacement(name: str, backend: str | None) -> Callable[..., Any]:
    ours = getattr(clip, name)
    if backend is None:
        return ours

    @functools.wraps(ours)
    def with_backend(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", backend)
        return ours(*args, **kwargs)

    with_backend._fusedclip_backend = backend  # type: ignore[attr-defined]
    return with_backend


class Patch:
    """One patch, returned (open) by :func:`patch_torch`; a re-entrant context manager.

    ``with patch:`` counts its blocks: leaving a block closes the patch only when it is the last
    block of this patch still open, so nesting the same object is harmless. Entering a closed patch
    (after its block ended, after :meth:`close` or ``unpatch_torch(force=True)``) opens it again
    as the most recently opened patch, with the same ``backend``; leaving that block closes it
    again. Leaving a block of a patch that was closed from inside the block (by :meth:`close` or a
    forced unpatch) changes nothing.
    """

    __slots__ = ("_depth", "backend")

    def __init__(self, backend: str | None) -> None:
        self.backend = backend
        self._depth = 0  # with blocks of this patch entered since it was (re)opened, not yet left

    @property
    def active(self) -> bool:
        """True while this patch is open."""
        with _lock:
            return self._is_open()

    def _is_open(self) -> bool:
        return any(patch is self for patch in _open)

    def __enter__(self) -> Patch:
        with _lock:
            if not self._is_open():  # closed: open it again, on top of the others
                self._depth = 0
                _open.append(self)
                _apply()
            self._depth += 1  # owned by a with block: unpatch_torch() leaves it alone
        return self

    def __exit__(self, *exc: object) -> None:
        with _lock:
            if not self._is_open():
                self._depth = 0
                return  # closed from inside the block already
            if self._depth > 1:
                self._depth -= 1
                return
            self._close()

    def close(self) -> None:
        """Close this patch now, whatever blocks of it are open (a no-op when it is closed already);
        torch is restored when it was the last open patch."""
        with _lock:
            self._close()

    def _close(self) -> None:
        self._depth = 0
        for index, patch in enumerate(_open):
            if patch is self:
                del _open[index]
                _apply()
                return

    def __repr__(self) -> str:
        return f"<fusedclip patch backend={self.backend!r} {'open' if self.active else 'closed'}>"


def _apply() -> None:
    """Make torch's names match the open patches (under ``_lock``)."""
    if not _open:
        for key, original in _originals.items():
            module, name = key
            if getattr(module, name, None) is _installed.get(key):  # not rebound by someone else
                setattr(module, name, original)
        _originals.clear()
        _installed.clear()
        return
    backend = _open[-1].backend
    for module in _MODULES:
        for name in PATCHED_NAMES:
            if not hasattr(module, name):
                continue  # an older torch without the split API
            key = (module, name)
            if key not in _originals:
                _originals[key] = getattr(module, name)
            elif getattr(module, name) is not _installed.get(key):
                continue  # rebound by someone else while patched: leave it
            replacement = _replacement(name, backend)
            setattr(module, name, replacement)
            _installed[key] = replacement


def patch_torch(backend: str | None = None) -> Patch:
    """Make ``torch.nn.utils.clip_grad_norm_`` and friends call fusedclip; opens one patch.

    Args:
        backend: passed to every patched call while this is the most recent open patch (None:
            automatic choice).

    Returns:
        The patch, open: a re-entrant context manager whose (outermost) exit closes it (torch is
        restored when the last open patch closes); or close it with :func:`unpatch_torch` or
        ``.close()``. Entering it again after it was closed opens it again (see :class:`Patch`).
    """
    if backend is not None:
        from .backends import requested_backend

        requested_backend(backend)  # an unknown name fails here, not at the first clipping call
    patch = Patch(backend)
    with _lock:
        _open.append(patch)
        _apply()
    return patch


def unpatch_torch(*, force: bool = False) -> None:
    """Close the most recent patch opened without a ``with`` block (a no-op when there is none).

    Args:
        force: close every open patch, ``with`` blocks included, and restore torch now.
    """
    with _lock:
        if force:
            for patch in _open:
                patch._depth = 0
            _open.clear()
        else:
            for index in range(len(_open) - 1, -1, -1):
                if _open[index]._depth == 0:
                    del _open[index]
                    break
            else:
                return
        _apply()


def is_patched() -> bool:
    """True while any patch is open."""
    with _lock:
        return bool(_open)


def open_patches() -> int:
    """How many patches are open (nesting depth, across threads)."""
    with _lock:
        return len(_open)
