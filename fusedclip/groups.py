"""Parameter groups of a :class:`~fusedclip.Clipper`: parsing and validation, group totals from
per-tensor norms, and AdaGC's per-tensor rule.

A grouped Clipper is built from a list of dicts, like an optimizer's ``param_groups``::

    Clipper([
        {"params": adamw_params, "mode": "zclip"},
        {"params": muon_matrices, "mode": None},            # excluded: never clipped
        {"params": embeddings, "mode": "adagc", "adagc_lambda": 1.1},
    ], max_norm=1.0)

Everything here runs on the host before the first step (:func:`parse_groups`) or is plain device
arithmetic without a host synchronisation (:func:`combine_norms`, :func:`adagc_rule`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .backends.base import clip_coefficient, scaled_root, usable_norm_scale
from .norm_type import NormKind, NormSpec

#: modes a group may have; ``None`` excludes the group from clipping
GROUP_MODES = ("norm", "autoclip", "zclip", "agc", "adagc")
#: the options each mode reads (a group that sets another one is refused: a likely mistake)
MODE_OPTIONS: dict[str | None, frozenset[str]] = {
    "norm": frozenset({"max_norm", "skip_factor"}),
    "autoclip": frozenset({"percentile", "history_size", "skip_factor"}),
    "zclip": frozenset({"max_norm", "alpha", "z_threshold", "warmup_steps", "skip_z"}),
    "agc": frozenset({"agc_clipping", "agc_eps", "agc_exclude", "skip_factor"}),
    "adagc": frozenset({"max_norm", "warmup_steps", "adagc_lambda", "adagc_beta", "skip_factor"}),
    None: frozenset(),
}
#: what every group may set, clipped or not
COMMON_KEYS = frozenset({"params", "name", "mode", "ema_decay"})
#: every per-group option (the Clipper's keyword arguments of the same names are the defaults)
GROUP_OPTIONS = frozenset().union(*MODE_OPTIONS.values()) | {"ema_decay"}
#: options of the whole Clipper: one norm pass (one norm type, one backend), one flag, one report
CLIPPER_WIDE = {
    "norm_type": "all groups share the one norm pass over every grad, hence one norm type",
    "backend": "all groups share the one norm pass over every grad, hence one backend",
    "skip": "skipping is decided for the whole step (any group can flag it)",
    "top_k": "the top-k report covers all parameters",
}


@dataclass
class GroupSpec:
    """One validated group: its name, mode (None: excluded), members (indices into the Clipper's
    flat parameter list) and every option (the group's own, else the Clipper's default)."""

    name: str
    mode: str | None
    members: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)


def named_items(params: Any, what: str, start: int = 0) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs of ``params`` (called ``what`` in messages): a Tensor (as
    ``clip_grad_norm_`` takes), or an iterable of Tensors or of ``(name, Tensor)`` pairs
    (``model.named_parameters()``); unnamed ones are called ``param<k>``, k counting from ``start``."""
    if isinstance(params, Tensor):
        params = [params]  # iterating a tensor would yield its rows
    elif isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise TypeError(
            f"{what} must be a Tensor, an iterable of Tensors or of (name, Tensor) pairs"
            f" (model.named_parameters()); got {type(params).__name__}"
        )
    named = []
    for index, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            named.append((str(item[0]), item[1]))
        elif isinstance(item, Tensor):
            named.append((f"param{start + len(named)}", item))
        else:
            raise TypeError(f"{what}[{index}] is a {type(item).__name__}; expected a Tensor or a (name, Tensor) pair")
    return named


def parse_groups(
    groups: list[Any], defaults: Mapping[str, Any]
) -> tuple[list[tuple[str, Tensor]], list[GroupSpec]]:
    """The flat ``(name, parameter)`` list and the groups, after checking every group: a mapping with
    non-empty ``params``, only known keys (per-group options that the group's mode reads; options of
    the whole Clipper are refused with the reason), a known mode, no option set on an excluded group
    but ``ema_decay``, no parameter twice (in one group or two), distinct names.

    ``defaults``: the Clipper's value of every option in :data:`GROUP_OPTIONS` plus ``mode``. Values
    are not range-checked here (the Clipper checks each group's options as it checks its own).
    Raises ``TypeError``/``ValueError``; touches no tensor.
    """
    named: list[tuple[str, Tensor]] = []
    specs: list[GroupSpec] = []
    owner: dict[int, tuple[str, str]] = {}  # id(parameter) -> (group name, parameter name)
    names: set[str] = set()
    for k, group in enumerate(groups):
        where = f"parameter group {k}"
        if not isinstance(group, Mapping):
            raise TypeError(f"{where} is a {type(group).__name__}; every group must be a dict with 'params'")
        keys = set(map(str, group))
        for key in sorted(keys & set(CLIPPER_WIDE)):
            raise ValueError(
                f"{where} sets {key!r}, an option of the whole Clipper ({CLIPPER_WIDE[key]}); pass it to Clipper(...)"
            )
        unknown = sorted(keys - COMMON_KEYS - GROUP_OPTIONS)
        if unknown:
            raise ValueError(
                f"{where} has unknown keys {unknown}; a group takes 'params', 'name', 'mode' and the options"
                f" {sorted(GROUP_OPTIONS)}"
            )
        if "params" not in group:
            raise ValueError(f"{where} has no 'params'")
        name = group.get("name", f"group{k}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: 'name' must be a non-empty str; got {name!r}")
        if name in names:
            raise ValueError(f"two parameter groups are named {name!r}; group names must be distinct")
        names.add(name)
        where = f"parameter group {name!r}"
        mode = group.get("mode", defaults["mode"])
        if mode is not None and (not isinstance(mode, str) or mode not in GROUP_MODES):
            raise ValueError(
                f"{where} has unknown mode {mode!r}; choose one of {', '.join(GROUP_MODES)} or None (not clipped)"
            )
        options = sorted(keys - COMMON_KEYS)
        unused = [key for key in options if key not in MODE_OPTIONS[mode]]
        if unused and mode is None:
            raise ValueError(
                f"{where} is excluded from clipping (mode=None) but sets {unused}; an excluded group takes no"
                " thresholds (only 'params', 'name', 'mode' and 'ema_decay' for its statistics)"
            )
        if unused:
            raise ValueError(
                f"{where} (mode {mode!r}) sets {unused}, which mode {mode!r} does not use; its options are"
                f" {sorted(MODE_OPTIONS[mode] | {'ema_decay'})}"
            )
        members = named_items(group["params"], f"{where}['params']", len(named))
        if not members:
            raise ValueError(f"{where} has no parameters; drop the group or give it some")
        indices = []
        for param_name, param in members:
            seen = owner.get(id(param))
            if seen is not None:
                other = "the same group" if seen[0] == name else f"group {seen[0]!r}"
                raise ValueError(
                    f"parameter {param_name!r} of {where} is already in {other} (as {seen[1]!r}); a parameter may"
                    " belong to one group only, once"
                )
            owner[id(param)] = (name, param_name)
            indices.append(len(named))
            named.append((param_name, param))
        values = {key: group.get(key, defaults[key]) for key in GROUP_OPTIONS}
        specs.append(GroupSpec(name, mode, tuple(indices), values))
    if not specs:
        raise ValueError("Clipper needs at least one parameter group")
    return named, specs


