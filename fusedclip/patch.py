"""One-line global swap: route torch's clipping functions through fusedclip.

    fusedclip.patch_torch()          # Hugging Face Trainer, Accelerate, Lightning now use fusedclip
    with fusedclip.patch_torch():    # or only inside a block
        trainer.train()

What a patch reaches: every call that looks the function up through ``torch.nn.utils`` or
``torch.nn.utils.clip_grad`` at call time (``torch.nn.utils.clip_grad_norm_(...)``,
``nn.utils.clip_grad_norm_(...)``), which is how Trainer, Accelerate and Lightning call it.
What it cannot reach: a name bound before patching, e.g. ``from torch.nn.utils import
clip_grad_norm_`` executed at import time, keeps pointing at torch's function.
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

_lock = threading.Lock()
_originals: dict[tuple[ModuleType, str], Any] = {}


def _replacement(name: str, backend: str | None) -> Callable[..., Any]:
    ours = getattr(clip, name)
    if backend is None:
        return ours

    @functools.wraps(ours)
    def with_backend(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", backend)
        return ours(*args, **kwargs)

    return with_backend


class _Patch:
    """Returned by :func:`patch_torch`; a context manager that unpatches on exit."""

    def __enter__(self) -> _Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        unpatch_torch()


def patch_torch(backend: str | None = None) -> _Patch:
    """Make ``torch.nn.utils.clip_grad_norm_`` and friends call fusedclip (idempotent).

    Args:
        backend: passed to every patched call (None: automatic choice).

    Returns:
        A context manager; leaving it calls :func:`unpatch_torch`.
    """
    with _lock:
        for module in _MODULES:
            for name in PATCHED_NAMES:
                if not hasattr(module, name):
                    continue  # an older torch without the split API
                _originals.setdefault((module, name), getattr(module, name))
                setattr(module, name, _replacement(name, backend))
    return _Patch()


def unpatch_torch() -> None:
    """Restore torch's own functions (a no-op when not patched)."""
    with _lock:
        for (module, name), original in _originals.items():
            setattr(module, name, original)
        _originals.clear()


def is_patched() -> bool:
    """True while :func:`patch_torch` is in effect."""
    return bool(_originals)
