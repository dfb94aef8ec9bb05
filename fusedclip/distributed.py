"""Distributed norms: a process group for model/pipeline splits, and DTensor (FSDP2, HSDP, tensor parallel).

Every rank computes the float64 accumulators of its local grads (sum of ``|x|^p``, max, min or
tensor count) in one norm pass; they travel in one small vector through one all-reduce, and every
rank forms the same total and coefficient from the reduced value. Nothing else crosses the network
and no full gradient is ever materialised.

What is reduced over which group:

* DTensor grads: the accumulator of a grad's local shard is summed (MAX/MIN for +-inf) over all
  ranks of its mesh. Along a replicated mesh dimension (Replicate) only the replica at coordinate
  0 contributes; the others contribute the neutral element (0 for sums and for max ``|x|``, +inf
  for min ``|x|``), so every distinct shard is counted exactly once. Meshes are told apart by the
  set of ranks they span (and device type), not by identity: FSDP2 and tensor parallelism build
  distinct but equal meshes, and these share one slot.
* Grads on meshes over different rank sets (FSDP x TP: the 2-D mesh, and the data-parallel
  submesh of parameters that are not tensor parallel) travel in the same vector: a rank set that
  spans all ranks of the collective takes one slot; a smaller one (a submesh) takes one slot per
  rank of the collective, and every rank writes and reads the slot of its own submesh (indexed by
  the submesh's lowest rank), so sibling submeshes never mix.
* The collective runs over the world group when the rank sets together span every rank; else over
  the one mesh or group whose rank set contains all others (over each dimension of that mesh in
  turn when it has several dimensions); else (rank sets that no single group covers) each rank set
  is reduced over its own mesh.
* Plain (non-DTensor) grads are local: with ``group=`` and no DTensor grads they are summed over
  ``group`` in the same way (one collective); without ``group=`` they are added after the reduction.
* ``group=`` together with DTensor grads: the DTensor totals are global over their meshes first,
  then the call's local total (DTensor totals plus plain grads) is summed over ``group``. That is a
  second collective: this rank cannot know the meshes of the other members of ``group``, so their
  shards cannot be placed in one vector.

MAX/MIN reductions may drop NaN (gloo's and NCCL's max/min are plain comparisons), so NaN travels
as a flag in the same vector: ``[values with NaN replaced by the neutral element, +-flags]``,
all-reduced with the same MAX (MIN: flags negated) operation.

General p (not 0, 1, 2, +-inf) sums ``(|x| / M)^p`` relative to one norm scale ``M`` for all ranks
(see :mod:`fusedclip.backends.base`): the MAX (MIN for p < 0) of ``|x|`` must be all-reduced before
any rank can form its sum, so general p takes two collectives (the scale, then the sum).

The collectives are functional (``torch.distributed._functional_collectives``): visible to
``CommDebugMode`` and traceable by ``torch.compile``. :mod:`fusedclip.engine` applies the reducer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .backends.base import combine_accumulators
from .engine import PartsReducer, Wrap, is_dtensor
from .norm_type import NormKind, NormSpec


def _neutral(norm: NormSpec) -> float:
    """The identity of the norm's reduction over |x| values: +inf for min, else 0."""
    return math.inf if norm.kind is NormKind.MIN else 0.0


def _all_reduce(vec: Tensor, norm: NormSpec, groups: tuple[Any, ...]) -> Tensor:
    """All-reduce a 1-D float64 vector over each group in turn (functional collectives), SUM or
    MAX/MIN for +-inf; NaN survives MAX/MIN as a flag travelling in the same message."""
    from torch.distributed import _functional_collectives as funcol

    def reduce(tensor: Tensor, op: str) -> Tensor:
        for group in groups:
            tensor = funcol.wait_tensor(funcol.all_reduce(tensor, op, group))
        return tensor

    if norm.kind in (NormKind.MAX, NormKind.MIN):
        is_max = norm.kind is NormKind.MAX
        nan = torch.isnan(vec)
        packed = torch.cat([torch.where(nan, torch.full_like(vec, _neutral(norm)), vec), nan.to(vec.dtype) * (1.0 if is_max else -1.0)])
        packed = reduce(packed, "max" if is_max else "min")
        count = vec.numel()
        return torch.where(packed[count:] != 0, torch.full_like(vec, math.nan), packed[:count])
    return reduce(vec, "sum")


@dataclass(frozen=True)
class _Block:
    """Accumulators summed over one set of ranks: ``groups`` all-reduced in turn sum over exactly
    ``ranks`` (one group, or every dimension of a mesh)."""

    ranks: tuple[int, ...]
    groups: tuple[Any, ...]


@dataclass(frozen=True)
class _Contribution:
    """How one part's accumulator enters the reduction: its block (None: local, not reduced) and
    whether this rank is the representative replica (else it contributes the neutral element)."""

    block: int | None
    representative: bool = True


