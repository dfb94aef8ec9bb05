"""fusedclip: a drop-in replacement for ``torch.nn.utils.clip_grad_norm_`` built on fused kernels.

    import fusedclip
    fusedclip.clip_grad_norm_(model.parameters(), max_norm=1.0)

The global norm of all gradients is computed in one kernel launch per device and the gradients are
scaled in one more, without a host synchronisation. ``available_backends(device)`` says which
backends run on that device's tensors here, and why the others do not.
"""

from __future__ import annotations

from .adaptive import Clipper
from .amp import unscale_and_clip_
from .backends import available_backends
from .clip import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_norms, get_total_norm
from .history import NormLog, read_log
from .optim import clip_and_step_
from .patch import is_patched, patch_torch, unpatch_torch
from .tracker import NormTracker

__version__ = "0.1.0"

__all__ = [
    "Clipper",
    "NormTracker",
    "NormLog",
    "__version__",
    "available_backends",
    "clip_and_step_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_norms",
    "get_total_norm",
    "is_patched",
    "patch_torch",
    "read_log",
    "unpatch_torch",
    "unscale_and_clip_",
]