def combine_norms(norms: Tensor, norm: NormSpec) -> Tensor:
    """The ``norm``-norm of the tensors whose own norms are ``norms`` (1-d float64, not empty): the
    p-norm of the per-tensor norms, as torch's ``clip_grad_norm_`` forms its total from them.

    p = inf: the max; -inf: the min; 0: how many are non-zero (per-tensor "norms" are counts); 1, 2:
    sum and root of the sum of squares; any other p relative to the max (min for p < 0) norm, as the
    engine does for grads, so that nothing overflows or underflows. NaN propagates. Device ops only.
    """
    if norm.kind is NormKind.MAX:
        return norms.amax()
    if norm.kind is NormKind.MIN:
        return norms.amin()
    if norm.kind is NormKind.COUNT:
        return (norms != 0).sum().to(norms.dtype)
    if norm.p == 1.0:
        return norms.sum()
    if norm.p == 2.0:
        return (norms * norms).sum().sqrt()
    scale = usable_norm_scale(norms.amax() if norm.p > 0 else norms.amin())
    return scaled_root((norms / scale).pow(norm.p).sum(), norm.p, scale)


def threshold_coefficient(total: Tensor, threshold: Tensor | float) -> Tensor:
    """torch's coefficient ``min(threshold / (total + 1e-6), 1)``; a NaN threshold (none yet) means
    no cap, a +inf total gives 0 and a NaN total NaN, as with a fixed threshold."""
    if isinstance(threshold, Tensor):
        threshold = torch.nan_to_num(threshold, nan=math.inf)
    coef = clip_coefficient(total, threshold)
    return torch.where(torch.isposinf(total), torch.zeros_like(coef), coef)


def adagc_rule(
    norms: Tensor,
    gamma: Tensor,
    group_total: Tensor,
    in_warmup: Tensor,
    *,
    max_norm: float,
    lam: float,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """AdaGC (Wang et al., 2025, arXiv 2502.11034) for one step of a group: ``(coefficients, new gamma)``.

    ``norms``: the tensors' norms before clipping; ``gamma``: their EMAs (NaN: none yet);
    ``group_total``: the group's norm; ``in_warmup``: 0-d bool. The rule, per tensor ``i``:

    * warm-up: every tensor gets the group's coefficient ``h = min(max_norm / (total + 1e-6), 1)``
      (global clipping at ``max_norm``, the paper's lambda_abs) and ``gamma_i = min(gamma_i, h n_i)``;
    * afterwards: ``h_i = min(lam * gamma_i / (n_i + 1e-6), 1)`` (no cap while ``gamma_i`` is NaN) and
      ``gamma_i = beta * gamma_i + (1 - beta) * h_i n_i`` (the first observation sets ``gamma_i = h_i n_i``).

    Only finite, non-zero norms update ``gamma_i`` (in the warm-up only when the group's total is
    finite too): a non-finite norm is no observation, and a zero one (a tensor that got no gradient
    signal) would pin the warm-up minimum, and with it the tensor's threshold, at 0 for good.
    """
    warm = threshold_coefficient(group_total, max_norm).expand_as(norms)
    relative = threshold_coefficient(norms, lam * gamma)
    coef = torch.where(in_warmup, warm, relative)
    clipped = coef * norms
    unseen = torch.isnan(gamma)
    warm_gamma = torch.where(unseen, clipped, torch.minimum(gamma, clipped))
    ema_gamma = torch.where(unseen, clipped, beta * gamma + (1 - beta) * clipped)
    observed = torch.isfinite(norms) & (norms > 0) & (torch.isfinite(group_total) | ~in_warmup)
    new_gamma = torch.where(observed, torch.where(in_warmup, warm_gamma, ema_gamma), gamma)
    return coef, new_gamma
