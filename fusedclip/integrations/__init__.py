"""Framework integrations: route a training framework's clipping through a :class:`fusedclip.Clipper`.

Each submodule imports its framework when it is imported itself; ``import fusedclip`` never does.

* :mod:`fusedclip.integrations.transformers`: ``attach(trainer, mode=...)`` for a Hugging Face
  ``Trainer``.
* :mod:`fusedclip.integrations.lightning`: ``FusedClipCallback(mode=...)`` for a Lightning ``Trainer``.
* :mod:`fusedclip.integrations.accelerate`: ``clip_grad_norm_(accelerator, ...)`` and
  ``route(accelerator, clipper)`` for an ``accelerate.Accelerator``.

Install the frameworks with ``pip install "fusedclip[integrations]"`` (torch is left as installed).

Every integration logs the same statistics, named as :func:`statistics` names them: ``grad_norm``
(the total norm before clipping, as the Clipper returned it) and ``clip/threshold`` (the threshold
of the last step), ``clip/ema_norm`` (moving average of the finite norms), ``clip/clipped_fraction``
(the fraction of steps clipped so far) and ``clip/nonfinite_steps`` (steps with an inf/NaN norm).
"""

from __future__ import annotations

from typing import Any

import torch

from ..adaptive import Clipper

__all__ = ["statistics", "tensor_statistics"]


def statistics(clipper: Clipper, prefix: str = "clip/") -> dict[str, float]:
    """The Clipper's statistics as plain floats for a logger (synchronises once, via ``summary()``).

    ``grad_norm`` here is the last norm unrounded (float64); the Clipper's return value is the same
    norm rounded to the grads' dtype, as ``clip_grad_norm_`` returns it.

    ``threshold`` is NaN while an adaptive mode has no threshold yet (AutoClip before its first
    finite norm).
    """
    summary: dict[str, Any] = clipper.summary()
    return {
        "grad_norm": summary["last_norm"],
        f"{prefix}threshold": summary["threshold"],
        f"{prefix}ema_norm": summary["ema_norm"],
        f"{prefix}clipped_fraction": summary["clipped_fraction"],
        f"{prefix}nonfinite_steps": float(summary["nonfinite_steps"]),
    }


def tensor_statistics(clipper: Clipper, prefix: str = "clip/") -> dict[str, torch.Tensor]:
    """The same statistics as :func:`statistics`, as fresh 0-dim device tensors (no synchronisation).

    For loggers that accept tensors and read them later (Lightning's ``self.log``): every value is
    a new tensor, so later steps do not change what was logged.
    """
    state = clipper.state
    steps = max(clipper.steps, 1)
    return {
        "grad_norm": state["last_norm"].clone(),
        f"{prefix}threshold": state["threshold"].clone(),
        f"{prefix}ema_norm": state["ema_norm"].clone(),
        f"{prefix}clipped_fraction": state["clipped_steps"] / steps,
        f"{prefix}nonfinite_steps": state["nonfinite_steps"].clone(),
    }
