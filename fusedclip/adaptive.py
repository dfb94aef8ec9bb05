"""Clipping that watches itself: per-tensor norms, training-health statistics, adaptive thresholds.

:class:`Clipper` is built once from ``model.named_parameters()`` and called once per step. Every
mode shares one norm pass (which also yields each tensor's norm) and one scale pass; thresholds,
histories and statistics live in device tensors, so a step never synchronises with the host.
:meth:`Clipper.summary` reads the statistics (the one synchronisation, when you ask for it).

Modes:

* ``"norm"``: a fixed ``max_norm`` (the same results as :func:`fusedclip.clip_grad_norm_`).
* ``"autoclip"``: the threshold is the ``percentile`` of the last ``history_size`` finite total
  norms, the current one included (Seetharaman et al., 2020, "AutoClip"); no cap before the first
  finite norm.
* ``"zclip"``: exponential moving averages of the norm's mean and variance; a norm whose z-score
  exceeds ``z_threshold`` is clipped to ``mean + z_threshold**2 / z * std`` (ZClip, Kumar et al.,
  2025, adaptive scaling); the averages start from the mean and variance of the first
  ``warmup_steps`` finite norms (norms are clipped at ``max_norm`` until then, so a warm-up lasts
  longer than ``warmup_steps`` steps when some norms were inf or NaN) and are updated with the
  clipped norm.
* ``"agc"``: unit-wise adaptive gradient clipping (Brock et al., 2021, NFNets): each output unit's
  gradient norm is capped at ``agc_clipping * max(|unit weights|, agc_eps)``; parameters whose
  name contains one of ``agc_exclude`` (final layers) are left alone. Unit-wise norms are per row,
  not per tensor, so this mode runs on torch ops.
* ``"adagc"``: per-tensor adaptive clipping (AdaGC, Wang et al., 2025, arXiv 2502.11034): each tensor
  keeps an EMA ``gamma`` of its own clipped norm and is scaled down to ``adagc_lambda * gamma`` when
  its norm exceeds that; during the first ``warmup_steps`` finite norms the tensors are clipped
  together at ``max_norm`` and ``gamma`` is the minimum of the clipped norms. The exact rule is in
  :func:`fusedclip.groups.adagc_rule`. The coefficients are per tensor, applied as ``clip_grad_norm_``
  applies its one coefficient (``_scale_each_``: exact below float32's normal range, chosen on the device).

Parameter groups: ``Clipper([{"params": ..., "mode": ..., <options>}, ...])`` clips each group by
its own mode and options (the Clipper's keyword arguments are the defaults), ``"mode": None``
excludes a group from clipping (its grads are never written; its norms are still reported and a
non-finite norm in it still flags a step for skipping). All groups come from the one norm pass over
every grad: a group's total is the p-norm of its tensors' norms, computed on the device. Per-group
statistics are in ``state["groups.<k>.<key>"]`` and ``summary()["groups"]``; the Clipper-wide ones
(``last_norm``, ``ema_norm``, ...) are those of the total over all grads, and a step counts as
clipped when any group clipped. See :mod:`fusedclip.groups` for what a group may set.

Non-finite norms (inf or NaN: an overflow in one step) never enter any statistic: AutoClip's
history, ZClip's warm-up and moving averages and the reported ``ema_norm`` are computed over the
finite norms only, exactly as if the non-finite steps had not happened (those steps are still
clipped: an inf norm gives coefficient 0 and a NaN norm NaN grads, as in torch, and they are
counted in ``nonfinite_steps``). Which norms were finite is known only on the device, so every
such choice is a ``torch.where`` and a step never waits for the device.

Skipping a step (``skip="nonfinite"`` or ``"spike"``): each call also sets :attr:`Clipper.found_inf`,
a 0-d float32 device tensor (1.0: skip this step, 0.0: take it), computed on the device from the
statistics as they were before this step, and counts flagged steps in ``skipped_steps``. The rule:

* always (both settings): a non-finite total norm (inf or NaN); with groups, a non-finite total
  over all grads or of any group, excluded groups included;
* ``"spike"``, modes ``"norm"``, ``"autoclip"``, ``"agc"``, ``"adagc"``: a total norm above
  ``skip_factor`` times the EMA of the finite norms before this one (``ema_norm``; from the second
  finite norm on); with groups, each clipped group's total against its own EMA;
* ``"spike"``, mode ``"zclip"``: a z-score ``(norm - mean) / (std + eps)`` above ``skip_z``, against
  ZClip's moving averages before this step (after the warm-up only).

The grads are clipped as without ``skip``, and a flagged norm still enters the statistics as any
finite norm does (so a lasting rise of the norm's level stops being flagged after some steps instead
of being skipped for ever). :meth:`Clipper.step` hands the flag to a fused torch optimizer, whose
kernel then leaves parameters and state unchanged (see :func:`fusedclip.optim.step_unless_flagged`).
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from . import engine, ops
from .backends import requested_backend
from .backends.base import ACC_DTYPE, CLIP_EPS, clip_coefficient, host_reads_are_free, total_from_accumulator
from .groups import GROUP_MODES, GROUP_OPTIONS, GroupSpec, adagc_rule, combine_norms, named_items, parse_groups
from .groups import threshold_coefficient as _coefficient
from .inputs import check_max_norm, no_grads_result
from .norm_type import NormKind, parse_norm_type
from .plan import check_writable, real_dtype

MODES = GROUP_MODES
SKIPS = (None, "nonfinite", "spike")
#: state tensors a state dict may lack (states saved before they existed, or without ``skip``) and
#: may hold although this Clipper lacks them (states saved with ``skip``, loaded without): 0-d counts
_OPTIONAL_STATE = frozenset({"skipped_steps"})
#: name fragments of final layers that AGC leaves alone (NFNets exclude the classifier)
_DEFAULT_AGC_EXCLUDE = ("head", "classifier", "lm_head")
#: AGC's unit-wise norms are L2 norms
_L2 = parse_norm_type(2.0)
#: the dtype a unit-wise norm is computed in (at least float32; complex stays complex)
_OPMATH = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}
#: how many layouts (sets of parameters that had grads) a Clipper keeps device index tensors for;
#: the least recently used is dropped first (grads appearing and vanishing in many patterns, MoE)
_LAYOUT_CACHE_SIZE = 64


def _cached(cache: OrderedDict[Any, Any], key: Any, build: Callable[[], Any]) -> Any:
    """``cache[key]``, built by ``build()`` when missing; an LRU of :data:`_LAYOUT_CACHE_SIZE` entries."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        while len(cache) > _LAYOUT_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _named(parameters: Tensor | Iterable[Any]) -> list[tuple[str, Tensor]]:
    """Accept a single tensor (as ``clip_grad_norm_`` does), ``named_parameters()`` pairs or bare
    parameters (named ``param0``, ``param1``...)."""
    named = named_items(parameters, "parameters")
    if not named:
        raise ValueError("Clipper needs at least one parameter")
    return named


