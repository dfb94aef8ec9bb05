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

This module provides the reducers and the DTensor parts; :mod:`fusedclip.engine` applies them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .engine import Reducer, Wrap, is_dtensor
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
    """A reducer of :mod:`fusedclip.engine` over process groups: all-reduces a norm's accumulator
    over each group in turn (out of place; SUM, or MAX/MIN for +-inf)."""

    def __init__(self, groups: list[Any]) -> None:
        self.groups = tuple(groups)

    def __call__(self, acc: Tensor, norm: NormSpec) -> Tensor:
        return _all_reduce_(acc.clone(), norm, list(self.groups)) if self.groups else acc


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
        if not is_dtensor(grad):
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


def _wrap_like_torch(total: Tensor, norm: NormSpec, *, mesh: Any) -> Tensor:
    """A DTensor as torch returns for DTensor grads: Partial(max/min) for +-inf, else Replicate."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if norm.kind is NormKind.MAX:
        placement: Any = Partial("max")
    elif norm.kind is NormKind.MIN:
        placement = Partial("min")
    else:
        placement = Replicate()
    return DTensor.from_local(total, mesh, [placement] * mesh.ndim, run_check=False)


def dtensor_parts(grads: list[Tensor], for_norm: bool) -> tuple[list[tuple[list[Tensor], Reducer | None]], Wrap | None]:
    """The parts of :class:`fusedclip.engine.PreparedCall` for grads that include DTensors: their
    local tensors, grouped by the mesh dimensions they are sharded over, each with the reducer
    over those dimensions; and how to wrap the total as torch does. Without ``for_norm`` (scaling,
    clamping) all local tensors form one part with nothing to reduce."""
    if not for_norm:
        return [([g.to_local() if is_dtensor(g) else g for g in grads], None)], None
    shard_groups, mesh = _shard_groups(grads)
    parts: list[tuple[list[Tensor], Reducer | None]] = [
        (group.locals, GroupReducer([group.mesh.get_group(dim) for dim in group.sharded_dims])) for group in shard_groups
    ]
    wrap = None if mesh is None else functools.partial(_wrap_like_torch, mesh=mesh)
    return parts, wrap
