"""fusedclip for Lightning: a ``Callback`` that clips with a :class:`fusedclip.Clipper` and logs it.

    from fusedclip.integrations.lightning import FusedClipCallback

    trainer = L.Trainer(callbacks=[FusedClipCallback(mode="autoclip", percentile=10)])  # no gradient_clip_val
    trainer.fit(model)

How Lightning clips (2.x): once per optimizer step, after the closure has run backward (and, under
``precision="16-mixed"``, after ``scaler.unscale_(optimizer)``), the precision plugin calls the
callbacks' ``on_before_optimizer_step``, then the module's, then
``LightningModule.configure_gradient_clipping``, which with ``Trainer(gradient_clip_val=...)``
calls ``torch.nn.utils.clip_grad_norm_`` on the optimizer's parameters.

This callback clips in ``on_before_optimizer_step`` instead (the grads are unscaled there), so
leave ``gradient_clip_val`` unset: a value there would clip a second time and is refused. It
logs ``grad_norm`` (the norm before clipping) and ``clip/threshold``, ``clip/ema_norm``,
``clip/clipped_fraction``, ``clip/nonfinite_steps`` with ``pl_module.log_dict`` every step, as
device tensors (no synchronisation; Lightning writes them every ``log_every_n_steps``). The
Clipper's state is saved in Lightning checkpoints and restored with them.

Strategies: a single device and DDP (grads are all-reduced before the hook). FSDP, DeepSpeed and
model-parallel strategies shard or fuse grads and are refused. The callback subclasses
``lightning.pytorch.Callback`` (or ``pytorch_lightning.Callback`` where only that is installed).
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError(
            "fusedclip.integrations.lightning needs lightning: pip install 'fusedclip[integrations]'"
        ) from error

import torch

from ..adaptive import Clipper
from . import tensor_statistics

__all__ = ["FusedClipCallback"]

_SHARDING_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


class FusedClipCallback(pl.Callback):
    """Clip with a :class:`fusedclip.Clipper` of any mode in ``on_before_optimizer_step``.

    Args:
        mode: ``"norm"``, ``"autoclip"``, ``"zclip"`` or ``"agc"``.
        prefix: prefix of the statistics' names (``grad_norm`` keeps its name).
        **clipper_kwargs: any other :class:`fusedclip.Clipper` keyword (``max_norm``, ``percentile``...).

    ``clipper`` is the Clipper, built from ``pl_module.named_parameters()`` at ``on_fit_start``.
    """

    def __init__(self, mode: str = "norm", *, prefix: str = "clip/", **clipper_kwargs: Any) -> None:
        self.mode = mode
        self.prefix = prefix
        self.clipper_kwargs = clipper_kwargs
        self.clipper: Clipper | None = None
        self._pending_state: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in _SHARDING_STRATEGIES):
            raise NotImplementedError(f"fusedclip cannot clip under {strategy}: it shards or fuses the gradients")
        if trainer.gradient_clip_val:
            raise ValueError(
                f"FusedClipCallback clips the gradients; remove Trainer(gradient_clip_val={trainer.gradient_clip_val}),"
                " which would clip them a second time"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "FusedClipCallback needs automatic optimization; with manual optimization call a Clipper yourself"
            )
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        if self.clipper is None or [id(p) for _, p in self.clipper.named] != [id(p) for _, p in named]:
            self.clipper = Clipper(named, self.mode, **self.clipper_kwargs)
        if self._pending_state is not None:
            self.clipper.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        assert self.clipper is not None, "on_fit_start builds the Clipper"
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise RuntimeError(
                f"{type(optimizer).__name__} unscales its grads inside step(), so they are still scaled here"
                " and cannot be clipped (Lightning refuses gradient_clip_val with it for the same reason)"
            )
        norm = self.clipper()  # rounded to the grads' dtype, as torch's clip_grad_norm_ returns it
        logged = {**tensor_statistics(self.clipper, self.prefix), "grad_norm": norm}
        pl_module.log_dict(logged, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        """The Clipper's state, saved in Lightning checkpoints (empty before ``fit``)."""
        return self.clipper.state_dict() if self.clipper is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the Clipper's state (applied at ``on_fit_start`` if the Clipper is not built yet)."""
        if not state_dict:
            return
        if self.clipper is None:
            self._pending_state = dict(state_dict)
        else:
            self.clipper.load_state_dict(state_dict)