def _unit_norms(tensor: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    """L2 norms of the rows (units) of ``tensor``, in at least float32 (a real dtype).

    Squares above ~1.8e19 overflow float32 where a unit's norm does not, and an inf norm would zero
    the unit's grad: on the CPU (where reading the result costs nothing) such norms are computed
    again in float64. On other devices they stay inf, as torch's own norms."""
    norms = torch.linalg.vector_norm(tensor, dim=dims, keepdim=True, dtype=_OPMATH.get(tensor.dtype, tensor.dtype))
    if norms.dtype != torch.float64 and host_reads_are_free(tensor.device) and not bool(torch.isfinite(norms).all()):
        wide = torch.complex128 if tensor.is_complex() else torch.float64
        norms = torch.linalg.vector_norm(tensor, dim=dims, keepdim=True, dtype=wide)
    return norms


def _saturate(value: Tensor) -> Tensor:
    """``value``, at most its dtype's largest finite value (NaN stays NaN)."""
    return torch.clamp(value, max=torch.finfo(value.dtype).max)


def _saturating_square(deviation: Tensor) -> Tensor:
    """``deviation ** 2``, saturated: the squared deviation of finite norms above ~1e154 (float64)
    would be inf, and an inf variance would switch ZClip's clipping off for good; saturated (here and
    in the averages built from it), it decays again with the moving average."""
    return _saturate(deviation * deviation)


def _agc_clip_(
    items: list[tuple[str, Tensor]],
    grads: list[Tensor],
    clipping: float,
    eps: float,
    exclude: tuple[str, ...],
    device: torch.device,
) -> Tensor:
    """AGC on these ``(name, parameter)`` items and their grads, in place; returns (0-d bool, on
    ``device``) whether any unit was clipped."""
    any_clipped = torch.zeros((), dtype=torch.bool, device=device)
    for (name, param), grad in zip(items, grads):
        if any(fragment in name for fragment in exclude):
            continue
        dims = tuple(range(1, grad.dim())) if grad.dim() > 1 else None
        weight_norm = _unit_norms(param.detach(), dims)
        grad_norm = _unit_norms(grad, dims)
        limit = weight_norm.clamp(min=eps) * clipping
        over = grad_norm > limit
        factor = torch.where(over, limit / grad_norm.clamp(min=1e-6), torch.ones_like(grad_norm))
        grad.mul_(factor)
        any_clipped |= over.any()
    return any_clipped


def _scale_each_(grads: list[Tensor], coefs: Tensor) -> None:
    """``grads[i] *= coefs[i]`` (float64 coefficients on the device; no host read), every product
    rounded once to its grad's dtype, as the kernel backends apply one coefficient (see
    :meth:`fusedclip.backends.base.Backend.scale_`).

    A float64 (complex128) grad is multiplied by its coefficient. A float32/bf16/fp16 (complex64)
    grad is multiplied by ``float32(coef)`` (torch's ``clip_grad_norm_`` result, one
    ``torch._foreach_mul_``) when that is the coefficient (0, inf, NaN or a normal float32), else by
    the exact coefficient: the product formed in float64, rounded to odd and then once to the grad's
    dtype, so that a coefficient below float32's normal range (huge grads, a tiny threshold) loses
    nothing. Which applies is decided on the device: both are computed and one selected
    (``torch.where``), in pieces of bounded size; this costs about a dozen float64 passes over such
    grads instead of one multiplication."""
    from .backends.torch_backend import _CPU_FLAT_DTYPES

    coefs = coefs.to(ACC_DTYPE)
    narrow = coefs.to(torch.float32)
    # the coefficients float32 cannot stand for: finite, non-zero and outside its normal range
    magnitude = coefs.abs()
    f32 = torch.finfo(torch.float32)
    needs = ((magnitude > 0) & (magnitude < f32.tiny)) | ((magnitude > f32.max) & (magnitude < math.inf))
    exact_every: list[tuple[Tensor, Tensor, Tensor]] = []  # (real view of a grad, its coefficient, need)
    plain, factors = [], []
    for k, grad in enumerate(grads):
        local = grad.to_local() if engine.is_dtensor(grad) else grad
        real = torch.view_as_real(local) if local.is_complex() else local
        if real.dtype in _CPU_FLAT_DTYPES:
            exact_every.append((real, coefs[k], needs[k]))
            continue
        factor = (coefs if real_dtype(grad.dtype) == torch.float64 else narrow)[k]
        plain.append(grad)
        factors.append(factor if factor.device == grad.device else factor.to(grad.device))
    if plain:
        torch._foreach_mul_(plain, factors)
    for real, coef, need in exact_every:
        _scale_exactly_or_narrow_(real, coef.to(real.device), need.to(real.device))


def _scale_exactly_or_narrow_(grad: Tensor, coef: Tensor, need: Tensor) -> None:
    """``grad *= coef`` for a float32/bf16/fp16 ``grad`` and a float64 0-d ``coef``: the exact
    product rounded once where the 0-d bool ``need`` holds, else
    ``grad * float32(coef)``; a contiguous grad in pieces, bounding the float64 temporaries."""
    from .backends.torch_backend import WIDE_PIECE_ELEMENTS, _scaled_exactly, _split_coef

    hi, lo = _split_coef(coef)
    narrow = coef.to(torch.float32)

    def scaled(x: Tensor) -> Tensor:
        return torch.where(need, _scaled_exactly(x, coef, hi, lo), x * narrow)

    if grad.numel() > WIDE_PIECE_ELEMENTS and grad.is_contiguous():
        for piece in grad.view(-1).split(WIDE_PIECE_ELEMENTS):
            piece.copy_(scaled(piece))
    else:
        grad.copy_(scaled(grad))


def _split_groups(parameters: Any) -> tuple[Any, bool]:
    """(``parameters``, materialised when an iterable, and whether it is a list of group dicts)."""
    if isinstance(parameters, Mapping):
        raise TypeError("parameters is a dict; a parameter group must be inside a list: Clipper([group, ...])")
    if isinstance(parameters, (Tensor, str, bytes)) or not isinstance(parameters, Iterable):
        return parameters, False  # _named accepts a tensor, and refuses the rest with its message
    items = list(parameters)
    dicts = [isinstance(item, Mapping) for item in items]
    if any(dicts) and not all(dicts):
        raise TypeError("parameters mixes parameter groups (dicts) with parameters; put every parameter in a group")
    return items, bool(items) and all(dicts)


def _check_group_options(spec: GroupSpec) -> None:
    """The ranges the Clipper checks for its own options, for a group's (types too: they come from
    a dict); normalises ``max_norm`` and ``agc_exclude``. Raises before any tensor is touched."""
    where = f"parameter group {spec.name!r}: "
    options = spec.options
    for key in sorted(GROUP_OPTIONS - {"agc_exclude", "max_norm"}):
        value = options[key]
        integral = key in ("history_size", "warmup_steps")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else numbers.Real):
            raise TypeError(f"{where}{key} must be {'an int' if integral else 'a number'}; got {value!r}")
    options["max_norm"] = float(check_max_norm(options["max_norm"]))
    exclude = options["agc_exclude"]
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
        raise TypeError(f"{where}agc_exclude must be an iterable of name fragments (str); got {exclude!r}")
    options["agc_exclude"] = tuple(exclude)
    if not all(isinstance(fragment, str) for fragment in options["agc_exclude"]):
        raise TypeError(f"{where}agc_exclude must hold str name fragments; got {options['agc_exclude']!r}")
    o = options
    checks = [
        (0.0 <= o["percentile"] <= 100.0, "percentile must be in [0, 100]"),
        (o["history_size"] >= 1 and o["warmup_steps"] >= 1, "history_size and warmup_steps must be >= 1"),
        (0.0 < o["alpha"] < 1.0 and 0.0 < o["ema_decay"] < 1.0, "alpha and ema_decay must lie strictly between 0 and 1"),
        (min(o["z_threshold"], o["agc_clipping"], o["agc_eps"]) > 0, "z_threshold, agc_clipping and agc_eps must be positive"),
        (math.isfinite(o["skip_factor"]) and o["skip_factor"] >= 1.0, "skip_factor must be finite and >= 1"),
        (math.isfinite(o["skip_z"]) and o["skip_z"] > 0, "skip_z must be finite and > 0"),
        (math.isfinite(o["adagc_lambda"]) and o["adagc_lambda"] >= 1.0, "adagc_lambda must be finite and >= 1"),
        (0.0 < o["adagc_beta"] < 1.0, "adagc_beta must lie strictly between 0 and 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(where + message)


class _ModeRules:
    """The adaptive rules and statistics shared by a :class:`Clipper` and each of its groups: they
    read the options (``max_norm``, ``percentile``...), ``mode``, ``steps`` and ``state`` of ``self``."""

    mode: str | None
    state: dict[str, Tensor]
    steps: int
    max_norm: float
    percentile: float
    history_size: int
    alpha: float
    z_threshold: float
    warmup_steps: int
    ema_decay: float
    skip_factor: float
    skip_z: float

    def _autoclip_threshold(self, total: Tensor) -> Tensor:
        """The percentile of the last ``history_size`` finite norms, this one included (NaN: none yet).

        The ring buffer advances only on finite norms: slot ``finite_steps % history_size``.
        """
        history = self.state["history"]
        finite = torch.isfinite(total)
        slot = torch.remainder(self.state["finite_steps"], self.history_size).to(torch.int64).reshape(1)
        kept = history.index_select(0, slot).reshape(())
        history.index_copy_(0, slot, torch.where(finite, total, kept).reshape(1))
        # finite_steps <= steps, so every filled slot lies below steps + 1; the rest are NaN
        seen = history[: min(self.steps + 1, self.history_size)]
        return torch.nanquantile(seen, self.percentile / 100.0)

    def _zclip_threshold(self, total: Tensor) -> Tensor:
        """ZClip's threshold for this norm; updates the warm-up buffer or the moving averages.

        The warm-up collects the first ``warmup_steps`` finite norms (threshold ``max_norm``
        meanwhile); the one that fills it sets mean and variance. Later finite norms update the
        averages; non-finite ones change nothing. All on the device, chosen by ``torch.where``.
        """
        state = self.state
        warmup, mean, var = state["warmup"], state["mean"], state["var"]
        count = state["finite_steps"]  # finite norms before this one
        finite = torch.isfinite(total)
        in_warmup = count < self.warmup_steps
        slot = count.clamp(max=self.warmup_steps - 1).to(torch.int64).reshape(1)
        kept = warmup.index_select(0, slot).reshape(())
        warmup.index_copy_(0, slot, torch.where(in_warmup & finite, total, kept).reshape(1))
        completes = in_warmup & finite & (count == self.warmup_steps - 1)
        warm_mean = warmup.mean()  # used only once the buffer is full (NaN before)
        warm_var = _saturate((_saturating_square(warmup - warm_mean) / warmup.numel()).sum())
        std = var.sqrt()
        z = (total - mean) / (std + CLIP_EPS)
        spike = z > self.z_threshold
        z_threshold = torch.where(spike, mean + (self.z_threshold**2 / z) * std, torch.full_like(total, math.inf))
        clipped = torch.minimum(total, z_threshold)
        new_mean = self.alpha * mean + (1 - self.alpha) * clipped
        new_var = _saturate(self.alpha * var + (1 - self.alpha) * _saturating_square(clipped - new_mean))
        updates = finite & ~in_warmup
        mean.copy_(torch.where(completes, warm_mean, torch.where(updates, new_mean, mean)))
        var.copy_(torch.where(completes, warm_var, torch.where(updates, new_var, var)))
        return torch.where(in_warmup, torch.full_like(total, self.max_norm), z_threshold)

    def _spike(self, total: Tensor) -> Tensor:
        """Whether ``total`` is a spike by the mode's rule (see the module docstring), against the
        statistics before this step; 0-d bool on the device."""
        state = self.state
        seen = state["finite_steps"]  # finite norms before this one
        if self.mode == "zclip":
            z = (total - state["mean"]) / (state["var"].sqrt() + CLIP_EPS)
            return (seen >= self.warmup_steps) & (z > self.skip_z)
        return (seen > 0) & (total > self.skip_factor * state["ema_norm"])

    def _record_statistics(self, total: Tensor, clipped: Tensor) -> None:
        """Last norm, its EMA over finite norms, and the step counts, for the unrounded float64
        ``total`` of this step; ``clipped``: 0-d bool, whether this step scaled anything down."""
        state = self.state
        finite = torch.isfinite(total)
        state["last_norm"].copy_(total)
        # the moving average starts at the first finite norm and skips non-finite ones
        ema = state["ema_norm"]
        moved = ema * self.ema_decay + total * (1 - self.ema_decay)
        ema.copy_(torch.where(finite, torch.where(state["finite_steps"] == 0, total, moved), ema))
        state["clipped_steps"].add_(clipped.to(ACC_DTYPE))
        state["nonfinite_steps"].add_((~finite).to(ACC_DTYPE))
        state["finite_steps"].add_(finite.to(ACC_DTYPE))


class _Group(_ModeRules):
    """One parameter group of a grouped :class:`Clipper`: its options, mode and device state."""

    def __init__(self, clipper: Clipper, spec: GroupSpec) -> None:
        self.clipper = clipper
        self.name = spec.name
        self.mode = spec.mode
        self.members = spec.members
        options = spec.options
        self.max_norm = float(options["max_norm"])
        self.percentile = float(options["percentile"])
        self.history_size = int(options["history_size"])
        self.alpha = float(options["alpha"])
        self.z_threshold = float(options["z_threshold"])
        self.warmup_steps = int(options["warmup_steps"])
        self.agc_clipping = float(options["agc_clipping"])
        self.agc_eps = float(options["agc_eps"])
        self.agc_exclude = tuple(options["agc_exclude"])
        self.adagc_lambda = float(options["adagc_lambda"])
        self.adagc_beta = float(options["adagc_beta"])
        self.ema_decay = float(options["ema_decay"])
        self.skip_factor = float(options["skip_factor"])
        self.skip_z = float(options["skip_z"])
        device = clipper.device
        nan = lambda *shape: torch.full(shape, math.nan, dtype=ACC_DTYPE, device=device)  # noqa: E731
        zeros = lambda *shape: torch.zeros(shape, dtype=ACC_DTYPE, device=device)  # noqa: E731
        self.state: dict[str, Tensor] = {
            "last_norm": zeros(),
            "ema_norm": zeros(),
            "clipped_steps": zeros(),
            "nonfinite_steps": zeros(),
            "finite_steps": zeros(),
            "threshold": nan(),  # NaN: no single threshold (yet, or ever: excluded, adagc after warm-up)
        }
        if self.mode == "autoclip":
            self.state["history"] = nan(self.history_size)
        if self.mode == "zclip":
            self.state["warmup"] = nan(self.warmup_steps)
            self.state["mean"] = zeros()
            self.state["var"] = zeros()
        if self.mode == "adagc":
            self.state["tensor_ema"] = nan(len(self.members))  # NaN: no finite non-zero norm seen yet

    @property
    def steps(self) -> int:  # type: ignore[override]
        """The Clipper's calls so far (a bound on the group's own finite norms)."""
        return self.clipper.steps

    def clip_(
        self, total: Tensor, norms: Tensor, slots: Tensor, items: list[tuple[str, Tensor]], grads: list[Tensor]
    ) -> Tensor:
        """Clip the group's present ``grads`` (``items``: their ``(name, parameter)``, ``slots``: their
        places among the group's members, ``norms``: their norms, ``total``: the group's norm, both
        before clipping) and record the statistics; returns whether anything was scaled down (0-d
        bool). Device work only."""
        state, mode = self.state, self.mode
        total, norms = total.to(self.clipper.device), norms.to(self.clipper.device)
        if mode is None:
            clipped = torch.zeros((), dtype=torch.bool, device=total.device)
        elif mode == "agc":
            clipped = _agc_clip_(items, grads, self.agc_clipping, self.agc_eps, self.agc_exclude, total.device)
            state["threshold"].fill_(self.agc_clipping)
        elif mode == "adagc":
            gamma_all = state["tensor_ema"]
            in_warmup = state["finite_steps"] < self.warmup_steps
            coefs, gamma = adagc_rule(
                norms, gamma_all.index_select(0, slots), total, in_warmup,
                max_norm=self.max_norm, lam=self.adagc_lambda, beta=self.adagc_beta,
            )  # fmt: skip
            gamma_all.index_copy_(0, slots, gamma)
            threshold = state["threshold"]  # max_norm in the warm-up; afterwards per tensor (NaN here)
            warm, after = torch.full_like(threshold, self.max_norm), torch.full_like(threshold, math.nan)
            threshold.copy_(torch.where(in_warmup, warm, after))
            _scale_each_(grads, coefs)
            clipped = (coefs < 1).any()
        else:
            if mode == "norm":
                state["threshold"].fill_(self.max_norm)
                coef = clip_coefficient(total, self.max_norm)
            else:
                threshold = self._autoclip_threshold(total) if mode == "autoclip" else self._zclip_threshold(total)
                state["threshold"].copy_(threshold)
                coef = _coefficient(total, threshold)
            self.clipper._scale_(grads, coef)
            clipped = coef < 1
        self._record_statistics(total, clipped)
        return clipped


class Clipper(_ModeRules):
    """Stateful gradient clipping with on-device statistics; see the module docstring for modes.

    Args:
        parameters: ``model.named_parameters()`` (names are used for ``agc_exclude`` and the top-k
            report), an iterable of parameters, or a single tensor; or a list of parameter groups,
            dicts with ``"params"`` (any of the former), an optional ``"name"``, ``"mode"`` (None:
            not clipped) and the options below that the group's mode reads (see
            :mod:`fusedclip.groups`); the keyword arguments are then the groups' defaults.
        mode: ``"norm"``, ``"autoclip"``, ``"zclip"``, ``"agc"`` or ``"adagc"`` (with groups, also
            None: groups that set no mode are not clipped).
        max_norm: the threshold of ``"norm"``; the cap during the warm-up of ``"zclip"`` and ``"adagc"``.
        norm_type: the norm's order (all modes but ``"agc"``, which uses unit-wise L2 norms).
        percentile, history_size: AutoClip's percentile (0-100) and how many norms it remembers.
        alpha, z_threshold, warmup_steps: ZClip's EMA factor, z-score threshold and warm-up length
            (the warm-up length of ``"adagc"`` too).
        agc_clipping, agc_eps, agc_exclude: AGC's lambda, epsilon and excluded name fragments.
        adagc_lambda, adagc_beta: AdaGC's relative threshold (>= 1) and EMA factor.
        ema_decay: decay of the reported EMA of the total norm.
        top_k: how many parameters ``summary()`` lists by gradient norm.
        backend: the fusedclip backend (None: automatic).
        skip, skip_factor, skip_z: which steps to flag in :attr:`found_inf` for skipping (None: none,
            ``"nonfinite"``, ``"spike"``; the rule is in the module docstring), the factor over the
            EMA norm and the z-score above which ``"spike"`` flags a step.
    """

    def __init__(
        self,
        parameters: Tensor | Iterable[Any],
        mode: str | None = "norm",
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
        adagc_lambda: float = 1.05,
        adagc_beta: float = 0.98,
        ema_decay: float = 0.99,
        top_k: int = 5,
        backend: str | None = None,
        skip: str | None = None,
        skip_factor: float = 10.0,
        skip_z: float = 6.0,
    ) -> None:
        items, grouped = _split_groups(parameters)
        if mode not in MODES and not (grouped and mode is None):
            raise ValueError(f"unknown Clipper mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100]; got {percentile}")
        if history_size < 1 or warmup_steps < 1 or top_k < 0:
            raise ValueError("history_size and warmup_steps must be >= 1 and top_k >= 0")
        if not (0.0 < alpha < 1.0 and 0.0 < ema_decay < 1.0):
            raise ValueError("alpha and ema_decay must lie strictly between 0 and 1")
        if z_threshold <= 0 or agc_clipping <= 0 or agc_eps <= 0:
            raise ValueError("z_threshold, agc_clipping and agc_eps must be positive")
        if skip not in SKIPS:
            raise ValueError(f"unknown skip {skip!r}; choose one of {SKIPS}")
        if not (math.isfinite(skip_factor) and skip_factor >= 1.0 and math.isfinite(skip_z) and skip_z > 0):
            raise ValueError(f"skip_factor must be finite and >= 1, skip_z finite and > 0; got {skip_factor}, {skip_z}")
        if not (math.isfinite(adagc_lambda) and adagc_lambda >= 1.0 and 0.0 < adagc_beta < 1.0):
            raise ValueError(f"adagc_lambda must be finite and >= 1, adagc_beta in (0, 1); got {adagc_lambda}, {adagc_beta}")
        agc_exclude = tuple(agc_exclude)  # an iterator would serve only its first reader
        defaults = dict(
            mode=mode, max_norm=max_norm, percentile=percentile, history_size=history_size, alpha=alpha,
            z_threshold=z_threshold, warmup_steps=warmup_steps, agc_clipping=agc_clipping, agc_eps=agc_eps,
            agc_exclude=agc_exclude, adagc_lambda=adagc_lambda, adagc_beta=adagc_beta, ema_decay=ema_decay,
            skip_factor=skip_factor, skip_z=skip_z,
        )  # fmt: skip
        specs: list[GroupSpec] | None = None
        if grouped:
            self.named, specs = parse_groups(items, defaults)
        else:
            self.named = _named(items)
            if mode == "adagc":  # per-tensor coefficients: the group machinery, one group of everything
                specs = [GroupSpec("all", mode, tuple(range(len(self.named))), {k: defaults[k] for k in GROUP_OPTIONS})]
        for spec in specs or ():
            _check_group_options(spec)
        self.mode = "groups" if grouped else mode
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
        self.adagc_lambda = float(adagc_lambda)
        self.adagc_beta = float(adagc_beta)
        self.ema_decay = float(ema_decay)
        self.top_k = int(top_k)
        self.backend = backend
        self.skip = skip
        self.skip_factor = float(skip_factor)
        self.skip_z = float(skip_z)
        self.steps = 0
        self.device = self.named[0][1].device
        zeros = lambda *shape: torch.zeros(shape, dtype=ACC_DTYPE, device=self.device)  # noqa: E731
        # statistics and adaptive state: device tensors only
        self.state: dict[str, Tensor] = {
            "last_norm": zeros(),
            "ema_norm": zeros(),
            "clipped_steps": zeros(),
            "nonfinite_steps": zeros(),
            "finite_steps": zeros(),  # norms that enter the statistics
            "param_norms": zeros(len(self.named)),
            "threshold": torch.full((), math.nan, dtype=ACC_DTYPE, device=self.device),
        }
        if mode == "autoclip":
            self.state["history"] = torch.full((self.history_size,), math.nan, dtype=ACC_DTYPE, device=self.device)
        if mode == "zclip":
            self.state["warmup"] = torch.full((self.warmup_steps,), math.nan, dtype=ACC_DTYPE, device=self.device)
            self.state["mean"] = zeros()
            self.state["var"] = zeros()
        if skip is not None:
            self.state["skipped_steps"] = zeros()
        #: the parameter groups (None: the whole Clipper is one group of its mode, as before groups)
        self.groups: list[_Group] | None = None
        if specs is not None:
            if self.norm.kind is NormKind.COUNT and any(spec.mode == "adagc" for spec in specs):
                raise ValueError("mode 'adagc' needs a norm that scales with the grads; norm_type=0 counts non-zero tensors")
            self.groups = [_Group(self, spec) for spec in specs]
            # the groups' state, in the Clipper's (state_dict and load_state_dict see one flat dict)
            for k, group in enumerate(self.groups):
                self.state.update({f"groups.{k}.{key}": value for key, value in group.state.items()})
            # parameter index -> (group, place among the group's members)
            self._member_of = {
                i: (g, slot) for g, group in enumerate(self.groups) for slot, i in enumerate(group.members)
            }
            self._layouts: OrderedDict[tuple[int, ...], list[tuple[Tensor, Tensor, list[int]] | None]] = OrderedDict()
        #: 1.0 when the latest call flagged its step for skipping (always 0.0 without ``skip``); the
        #: same tensor every step, as ``found_inf`` of a fused optimizer (see :meth:`step`)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
        self._flag_fresh = False  # a call since the last step()
        #: positions of the grads of a call -> their int64 index tensor on the device (LRU)
        self._index_cache: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()

    # -- one step ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self) -> Tensor:
        """Clip the current grads once; returns the total norm before clipping (no host sync)."""
        positions = tuple(i for i, (_, p) in enumerate(self.named) if p.grad is not None)
        grads = [self.named[i][1].grad for i in positions]
        if not grads:
            self.steps += 1
            self.found_inf.zero_()  # nothing to skip: the optimizer has nothing to update
            self._flag_fresh = True
            return no_grads_result()  # as clip_grad_norm_ without grads
        call = ops.prepare(grads, requested_backend(self.backend))
        # every mode: an unwritable grad refuses the call before any statistic, threshold, flag or
        # grad changes (the thresholds update before the scale pass, the groups scale in several)
        _check_writable(call)
        self._flag_fresh = True
        if self.groups is not None:
            result = self._grouped_step(call, positions, grads)
            self.steps += 1
            return result.total
        if self.mode == "agc":
            result, per_tensor, any_clipped = self._agc_step(call, positions, grads)
            coef = torch.where(any_clipped, 0.0, 1.0).to(ACC_DTYPE)  # counts as clipped when any unit was
            self.state["threshold"].fill_(self.agc_clipping)
            exact_total = total_from_accumulator(result.acc, _L2)
            self._flag(exact_total)
        else:
            result, per_tensor, coef, exact_total = self._norm_step(call)
        self._record(exact_total, per_tensor, positions, coef)
        self.steps += 1
        # the norm pass rounds the total to the grads' promoted real dtype, as clip_grad_norm_ does
        return result.total

    def _grouped_step(self, call: ops.Call, positions: tuple[int, ...], grads: list[Tensor]) -> Any:
        """One norm pass over every grad (with per-tensor norms), each group's total combined from
        its tensors' norms on the device, the skip flag from all of them, then each group clipped by
        its mode. Returns the norm pass result (its total: over all grads)."""
        result, per_tensor = ops.total_norm(call, self.norm, per_tensor=True)
        total = total_from_accumulator(result.acc, self.norm, result.scale)
        present = []
        for group, layout in zip(self.groups, self._layout(positions, per_tensor.device)):  # type: ignore[arg-type]
            if layout is None:
                continue  # no grad in this group this step: its state stays as it is
            rows, slots, local = layout
            norms = per_tensor.index_select(0, rows)
            present.append((group, combine_norms(norms, self.norm), norms, slots, local))
        self._flag_groups(total, [(group, group_total) for group, group_total, *_ in present])
        any_clipped = torch.zeros((), dtype=torch.bool, device=self.device)
        for group, group_total, norms, slots, local in present:
            items = [self.named[positions[j]] for j in local]
            clipped = group.clip_(group_total, norms, slots, items, [grads[j] for j in local])
            any_clipped = any_clipped | clipped
        self._record(total, per_tensor, positions, torch.where(any_clipped, 0.0, 1.0).to(ACC_DTYPE))
        return result

    def _layout(self, positions: tuple[int, ...], device: torch.device) -> list[tuple[Tensor, Tensor, list[int]] | None]:
        """Per group, for these grads: (rows of its grads in the per-tensor norms, int64 on ``device``,
        the norms' device; their places among the group's members, int64 on the Clipper's device, where
        the group's state lives; their indices in ``grads``), None without grads. Cached per set of
        positions (a handful: which parameters have grads)."""

        def build() -> list[tuple[Tensor, Tensor, list[int]] | None]:
            rows: list[list[int]] = [[] for _ in self.groups]  # type: ignore[union-attr]
            slots: list[list[int]] = [[] for _ in self.groups]  # type: ignore[union-attr]
            for j, i in enumerate(positions):
                g, slot = self._member_of[i]
                rows[g].append(j)
                slots[g].append(slot)
            return [
                (
                    torch.tensor(r, dtype=torch.int64, device=device),
                    torch.tensor(s, dtype=torch.int64, device=self.device),
                    r,
                )
                if r
                else None
                for r, s in zip(rows, slots)
            ]

        return _cached(self._layouts, positions, build)

    def _flag_groups(self, total: Tensor, totals: list[tuple[_Group, Tensor]]) -> None:
        """:meth:`_flag` for a grouped step: the total over all grads or any group's total non-finite
        (excluded groups included), or, with ``"spike"``, a clipped group's spike by its mode's rule
        against its statistics before this step. Device work only."""
        if self.skip is None:
            return
        flag = ~torch.isfinite(total.to(self.device))
        for group, group_total in totals:
            group_total = group_total.to(self.device)
            flag = flag | ~torch.isfinite(group_total)
            if self.skip == "spike" and group.mode is not None:
                flag = flag | group._spike(group_total)
        self.found_inf.copy_(flag)
        self.state["skipped_steps"].add_(flag.to(ACC_DTYPE))

    def _scale_(self, grads: list[Tensor], coef: Tensor) -> None:
        """Multiply these grads by the 0-d ``coef`` in one engine scale call."""
        ops.scale_(ops.prepare(grads, requested_backend(self.backend)), coef)

    def _norm_step(self, call: ops.Call) -> tuple[Any, Tensor, Tensor, Tensor]:
        """(norm pass result, per-tensor norms, coefficient applied, unrounded float64 total)."""
        fixed = self.max_norm if self.mode == "norm" else None
        result, per_tensor = ops.total_norm(call, self.norm, fixed, per_tensor=True)
        total = total_from_accumulator(result.acc, self.norm, result.scale)
        self._flag(total)  # before the thresholds update the statistics it reads
        if self.mode == "norm":
            coef = result.coef
            self.state["threshold"].fill_(self.max_norm)
        else:
            threshold = self._autoclip_threshold(total) if self.mode == "autoclip" else self._zclip_threshold(total)
            self.state["threshold"].copy_(threshold)
            coef = _coefficient(total, threshold)
        ops.scale_(call, coef)
        return result, per_tensor, coef, total

    def _flag(self, total: Tensor) -> None:
        """Set :attr:`found_inf` for this step's unrounded total norm and count it; reads the
        statistics as they were before this step. Device work only."""
        if self.skip is None:
            return
        flag = ~torch.isfinite(total)
        if self.skip == "spike":
            flag |= self._spike(total)
        self.found_inf.copy_(flag)
        self.state["skipped_steps"].add_(flag.to(ACC_DTYPE))

    def step(self, optimizer: torch.optim.Optimizer, *, sync: bool = False) -> Any:
        """``optimizer.step()``, skipped when the latest call flagged its step (:attr:`found_inf`).

        A torch optimizer built with ``fused=True`` (Adam, AdamW, SGD, Adagrad) gets the flag as
        its ``found_inf`` and skips inside its kernel: parameters and state stay as they were, no
        host sync. Any other optimizer has no such input (zeroing grads is no skip: Adam's moments
        and step count would still move), so it needs ``sync=True``: the flag is read on the host
        (one sync) and ``step()`` is called only when it is 0. Not for use with a ``GradScaler``
        (whose ``step`` sets ``found_inf`` itself). Call the Clipper once before every ``step``.
        """
        from .optim import step_unless_flagged

        if not self._flag_fresh:
            raise RuntimeError("Clipper.step(optimizer) needs a Clipper call (clipper()) since the last step")
        self._flag_fresh = False
        return step_unless_flagged(optimizer, self.found_inf, sync=sync)

    def _agc_step(self, call: ops.Call, positions: tuple[int, ...], grads: list[Tensor]) -> tuple[Any, Tensor, Tensor]:
        """Unit-wise clipping; returns the norm pass result and per-tensor L2 norms of the grads
        before clipping, and whether any unit was clipped."""
        result, per_tensor = ops.total_norm(call, _L2, per_tensor=True)
        items = [self.named[i] for i in positions]
        any_clipped = _agc_clip_(items, grads, self.agc_clipping, self.agc_eps, self.agc_exclude, self.device)
        return result, per_tensor, any_clipped

    def _record(self, total: Tensor, per_tensor: Tensor, positions: tuple[int, ...], coef: Tensor) -> None:
        """Statistics of this step; ``total`` is the unrounded float64 norm."""
        self._record_statistics(total, coef < 1)
        state = self.state
        index = _cached(self._index_cache, positions, lambda: torch.tensor(positions, dtype=torch.int64, device=self.device))
        state["param_norms"].zero_().index_copy_(0, index, per_tensor.to(self.device))

    # -- reading and checkpointing -----------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Plain numbers for loggers (TensorBoard, W&B); the only call that synchronises."""
        state = self.state
        steps = max(self.steps, 1)
        k = min(self.top_k, len(self.named))
        values, indices = torch.topk(torch.nan_to_num(state["param_norms"], nan=math.inf), k)
        summary = {
            "mode": self.mode,
            "steps": self.steps,
            "last_norm": float(state["last_norm"]),
            "ema_norm": float(state["ema_norm"]),
            "threshold": float(state["threshold"]),
            "clipped_fraction": float(state["clipped_steps"]) / steps,
            "nonfinite_steps": int(state["nonfinite_steps"]),
            "skipped_steps": int(state["skipped_steps"]) if "skipped_steps" in state else 0,
            "top_params": [(self.named[i][0], float(v)) for v, i in zip(values.tolist(), indices.tolist())],
        }
        if self.groups is not None:
            # per group: its norm's statistics; clipped_fraction counts over all the Clipper's calls
            summary["groups"] = {
                group.name: {
                    "mode": group.mode,
                    "last_norm": float(group.state["last_norm"]),
                    "ema_norm": float(group.state["ema_norm"]),
                    "threshold": float(group.state["threshold"]),
                    "clipped_fraction": float(group.state["clipped_steps"]) / steps,
                    "nonfinite_steps": int(group.state["nonfinite_steps"]),
                }
                for group in self.groups
            }
        return summary

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically after a restart (tensors are cloned)."""
        state = {"mode": self.mode, "steps": self.steps, "tensors": {k: v.clone() for k, v in self.state.items()}}
        if self.groups is not None:
            state["groups"] = self._group_layout()
        return state

    def _group_layout(self) -> list[dict[str, Any]]:
        """What a grouped state must match: each group's name, mode and number of parameters."""
        return [{"name": g.name, "mode": g.mode, "params": len(g.members)} for g in self.groups or ()]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`. The whole state is checked first (keys, mode, step
        count, every tensor's type, shape, dtype, device and values); a refused state raises
        ``TypeError``/``ValueError`` and changes nothing. ``skipped_steps`` may be missing (a state
        saved without ``skip``: counted from 0) or present although this Clipper does not skip
        (checked, then dropped)."""
        steps, tensors = self._checked_state(state_dict)
        # nothing below can fail: same shapes, dtypes and devices
        for key, value in tensors.items():
            self.state[key].copy_(value)
        self.steps = steps

    def _checked_state(self, state_dict: Any) -> tuple[int, dict[str, Tensor]]:
        """(step count, tensors as float64 on this Clipper's device) of a valid state; raises otherwise."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping (from Clipper.state_dict()); got {type(state_dict).__name__}")
        _check_keys("state_dict", state_dict, {"mode", "steps", "tensors"} | ({"groups"} if self.groups is not None else set()))
        mode = state_dict["mode"]
        if mode != self.mode:
            raise ValueError(f"state is for mode {mode!r}, this Clipper is {self.mode!r}")
        if self.groups is not None and state_dict["groups"] != self._group_layout():
            raise ValueError(
                f"state is for the parameter groups {state_dict['groups']!r}, this Clipper has {self._group_layout()!r}"
            )
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"state_dict['steps'] must be an int; got {type(steps).__name__}")
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"state_dict['steps'] must be >= 0; got {steps}")
        tensors = state_dict["tensors"]
        if not isinstance(tensors, Mapping):
            raise TypeError(f"state_dict['tensors'] must be a mapping; got {type(tensors).__name__}")
        _check_keys("state_dict['tensors']", tensors, set(self.state), _OPTIONAL_STATE)
        values: dict[str, Tensor] = {}
        expected_shapes = {key: value.shape for key, value in self.state.items()}
        expected_shapes.update({key: torch.Size(()) for key in _OPTIONAL_STATE})
        for key, shape in expected_shapes.items():
            if key not in tensors:
                continue  # an optional count this state does not hold: 0
            value = tensors[key]
            what = f"state tensor {key!r}"
            if not isinstance(value, Tensor):
                raise TypeError(f"{what} must be a Tensor; got {type(value).__name__}")
            if value.layout != torch.strided or value.is_meta or value.is_complex() or not value.is_floating_point():
                raise TypeError(
                    f"{what} must be a dense real floating-point tensor with data; got dtype {value.dtype},"
                    f" layout {value.layout}, device {value.device}"
                )
            if value.shape != shape:
                raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
            values[key] = value.detach().to(device="cpu", dtype=ACC_DTYPE, copy=True)
        self._check_values(steps, values)
        for key in _OPTIONAL_STATE & set(self.state):
            values.setdefault(key, torch.zeros((), dtype=ACC_DTYPE, device="cpu"))
        return steps, {key: value.to(self.device) for key, value in values.items() if key in self.state}

    def _check_values(self, steps: int, values: dict[str, Tensor]) -> None:
        """Values a run of this Clipper can produce (float64 CPU copies; a load may synchronise)."""
        if self.groups is None:
            _check_statistics(steps, values, "", self.history_size, self.warmup_steps)
            return
        _check_statistics(steps, {k: v for k, v in values.items() if not k.startswith("groups.")}, "", 1, 1)
        for k, group in enumerate(self.groups):
            prefix = f"groups.{k}."
            own = {key[len(prefix) :]: v for key, v in values.items() if key.startswith(prefix)}
            _check_statistics(steps, own, prefix, group.history_size, group.warmup_steps)


def _check_writable(call: ops.Call) -> None:
    """Refuse (``RuntimeError``) a call with a grad that cannot be written in place, before anything
    of the Clipper changes: one rule for every mode. A traced call (``torch.compile``) is checked
    where its custom op runs."""
    if isinstance(call, engine.PreparedCall):
        check_writable(work for _, work in call.works)


def _check_statistics(steps: int, values: dict[str, Tensor], prefix: str, history_size: int, warmup_steps: int) -> None:
    """The checks of :meth:`Clipper._check_values` on one set of statistics (the Clipper's, or one
    group's, whose keys lack their ``prefix``; messages name the full key)."""

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    def nonneg_or_nan(key: str) -> None:  # norms as observed: >= 0, +inf or NaN
        v = values[key]
        require(bool((torch.isnan(v) | (v >= 0)).all()), f"state tensor {prefix + key!r} holds a negative norm")

    counts = {}
    for key in ("clipped_steps", "nonfinite_steps", "finite_steps", *sorted(_OPTIONAL_STATE & set(values))):
        v = float(values[key])
        require(math.isfinite(v) and v >= 0 and v == int(v), f"state tensor {prefix + key!r} must hold a count >= 0; got {v}")
        require(v <= steps, f"state tensor {prefix + key!r} counts {v:g} steps, more than the {steps} steps taken")
        counts[key] = int(v)
    require(
        counts["finite_steps"] + counts["nonfinite_steps"] <= steps,
        f"{prefix}finite_steps + {prefix}nonfinite_steps ({counts['finite_steps']} + {counts['nonfinite_steps']})"
        f" exceed steps ({steps})",
    )
    for key in ("last_norm", "param_norms", "threshold", "tensor_ema"):
        if key in values:
            nonneg_or_nan(key)
    ema = float(values["ema_norm"])
    require(math.isfinite(ema) and ema >= 0, f"state tensor {prefix + 'ema_norm'!r} must be finite and >= 0; got {ema}")
    buffers = {"history": history_size, "warmup": warmup_steps}
    for key, size in buffers.items():
        if key not in values:
            continue
        v = values[key]
        filled = min(counts["finite_steps"], size)  # slots filled so far, from the first
        require(
            bool(torch.isfinite(v[:filled]).all() and (v[:filled] >= 0).all() and torch.isnan(v[filled:]).all()),
            f"state tensor {prefix + key!r} must hold {filled} finite norms >= 0 (one per finite step so far, up to {size})"
            f" followed by NaN",
        )
    for key in ("mean", "var"):
        if key in values:
            v = float(values[key])
            require(math.isfinite(v) and v >= 0, f"state tensor {prefix + key!r} must be finite and >= 0; got {v}")


def _check_keys(what: str, mapping: Mapping[str, Any], expected: set[str], optional: Iterable[str] = ()) -> None:
    """``mapping``'s keys are ``expected``, give or take the ``optional`` ones."""
    keys = set(mapping)
    optional = set(optional)
    missing, unexpected = sorted(map(str, expected - optional - keys)), sorted(map(str, keys - expected - optional))
    if missing or unexpected:
        raise ValueError(f"{what} has missing keys {missing} and unexpected keys {unexpected}; expected {sorted(expected)}")
