"""fusedclip for Hugging Face Accelerate: ``accelerator.clip_grad_norm_`` through fusedclip.

``Accelerator.clip_grad_norm_(parameters, max_norm, norm_type)`` unscales the grads when a
``GradScaler`` is in use (fp16 mixed precision: ``accelerator.unscale_gradients()``, which marks
each optimizer as unscaled so its step does not unscale again) and then calls
``torch.nn.utils.clip_grad_norm_``. Both entry points here do the same, with fusedclip::

    from fusedclip.integrations import accelerate as fc

    # stateless: a drop-in for accelerator.clip_grad_norm_(model.parameters(), 1.0)
    norm = fc.clip_grad_norm_(accelerator, model.parameters(), max_norm=1.0)

    # stateful: any Clipper mode; every accelerator.clip_grad_norm_ call (yours, or a library's
    # such as the Trainer's) now runs the Clipper, whose own threshold applies
    clipper = fusedclip.Clipper(model.named_parameters(), mode="zclip")
    fc.route(accelerator, clipper)
    ...
    accelerator.log(fc.statistics(clipper), step=step)   # to every tracker of accelerator.log

Supported: a single process and DDP (``MULTI_CPU``, ``MULTI_GPU`` and the like: the grads are
already all-reduced when clipping runs, so clipping each process's full grads is exact). FSDP,
DeepSpeed, XLA and Megatron-LM clip inside their own engines; :func:`route` refuses them and
:func:`clip_grad_norm_` leaves them to Accelerate.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

try:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fusedclip.integrations.accelerate needs accelerate: pip install 'fusedclip[integrations]'"
    ) from error

import torch

from .. import clip
from ..adaptive import Clipper
from . import statistics

__all__ = ["clip_grad_norm_", "route", "routed_clipper", "statistics", "unroute"]

#: distributed types whose engines clip for themselves
_ENGINE_CLIPPED = frozenset(
    getattr(DistributedType, name)
    for name in ("FSDP", "DEEPSPEED", "XLA", "MEGATRON_LM")
    if hasattr(DistributedType, name)
)
_ORIGINAL = "_fusedclip_original_clip_grad_norm_"


def clip_grad_norm_(
    accelerator: Accelerator,
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    backend: str | None = None,
) -> torch.Tensor | None:
    """``accelerator.clip_grad_norm_`` with fusedclip's kernels: unscale, then clip; returns the norm.

    Under FSDP, DeepSpeed, XLA or Megatron-LM it calls Accelerate's own method unchanged.
    """
    if accelerator.distributed_type in _ENGINE_CLIPPED:
        return type(accelerator).clip_grad_norm_(accelerator, parameters, max_norm, norm_type=norm_type)
    accelerator.unscale_gradients()  # a no-op without a GradScaler
    return clip.clip_grad_norm_(parameters, max_norm, norm_type, backend=backend)


def route(accelerator: Accelerator, clipper: Clipper) -> None:
    """Make ``accelerator.clip_grad_norm_(...)`` unscale the grads and run ``clipper`` (this instance only).

    The ``parameters``, ``max_norm`` and ``norm_type`` a caller passes are ignored: the Clipper
    clips the parameters it was built with, with its own mode and threshold, and returns the total
    norm before clipping. Routing again replaces the Clipper; :func:`unroute` restores Accelerate's.
    """
    if accelerator.distributed_type in _ENGINE_CLIPPED:
        raise NotImplementedError(
            f"fusedclip cannot take over clipping under {accelerator.distributed_type}: that engine clips"
            " its own (sharded or fused) gradients. Use Accelerate's clipping there."
        )

    def clip_grad_norm_(
        self: Accelerator, parameters: Any = None, max_norm: Any = None, norm_type: Any = 2
    ) -> torch.Tensor:
        self.unscale_gradients()
        return clipper()

    if not hasattr(accelerator, _ORIGINAL):
        setattr(accelerator, _ORIGINAL, accelerator.clip_grad_norm_)
    accelerator.clip_grad_norm_ = types.MethodType(clip_grad_norm_, accelerator)  # type: ignore[method-assign]
    accelerator._fusedclip_clipper = clipper  # type: ignore[attr-defined]


def unroute(accelerator: Accelerator) -> None:
    """Undo :func:`route`: ``accelerator.clip_grad_norm_`` is Accelerate's again (a no-op if not routed)."""
    if hasattr(accelerator, _ORIGINAL):
        delattr(accelerator, _ORIGINAL)
        del accelerator.clip_grad_norm_  # the instance attribute; the class method shows through again
        del accelerator._fusedclip_clipper  # type: ignore[attr-defined]


def routed_clipper(accelerator: Accelerator) -> Clipper | None:
    """The Clipper :func:`route` installed on this accelerator, or None."""
    return getattr(accelerator, "_fusedclip_clipper", None)
