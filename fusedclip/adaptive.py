"""Clipping that watches itself: per-tensor norms, training-health statistics, adaptive thresholds.

:class:`Clipper` is built once from ``model.named_parameters()`` and called once per step. Every
mode shares one norm pass (which also yields each tensor's norm) and one scale pass; thresholds,
histories and statistics live in device tensors, so a step never synchronises with the host.
:meth:`Clipper.summary` reads the statistics (the one synchronisation, when you ask for it).

Modes:

* ``"norm"``: a fixed ``max_norm`` (the same results as :func:`fusedclip.clip_grad_norm_`).
* ``"autoclip"``: the threshold is the ``percentile`` of all total norms seen so far, the current
  one included (Seetharaman et al., 2020, "AutoClip").
* ``"zclip"``: exponential moving averages of the norm's mean and variance; a norm whose z-score
  exceeds ``z_threshold`` is clipped to ``mean + z_threshold**2 / z * std`` (ZClip, Kumar et al.,
  2025, adaptive scaling); the averages start from the mean and variance of ``warmup_steps`` norms
  (clipped at ``max_norm`` meanwhile) and are updated with the clipped norm.
* ``"agc"``: unit-wise adaptive gradient clipping (Brock et al., 2021, NFNets): each output unit's
  gradient norm is capped at ``agc_clipping * max(|unit weights|, agc_eps)``; parameters whose
  name contains one of ``agc_exclude`` (final layers) are left alone. Unit-wise norms are per row,
  not per tensor, so this mode runs on torch ops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import clip
from .backends.base import ACC_DTYPE, CLIP_EPS, clip_coefficient, total_from_accumulator
from .inputs import check_max_norm
from .norm_type import parse_norm_type

MODES = ("norm", "autoclip", "zclip", "agc")
#: name fragments of final layers that AGC leaves alone (NFNets exclude the classifier)
_DEFAULT_AGC_EXCLUDE = ("head", "classifier", "lm_head")


def _named(parameters: Iterable[Any]) -> list[tuple[str, Tensor]]:
    """Accept ``named_parameters()`` pairs or bare parameters (named ``param0``, ``param1``...)."""
    named = []
    for index, item in enumerate(parameters):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            named.append((str(item[0]), item[1]))
        elif isinstance(item, Tensor):
            named.append((f"param{index}", item))
        else:
            raise TypeError(f"parameters[{index}] is a {type(item).__name__}; expected a Tensor or a (name, Tensor) pair")
    if not named:
        raise ValueError("Clipper needs at least one parameter")
    return named


def _coefficient(total: Tensor, threshold: Tensor) -> Tensor:
    """torch's coefficient against a device-side threshold; no threshold yet (NaN) means no cap.

    A +inf total still gives coefficient 0 and NaN stays NaN, exactly as with a fixed threshold.
    """
    threshold = torch.nan_to_num(threshold, nan=math.inf)
    coef = clip_coefficient(total, threshold)
    return torch.where(torch.isposinf(total), torch.zeros_like(coef), coef)


class Clipper:
    """Stateful gradient clipping with on-device statistics; see the module docstring for modes.

    Args:
        parameters: ``model.named_parameters()`` (names are used for ``agc_exclude`` and the top-k
            report) or an iterable of parameters.
        mode: ``"norm"``, ``"autoclip"``, ``"zclip"`` or ``"agc"``.
        max_norm: the threshold of ``"norm"``; the cap during the warm-up of ``"zclip"``.
        norm_type: the norm's order (all modes but ``"agc"``, which uses unit-wise L2 norms).
        percentile, history_size: AutoClip's percentile (0-100) and how many norms it remembers.
        alpha, z_threshold, warmup_steps: ZClip's EMA factor, z-score threshold and warm-up length.
        agc_clipping, agc_eps, agc_exclude: AGC's lambda, epsilon and excluded name fragments.
        ema_decay: decay of the reported EMA of the total norm.
        top_k: how many parameters ``summary()`` lists by gradient norm.
        backend: the fusedclip backend (None: automatic).
    """

    def __init__(
        self,
        parameters: Iterable[Any],
        mode: str = "norm",
        *,
        max_norm: float = 1.0,
        norm_type: float | str = 2.0,
        percentile: float = 10.0,
        history_size: int = 10_000,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        agc_clipping: float = 0.01,
        agc_eps: float = 1e-3,
        agc_exclude: Iterable[str] = _DEFAULT_AGC_EXCLUDE,
        ema_decay: float = 0.99,
        top_k: int = 5,
        backend: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown Clipper mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100]; got {percentile}")
        if history_size < 1 or warmup_steps < 1 or top_k < 0:
            raise ValueError("history_size and warmup_steps must be >= 1 and top_k >= 0")
        if not (0.0 < alpha < 1.0 and 0.0 < ema_decay < 1.0):
            raise ValueError("alpha and ema_decay must lie strictly between 0 and 1")
        if z_threshold <= 0 or agc_clipping <= 0 or agc_eps <= 0:
            raise ValueError("z_threshold, agc_clipping and agc_eps must be positive")
        self.named = _named(parameters)
        self.mode = mode
        self.max_norm = float(check_max_norm(max_norm))
        self.norm = parse_norm_type(norm_type)
        self.percentile = float(percentile)
        self.history_size = int(history_size)
        self.alpha = float(alpha)
        self.z_threshold = float(z_threshold)
        self.warmup_steps = int(warmup_steps)
        self.agc_clipping = float(agc_clipping)
        self.agc_eps = float(agc_eps)
        self.agc_exclude = tuple(agc_exclude)
        self.ema_decay = float(ema_decay)
        self.top_k = int(top_k)
        self.backend = backend
        self.steps = 0
        self.device = self.named[0][1].device
        zeros = lambda *shape: torch.zeros(shape, dtype=ACC_DTYPE, device=self.device)  # noqa: E731
        # statistics and adaptive state: device tensors only
        self.state: dict[str, Tensor] = {
            "last_norm": zeros(),
            "ema_norm": zeros(),
            "clipped_steps": zeros(),
            "nonfinite_steps": zeros(),
            "param_norms": zeros(len(self.named)),
            "threshold": torch.full((), math.nan, dtype=ACC_DTYPE, device=self.device),
        }
        if mode == "autoclip":
            self.state["history"] = torch.full((self.history_size,), math.nan, dtype=ACC_DTYPE, device=self.device)
        if mode == "zclip":
            self.state["warmup"] = torch.full((self.warmup_steps,), math.nan, dtype=ACC_DTYPE, device=self.device)
            self.state["mean"] = zeros()
            self.state["var"] = zeros()
        self._index_cache: dict[tuple[int, ...], Tensor] = {}

    # -- one step ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self) -> Tensor:
        """Clip the current grads once; returns the total norm before clipping (no host sync)."""
        positions = tuple(i for i, (_, p) in enumerate(self.named) if p.grad is not None)
        grads = [self.named[i][1].grad for i in positions]
        if not grads:
            self.steps += 1
            return torch.tensor(0.0)
        if self.mode == "agc":
            total, per_tensor, any_clipped = self._agc_step(positions, grads)
            coef = torch.where(any_clipped, 0.0, 1.0).to(ACC_DTYPE)  # counts as clipped when any unit was
            self.state["threshold"].fill_(self.agc_clipping)
        else:
            total, per_tensor, coef = self._norm_step(grads)
        self._record(total, per_tensor, positions, coef)
        self.steps += 1
        return total.to(self._result_dtype(grads))

    @staticmethod
    def _result_dtype(grads: list[Tensor]) -> torch.dtype:
        dtype = grads[0].dtype
        for g in grads[1:]:
            dtype = torch.promote_types(dtype, g.dtype)
        return dtype

    def _norm_step(self, grads: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        per_tensor = torch.empty(len(grads), dtype=ACC_DTYPE, device=self.device)
        fixed = self.max_norm if self.mode == "norm" else None
        result, calls = clip.norm_pass(grads, self.norm, fixed, backend=self.backend, per_tensor=per_tensor)
        total = total_from_accumulator(result.acc, self.norm)
        if self.mode == "norm":
            coef = result.coef
            self.state["threshold"].fill_(self.max_norm)
        else:
            threshold = self._autoclip_threshold(total) if self.mode == "autoclip" else self._zclip_threshold(total)
            self.state["threshold"].copy_(threshold)
            coef = _coefficient(total, threshold)
        clip.scale_calls_(calls, coef)
        return total, per_tensor, coef

    def _autoclip_threshold(self, total: Tensor) -> Tensor:
        history = self.state["history"]
        finite_or_nan = torch.where(torch.isfinite(total), total, torch.full_like(total, math.nan))
        history[self.steps % self.history_size] = finite_or_nan
        seen = history[: min(self.steps + 1, self.history_size)]
        return torch.nanquantile(seen, self.percentile / 100.0)

    def _zclip_threshold(self, total: Tensor) -> Tensor:
        finite = torch.isfinite(total)
        if self.steps < self.warmup_steps:
            warmup = self.state["warmup"]
            warmup[self.steps] = torch.where(finite, total, torch.full_like(total, math.nan))
            if self.steps == self.warmup_steps - 1:
                mean = torch.nanmean(warmup)
                self.state["mean"].copy_(mean)
                self.state["var"].copy_(torch.nanmean((warmup - mean) ** 2))
            return torch.full_like(total, self.max_norm)
        mean, var = self.state["mean"], self.state["var"]
        std = var.sqrt()
        z = (total - mean) / (std + CLIP_EPS)
        spike = z > self.z_threshold
        threshold = torch.where(spike, mean + (self.z_threshold**2 / z) * std, torch.full_like(total, math.inf))
        clipped = torch.minimum(total, threshold)
        new_mean = self.alpha * mean + (1 - self.alpha) * clipped
        new_var = self.alpha * var + (1 - self.alpha) * (clipped - new_mean) ** 2
        mean.copy_(torch.where(finite, new_mean, mean))
        var.copy_(torch.where(finite, new_var, var))
        return threshold

    def _agc_step(self, positions: tuple[int, ...], grads: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Unit-wise clipping; returns the L2 norms of the grads before clipping and whether any
        unit was clipped."""
        per_tensor = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(ACC_DTYPE) for g in grads])
        any_clipped = torch.zeros((), dtype=torch.bool, device=self.device)
        for i, grad in zip(positions, grads):
            name, param = self.named[i]
            if any(fragment in name for fragment in self.agc_exclude):
                continue
            dims = tuple(range(1, grad.dim())) if grad.dim() > 1 else None
            weight_norm = torch.linalg.vector_norm(param.detach().float(), dim=dims, keepdim=True)
            grad_norm = torch.linalg.vector_norm(grad.float(), dim=dims, keepdim=True)
            limit = weight_norm.clamp(min=self.agc_eps) * self.agc_clipping
            over = grad_norm > limit
            factor = torch.where(over, limit / grad_norm.clamp(min=1e-6), torch.ones_like(grad_norm))
            grad.mul_(factor)
            any_clipped |= over.any()
        total = torch.linalg.vector_norm(per_tensor)
        return total, per_tensor, any_clipped

    def _record(self, total: Tensor, per_tensor: Tensor, positions: tuple[int, ...], coef: Tensor) -> None:
        state = self.state
        state["last_norm"].copy_(total)
        if self.steps == 0:
            state["ema_norm"].copy_(total)
        else:
            state["ema_norm"].mul_(self.ema_decay).add_(total, alpha=1 - self.ema_decay)
        state["clipped_steps"].add_((coef < 1).to(ACC_DTYPE))
        state["nonfinite_steps"].add_((~torch.isfinite(total)).to(ACC_DTYPE))
        index = self._index_cache.get(positions)
        if index is None:
            index = self._index_cache[positions] = torch.tensor(positions, dtype=torch.int64, device=self.device)
        state["param_norms"].zero_().index_copy_(0, index, per_tensor.to(self.device))

    # -- reading and checkpointing -----------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Plain numbers for loggers (TensorBoard, W&B); the only call that synchronises."""
        state = self.state
        steps = max(self.steps, 1)
        k = min(self.top_k, len(self.named))
        values, indices = torch.topk(torch.nan_to_num(state["param_norms"], nan=math.inf), k)
        return {
            "mode": self.mode,
            "steps": self.steps,
            "last_norm": float(state["last_norm"]),
            "ema_norm": float(state["ema_norm"]),
            "threshold": float(state["threshold"]),
            "clipped_fraction": float(state["clipped_steps"]) / steps,
            "nonfinite_steps": int(state["nonfinite_steps"]),
            "top_params": [(self.named[i][0], float(v)) for v, i in zip(values.tolist(), indices.tolist())],
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically after a restart (tensors are cloned)."""
        return {"mode": self.mode, "steps": self.steps, "tensors": {k: v.clone() for k, v in self.state.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["mode"] != self.mode:
            raise ValueError(f"state is for mode {state_dict['mode']!r}, this Clipper is {self.mode!r}")
        tensors = state_dict["tensors"]
        if set(tensors) != set(self.state):
            raise ValueError(f"state holds {sorted(tensors)}, expected {sorted(self.state)}")
        for key, value in tensors.items():
            if value.shape != self.state[key].shape:
                raise ValueError(f"state tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(self.state[key].shape)}")
            self.state[key].copy_(value)
        self.steps = int(state_dict["steps"])