def _reduce_blocks(values: list[Tensor], blocks: list[_Block], norm: NormSpec) -> list[Tensor]:
    """Every block's value reduced over its ranks, in one collective where one group covers all."""
    union = tuple(sorted(set().union(*(block.ranks for block in blocks))))
    carrier = next((block for block in blocks if block.ranks == union), None)
    if union == tuple(range(dist.get_world_size())):
        groups: tuple[Any, ...] = (dist.group.WORLD,)
    elif carrier is not None:
        groups = carrier.groups
    else:  # no one group spans every rank set here: each is reduced over its own mesh
        return [_all_reduce(value.reshape(1), norm, block.groups)[0] for value, block in zip(values, blocks)]
    pieces, reads, offset = [], [], 0
    for value, block in zip(values, blocks):
        if block.ranks == union:
            pieces.append(value.reshape(1))
            reads.append(offset)
            offset += 1
            continue
        slot = union.index(block.ranks[0])  # sibling submeshes are disjoint: their lowest ranks differ
        piece = torch.full((len(union),), _neutral(norm), dtype=value.dtype, device=value.device)
        piece[slot] = value
        pieces.append(piece)
        reads.append(offset + slot)
        offset += len(union)
    reduced = _all_reduce(torch.cat(pieces), norm, groups)
    return [reduced[index] for index in reads]


class PartsReduction:
    """The reducer of :class:`fusedclip.engine.PreparedCall`: turns the local accumulators of the
    call's parts into the global accumulator (see the module docstring for what goes where)."""

    def __init__(
        self, contributions: list[_Contribution], blocks: list[_Block], group: Any = None, sharded: bool = False
    ) -> None:
        self.contributions = tuple(contributions)
        self.blocks = tuple(blocks)
        self.group = group  # summed over after the blocks (group= with DTensor grads)
        self.sharded = sharded  # some DTensor grad is sharded along a mesh dimension

    def __call__(self, accs: list[Tensor], norm: NormSpec) -> Tensor:
        if norm.kind is NormKind.COUNT and self.sharded:
            # a tensor counts once if any of its shards holds a non-zero element: summing per-shard
            # counts would count it once per such shard, a silently wrong result
            raise ValueError(
                "norm_type=0 (the number of gradients with a non-zero element) is not supported for"
                " sharded DTensor gradients; use p = 1, 2 or inf, or redistribute them to Replicate"
            )
        values: list[Tensor | None] = [None] * len(self.blocks)
        local = []
        for acc, contribution in zip(accs, self.contributions):
            if contribution.block is None:
                local.append(acc)
                continue
            if not contribution.representative:
                acc = torch.full_like(acc, _neutral(norm))
            previous = values[contribution.block]
            values[contribution.block] = acc if previous is None else combine_accumulators([previous, acc], norm)
        reduced = _reduce_blocks(values, list(self.blocks), norm) if self.blocks else []  # type: ignore[arg-type]
        parts = reduced + local
        total = parts[0] if len(parts) == 1 else combine_accumulators(parts, norm)
        if self.group is not None:
            total = _all_reduce(total.reshape(1), norm, (self.group,))[0]
        return total


def _ranks_of(group: Any) -> tuple[int, ...]:
    return tuple(sorted(dist.get_process_group_ranks(group)))


def group_reducer(group: Any) -> PartsReduction:
    """The reducer for plain grads split over ``group``: their accumulators summed over it."""
    return PartsReduction([_Contribution(0)], [_Block(_ranks_of(group), (group,))])


def _is_sharded(placement: Any) -> bool:
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


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


def dtensor_parts(
    grads: list[Tensor], for_norm: bool, group: Any = None
) -> tuple[list[list[Tensor]], PartsReducer | None, Wrap | None]:
    """The parts of :class:`fusedclip.engine.PreparedCall` for grads that include DTensors: their
    local tensors, one part per (rank set, representative or not) and one for plain grads, the
    reducer that combines the parts' accumulators, and how to wrap the total as torch does.
    Without ``for_norm`` (scaling, clamping) all local tensors form one part with nothing to reduce."""
    if not for_norm:
        return [[g.to_local() if is_dtensor(g) else g for g in grads]], None, None
    blocks: list[_Block] = []
    block_of: dict[tuple[Any, ...], int] = {}
    parts: dict[_Contribution, list[Tensor]] = {}
    first_mesh = None
    sharded = False
    for index, grad in enumerate(grads):
        if not is_dtensor(grad):
            parts.setdefault(_Contribution(None), []).append(grad)
            continue
        mesh = grad.device_mesh
        first_mesh = first_mesh if first_mesh is not None else mesh
        for dim, placement in enumerate(grad.placements):
            if placement.is_partial():
                raise ValueError(
                    f"gradient {index} is a DTensor with a Partial placement on mesh dim {dim}: its norm"
                    " needs the reduced values; redistribute it (e.g. to Shard or Replicate) before clipping"
                )
        ranks = tuple(sorted(mesh.mesh.flatten().tolist()))
        key = (ranks, mesh.device_type)
        if key not in block_of:
            groups = tuple(mesh.get_group(dim) for dim in range(mesh.ndim))
            block_of[key] = len(blocks)
            blocks.append(_Block(ranks, groups))
        sharded = sharded or any(_is_sharded(placement) for placement in grad.placements)
        coordinate = mesh.get_coordinate()
        representative = coordinate is not None and all(
            coordinate[dim] == 0 for dim, placement in enumerate(grad.placements) if not _is_sharded(placement)
        )
        parts.setdefault(_Contribution(block_of[key], representative), []).append(grad.to_local())
    reducer = PartsReduction(list(parts), blocks, group, sharded)
    wrap = None if first_mesh is None else functools.partial(_wrap_like_torch, mesh=first_mesh)
    return list(parts.values()), reducer, wrap
