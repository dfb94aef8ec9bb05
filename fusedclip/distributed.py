"""Distributed norms: a process group for model/pipeline splits, and DTensor (FSDP2, tensor parallel).

Every rank computes the accumulator of its local grads in one norm pass (sum of ``|x|^p``, max,
min or tensor count), the accumulators are all-reduced (SUM; MAX/MIN for +-inf), and every rank
forms the same total and coefficient from the reduced value. Nothing else crosses the network and
no full gradient is ever materialised.

General p (not 0, 1, 2, +-inf) sums ``(|x| / M)^p`` relative to one norm scale ``M`` for all ranks
(see :mod:`fusedclip.backends.base`): a MAX (MIN for p < 0) pass and all-reduce come first, so
every rank's sum uses the same ``M`` and the sums add up as before: two small collectives.

For DTensor grads the reduction runs over the mesh dimensions along which a grad is sharded, and
only those: replicated dimensions already hold identical values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import engine
from .backends.base import NormResult, combine_accumulators, finish, is_general_p, scale_norm
from .norm_type import NormKind, NormSpec


def _all_reduce_(acc: Tensor, norm: NormSpec, groups: list[Any]) -> Tensor:
    """All-reduce a float64 accumulator in place over each group, propagating NaN for MAX/MIN.

    Collective MAX/MIN implementations may drop NaN, so NaN travels as a separate flag packed into
    the same message: ``[value with NaN replaced by the neutral element, +-flag]``.
    """
    if norm.kind in (NormKind.MAX, NormKind.MIN):
        is_max = norm.kind is NormKind.MAX
        op = dist.ReduceOp.MAX if is_max else dist.ReduceOp.MIN
        nan = torch.isnan(acc)
        neutral = torch.full_like(acc, -torch.inf if is_max else torch.inf)
        packed = torch.stack([torch.where(nan, neutral, acc), nan.to(acc.dtype) * (1.0 if is_max else -1.0)])
        for group in groups:
            dist.all_reduce(packed, op=op, group=group)
        return torch.where(packed[1] != 0, torch.full_like(acc, torch.nan), packed[0])
    for group in groups:
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
    return acc


class GroupReducer:
    """The ``reduce`` callback of :func:`fusedclip.engine.norm_pass` for process groups: all-reduces
    a norm's accumulator over each group (out of place). ``for_norm`` gives the same reduction for
    another norm's accumulator (the engine reduces the norm scale of a general p with it)."""

    def __init__(self, norm: NormSpec, groups: list[Any]) -> None:
        self.norm = norm
        self.groups = groups

    def __call__(self, acc: Tensor) -> Tensor:
        return _all_reduce_(acc.clone(), self.norm, self.groups) if self.groups else acc

    def for_norm(self, norm: NormSpec) -> GroupReducer:
        return GroupReducer(norm, self.groups)


def group_reducer(norm: NormSpec, group: Any) -> Callable[[Tensor], Tensor]:
    """The ``reduce`` callback of :func:`fusedclip.engine.norm_pass` for a process group."""
    return GroupReducer(norm, [group])


def _is_dtensor(tensor: Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements")


@dataclass
class _ShardGroup:
    """Grads whose local shards reduce over the same mesh dimensions."""

    mesh: Any
    sharded_dims: tuple[int, ...]
    locals: list[Tensor] = field(default_factory=list)


def _shard_groups(grads: list[Tensor]) -> tuple[list[_ShardGroup], Any]:
    """Split DTensor (and plain) grads into local tensors grouped by their reduction dims."""
    groups: dict[tuple[int, tuple[int, ...]], _ShardGroup] = {}
    first_mesh = None
    for index, grad in enumerate(grads):
        if not _is_dtensor(grad):
            key: tuple[int, tuple[int, ...]] = (0, ())
            groups.setdefault(key, _ShardGroup(None, ())).locals.append(grad)
            continue
        mesh = grad.device_mesh
        first_mesh = first_mesh if first_mesh is not None else mesh
        dims = []
        for dim, placement in enumerate(grad.placements):
            if placement.is_partial():
                raise ValueError(
                    f"gradient {index} is a DTensor with a Partial placement on mesh dim {dim}: its norm"
                    " needs the reduced values; redistribute it (e.g. to Shard or Replicate) before clipping"
                )
            if placement.is_shard() or type(placement).__name__ == "_StridedShard":
                dims.append(dim)
        key = (id(mesh), tuple(dims))
        groups.setdefault(key, _ShardGroup(mesh, tuple(dims))).locals.append(grad.to_local())
    return list(groups.values()), first_mesh


def _wrap_like_torch(total: Tensor, mesh: Any, norm: NormSpec) -> Tensor:
    """A DTensor as torch returns for DTensor grads: Partial(max/min) for +-inf, else Replicate."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if norm.kind is NormKind.MAX:
        placement: Any = Partial("max")
    elif norm.kind is NormKind.MIN:
        placement = Partial("min")
    else:
        placement = Replicate()
    return DTensor.from_local(total, mesh, [placement] * mesh.ndim, run_check=False)


def has_dtensors(grads: list[Tensor]) -> bool:
    return any(_is_dtensor(g) for g in grads)


def dtensor_norm_pass(
    grads: list[Tensor],
    norm: NormSpec,
    max_norm: float | Tensor | None,
    backend: str | None,
    foreach: bool | None,
    grad_scale: Tensor | None = None,
    group: Any = None,
) -> tuple[NormResult, list[engine.PreparedCall]]:
    """Norm pass over DTensor grads via their local shards; returns the calls to scale with.

    ``group`` (optional) is reduced over as well, e.g. the pipeline-parallel stages.
    """
    shard_groups, mesh = _shard_groups(grads)
    calls, reducers = [], []
    for shard_group in shard_groups:
        calls.append(engine.prepare(shard_group.locals, backend, foreach))
        reducers.append(GroupReducer(norm, [shard_group.mesh.get_group(dim) for dim in shard_group.sharded_dims]))
    first = calls[0].first_device

    def combined(values: list[Tensor], spec: NormSpec) -> Tensor:
        value = values[0] if len(values) == 1 else combine_accumulators([v.to(first) for v in values], spec)
        return value if group is None else _all_reduce_(value.clone(), spec, [group])

    # general p: one norm scale for every shard group and rank (max |x|, or min for p < 0)
    scale = None
    if is_general_p(norm):
        spec = scale_norm(norm)
        scales = [engine.norm_scale(call, norm, reducer) for call, reducer in zip(calls, reducers)]
        scale = combined(scales, spec)  # type: ignore[arg-type]
    accs = [
        engine.norm_pass(call, norm, None, reduce=reducer, scale=None if scale is None else scale.to(call.first_device)).acc
        for call, reducer in zip(calls, reducers)
    ]
    acc = combined(accs, norm)
    result_dtype = calls[0].result_dtype
    for call in calls[1:]:
        result_dtype = torch.promote_types(result_dtype, call.result_dtype)
    result = finish(acc, norm, max_norm, result_dtype, grad_scale, scale)
    total = _wrap_like_torch(result.total, mesh, norm) if mesh is not None else result.total
    return NormResult(total, result.coef, result.acc, result.scale), calls
