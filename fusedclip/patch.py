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
``with`` block, by its :meth:`Patch.close`, or by :func:`unpatch_torch`, which closes the most
recent patch opened *without* a ``with`` block (so ``patch_torch()`` / ``unpatch_torch()`` pairs
nest like ``with`` blocks and never end an enclosing block's patch);
``unpatch_torch(force=True)`` closes every patch at once. While several patches are open, the
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
    """One open patch, returned by :func:`patch_torch`; a context manager that closes it on exit."""

    __slots__ = ("_entered", "backend")

    def __init__(self, backend: str | None) -> None:
        self.backend = backend
        self._entered = False

    @property
    def active(self) -> bool:
        """True until this patch is closed."""
        with _lock:
            return any(patch is self for patch in _open)

    def __enter__(self) -> Patch:
        with _lock:
            self._entered = True  # owned by the with block: unpatch_torch() leaves it alone
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this patch (a no-op when it is closed already); torch is restored when it was the last."""
        with _lock:
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
        The patch: a context manager whose exit closes it (torch is restored when the last open
        patch closes); or close it with :func:`unpatch_torch` or ``.close()``.
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
            _open.clear()
        else:
            for index in range(len(_open) - 1, -1, -1):
                if not _open[index]._entered:
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
