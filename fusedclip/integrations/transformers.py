"""fusedclip for the Hugging Face ``Trainer``: any :class:`fusedclip.Clipper` mode, statistics in its logs.

    from fusedclip.integrations.transformers import attach

    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    callback = attach(trainer, mode="zclip")        # any Clipper mode and keyword arguments
    trainer.train()
    callback.clipper.summary()

How the Trainer clips (transformers 4.x and 5.x): once per optimizer step, after the last
micro-batch of gradient accumulation, it calls ``self.accelerator.clip_grad_norm_(
model.parameters(), args.max_grad_norm)`` (when ``max_grad_norm > 0``; transformers 5 also calls it
with ``max_norm=inf`` to log the norm when it is 0), which unscales fp16 grads and calls torch's
``clip_grad_norm_``; it logs the returned norm as ``grad_norm`` and then runs
``on_pre_optimizer_step`` and ``optimizer.step()``.

:func:`attach` takes over that one call, so the grads are read for the norm once per step and
the ``grad_norm`` the Trainer logs is the Clipper's:

* it adds a :class:`FusedClipCallback`, whose ``on_train_begin`` (after the Trainer has prepared
  the model and its ``Accelerator``) routes ``trainer.accelerator.clip_grad_norm_`` through the
  Clipper with :func:`fusedclip.integrations.accelerate.route` (unscale, then the Clipper);
* it wraps ``trainer.log`` so that every training log (the ones with ``grad_norm``) also carries
  ``clip/threshold``, ``clip/ema_norm``, ``clip/clipped_fraction`` and ``clip/nonfinite_steps``,
  before the Trainer stores the log in ``state.log_history`` and hands it to every ``report_to``
  integration. Reading them synchronises once per log, not per step.

The Clipper's ``max_norm`` defaults to ``args.max_grad_norm``; with ``mode="norm"`` training is
the Trainer's own clipping with fusedclip's kernels. ``args.max_grad_norm`` is set to the Clipper's
``max_norm`` when it is 0 or None, so that every transformers version makes the call. FSDP and
DeepSpeed clip inside their engines and are refused.
"""

from __future__ import annotations

import functools
from typing import Any

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fusedclip.integrations.transformers needs transformers: pip install 'fusedclip[integrations]'"
    ) from error

from ..adaptive import Clipper
from . import accelerate as _accelerate
from . import statistics

__all__ = ["FusedClipCallback", "attach"]


class FusedClipCallback(TrainerCallback):
    """Holds the Clipper and routes the Trainer's accelerator through it at the start of training.

    Made by :func:`attach`; ``clipper`` is the :class:`fusedclip.Clipper` in use (``summary()``,
    ``state_dict()``), ``prefix`` the prefix of the statistics' names.
    """

    def __init__(self, trainer: Trainer, mode: str, prefix: str, clipper_kwargs: dict[str, Any]) -> None:
        self.trainer = trainer
        self.mode = mode
        self.prefix = prefix
        self.clipper_kwargs = clipper_kwargs
        self.clipper: Clipper | None = None
        self._build()

    def _build(self) -> None:
        """(Re)build the Clipper when the model's parameters are not the ones it clips (model_init)."""
        named = list(self.trainer.model.named_parameters()) if self.trainer.model is not None else []
        named = [(name, p) for name, p in named if p.requires_grad]
        if not named:
            return
        if self.clipper is None or [id(p) for _, p in self.clipper.named] != [id(p) for _, p in named]:
            self.clipper = Clipper(named, self.mode, **self.clipper_kwargs)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._build()
        if self.clipper is None:
            raise ValueError("fusedclip: the Trainer's model has no trainable parameters to clip")
        _accelerate.route(self.trainer.accelerator, self.clipper)

    def statistics(self) -> dict[str, float]:
        """The Clipper's statistics as logged (empty before the first step)."""
        if self.clipper is None or self.clipper.steps == 0:
            return {}
        return statistics(self.clipper, self.prefix)


def attach(trainer: Trainer, mode: str = "norm", *, prefix: str = "clip/", **clipper_kwargs: Any) -> FusedClipCallback:
    """Make ``trainer`` clip with a :class:`fusedclip.Clipper` and log its statistics.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass), before ``train()``.
        mode: the Clipper's mode: ``"norm"``, ``"autoclip"``, ``"zclip"`` or ``"agc"``.
        prefix: prefix of the statistics' names in the logs (``grad_norm`` keeps its name).
        **clipper_kwargs: any other :class:`fusedclip.Clipper` keyword (``max_norm`` defaults to
            ``trainer.args.max_grad_norm`` when that is positive).

    Returns:
        The callback added to the trainer; its ``clipper`` attribute is the Clipper.
    """
    if getattr(trainer, "_fusedclip_callback", None) is not None:
        raise RuntimeError("fusedclip is already attached to this Trainer")
    distributed_type = trainer.accelerator.distributed_type
    if distributed_type in _accelerate._ENGINE_CLIPPED:
        raise NotImplementedError(
            f"fusedclip cannot take over clipping under {distributed_type}: that engine clips its own gradients"
        )
    args = trainer.args
    if args.max_grad_norm and args.max_grad_norm > 0:
        clipper_kwargs.setdefault("max_norm", args.max_grad_norm)
    callback = FusedClipCallback(trainer, mode, prefix, clipper_kwargs)
    if not args.max_grad_norm or args.max_grad_norm <= 0:
        args.max_grad_norm = callback.clipper.max_norm if callback.clipper is not None else 1.0
    trainer.add_callback(callback)
    trainer._fusedclip_callback = callback  # type: ignore[attr-defined]

    original_log = trainer.log

    @functools.wraps(original_log)
    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "grad_norm" in logs:  # a training log: add the statistics, keep the Trainer's grad_norm
            for key, value in callback.statistics().items():
                logs.setdefault(key, value)
        return original_log(logs, *args, **kwargs)

    trainer.log = log  # type: ignore[method-assign]
    return callback
