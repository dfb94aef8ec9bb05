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
* Plain (non-DTensor) grads are local: without ``group=`` they are added after the reduction.
* Per-tensor norms (:func:`fusedclip.get_norms`): every grad of a block adds one row to the
  block's entries in the same vector (the grads in call order, so every rank has the same layout;
  non-representative replicas hold the neutral element), so each DTensor grad's norm is that of
  the whole unsharded tensor with no collective of its own. Plain grads' norms stay local.
* ``group=``: the ranks of ``group`` hold different parameters (pipeline stages, model-parallel
  pieces); the result is the norm over the distinct grads of all of them, DTensors counted over
  their whole meshes once. When every mesh of this rank lies inside ``group`` (``group`` is the
  world, or contains the meshes), each rank's local shards (replicas neutral) and plain grads are
  summed over ``group`` in one collective, which counts every distinct shard once. When a mesh
  reaches outside ``group`` (a pipeline group with one rank per stage), the meshes are reduced
  first and then the totals over ``group`` (a mesh shared by several members of ``group`` counts
  once: only its lowest rank there contributes): two collectives, see :class:`PartsReduction`.
  ``group`` must not contain two ranks holding replicas of the same parameters on different
  meshes (e.g. sibling data-parallel submeshes of FSDP x TP): each would count.
  Per-tensor norms with ``group=`` and DTensor grads take the two-collective path (their rows need
  the meshes' ranks only).
* Every rank must see the same kind of layout (the same blocks in the same order, SPMD): the
  vector's layout and the collectives chosen depend on it.

MAX/MIN reductions may drop NaN (gloo's and NCCL's max/min are plain comparisons), so NaN travels
as a flag in the same vector: ``[values with NaN replaced by the neutral element, +-flags]``,
all-reduced with the same MAX (MIN: flags negated) operation.

General p (not 0, 1, 2, +-inf) sums ``(|x| / M')^p`` relative to a norm scale ``M`` (see
:mod:`fusedclip.backends.base`). Each rank computes its own local scale ``m`` and its sum ``S``
relative to it (two local passes, no communication) and writes the pair ``(m, S)`` into its own
slot of the vector (zeros in the other ranks' slots): a SUM all-reduce then gathers every rank's
pairs exactly, and every rank combines those of its block's ranks to the common scale ``M`` (max
``m``, min for p < 0) as ``sum of (m' / M')^p * S``, which cannot overflow (see
:func:`_combine_scaled`). One collective, of ``2 x ranks`` values per total or per-tensor row.

No call builds a device tensor from host data once a layout has been seen: neutral rows are filled
on the device, and the index tensors of a layout (which rows a part's grads write, which slots a
rank reads) are uploaded once and cached (:func:`_device_index`), so the steady state has no
blocking host-to-device copy.

The collectives are functional (``torch.distributed._functional_collectives``): visible to
``CommDebugMode`` and traceable by ``torch.compile``. :mod:`fusedclip.engine` applies the reducer.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .backends.base import scale_norm, total_from_accumulator, usable_norm_scale
from .engine import PartsReducer, Reduced, Wrap, is_dtensor
from .norm_type import NormKind, NormSpec


def _neutral(norm: NormSpec) -> float:
    """The identity of the norm's reduction over |x| values: +inf for min, else 0."""
    return math.inf if norm.kind is NormKind.MIN else 0.0


def _neutral_rows(count: int, norm: NormSpec, general: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``count`` rows ``(count, w)`` that change nothing when combined: the neutral accumulator, or
    for a general p the pair (neutral norm scale, sum 0). Filled on the device (no host data)."""
    if not general:
        return torch.full((count, 1), _neutral(norm), dtype=dtype, device=device)
    rows = torch.zeros((count, 2), dtype=dtype, device=device)
    rows[:, 0].fill_(_neutral(scale_norm(norm)))
    return rows


#: how many index tensors :func:`_device_index` keeps (least recently used dropped first)
_INDEX_CACHE_SIZE = 256
_DEVICE_INDICES: OrderedDict[tuple[torch.device, tuple[int, ...]], Tensor] = OrderedDict()


def _device_index(positions: Sequence[int], device: torch.device) -> Tensor:
    """``positions`` as an int64 index tensor on ``device``, uploaded once per (device, positions)
    and then reused: a layout repeats every step, and building it from a Python list on every call
    would be a blocking host-to-device copy (a host synchronisation on CUDA). Bounded (LRU). Callers
    only read it. Under ``torch.compile`` it is built in the traced graph instead."""
    if torch.compiler.is_compiling():
        return torch.tensor(list(positions), dtype=torch.int64, device=device)
    key = (torch.device(device), tuple(positions))
    index = _DEVICE_INDICES.get(key)
    if index is None:
        index = torch.tensor(key[1], dtype=torch.int64, device=device)
        _DEVICE_INDICES[key] = index
        while len(_DEVICE_INDICES) > _INDEX_CACHE_SIZE:
            _DEVICE_INDICES.popitem(last=False)
    else:
        _DEVICE_INDICES.move_to_end(key)
    return index


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


def _combine_scaled(pairs: Tensor, p: float, dim: int = 0) -> Tensor:
    """Pairs ``(m, S)`` along ``dim`` (last axis: norm scale ``m`` and the sum ``S`` of ``(|x| / m')^p``)
    combined into one pair relative to their common scale ``M`` (max ``m``, min for p < 0):
    ``(M, sum of (m' / M')^p * S)``. Every ratio ``m' / M'`` is at most 1 for p > 0 (at least 1 for
    p < 0), so nothing overflows; a term that underflows is below ``M'^p`` by more than float64's
    range, negligible against the largest one. An empty sum (``S == 0``) adds exactly nothing."""
    scales, sums = pairs[..., 0], pairs[..., 1]
    common = scales.amax(dim, keepdim=True) if p > 0 else scales.amin(dim, keepdim=True)
    ratio = (usable_norm_scale(scales) / usable_norm_scale(common)).pow(p)
    terms = torch.where(sums == 0, torch.zeros_like(sums), ratio * sums)
    return torch.stack([common.squeeze(dim), terms.sum(dim)], -1)


def _combine_rows(rows: Tensor, norm: NormSpec, general: bool) -> Tensor:
    """Rows ``(n, ..., w)`` combined along the first axis as the norm combines accumulators."""
    if general:
        return _combine_scaled(rows, norm.p)
    if norm.kind is NormKind.MAX:
        return rows.amax(0)
    if norm.kind is NormKind.MIN:
        return rows.amin(0)
    return rows.sum(0)


def _to_accumulators(norms: Tensor, norm: NormSpec, general: bool) -> Tensor:
    """Per-tensor norms (1-D) as rows ``(n, w)`` that add up across shards: ``|x|^p`` sums for
    p = 1, 2 (the square of a 2-norm), the value itself for max, min and counts; for a general p the
    pair ``(n, (n / n')^p)``, exact for any norm ``n``."""
    if general:
        return torch.stack([norms, (norms / usable_norm_scale(norms)).pow(norm.p)], -1)
    if norm.kind is NormKind.SUM_POW and norm.p == 2.0:
        norms = norms * norms
    return norms.reshape(-1, 1)


def _from_accumulators(rows: Tensor, norm: NormSpec, general: bool) -> Tensor:
    """The norms of accumulator rows ``(n, w)`` (1-D, float64)."""
    if general:
        return total_from_accumulator(rows[:, 1], norm, rows[:, 0])
    return total_from_accumulator(rows[:, 0], norm)


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


def _reduce_over(
    values: list[Tensor], blocks: list[_Block], union: tuple[int, ...], groups: tuple[Any, ...], norm: NormSpec, general: bool
) -> list[Tensor]:
    """Every block's rows ``(k, w)`` reduced over its ranks by one all-reduce over ``groups`` (which
    sum over ``union``, a superset of every block's ranks).

    Simple norms: a block spanning ``union`` enters as is; a smaller one (a submesh) takes one slot
    per rank of ``union`` and writes the slot of its lowest rank (sibling submeshes are disjoint, so
    their lowest ranks differ), the others holding the neutral element. General p: every rank writes
    its pairs into its own slot (0 elsewhere), so the sum gathers every rank's pairs exactly and each
    rank combines those of its block's ranks to their common scale."""
    me = dist.get_rank()
    pieces, reads = [], []
    offset = 0
    for value, block in zip(values, blocks):
        if general:
            piece = torch.zeros((len(union), *value.shape), dtype=value.dtype, device=value.device)
            piece[union.index(me)] = value
            reads.append((offset, [union.index(rank) for rank in block.ranks]))
        elif block.ranks == union:
            piece = value.unsqueeze(0)
            reads.append((offset, [0]))
        else:
            piece = torch.full((len(union), *value.shape), _neutral(norm), dtype=value.dtype, device=value.device)
            piece[union.index(block.ranks[0])] = value
            reads.append((offset, [union.index(block.ranks[0])]))
        pieces.append(piece)
        offset += piece.numel()
    reduced = _all_reduce(torch.cat([piece.reshape(-1) for piece in pieces]), norm, groups)
    out = []
    for (start, slots), piece, value in zip(reads, pieces, values):
        rows = reduced[start : start + piece.numel()].reshape(piece.shape)
        out.append(_combine_rows(rows[_device_index(slots, rows.device)], norm, general) if general else rows[slots[0]])
    return out


def _reduce_blocks(values: list[Tensor], blocks: list[_Block], norm: NormSpec, general: bool) -> list[Tensor]:
    """Every block's rows reduced over its ranks, in one collective where one group covers all."""
    union = tuple(sorted(set().union(*(block.ranks for block in blocks))))
    carrier = next((block for block in blocks if block.ranks == union), None)
    if union == tuple(range(dist.get_world_size())):
        groups: tuple[Any, ...] = (dist.group.WORLD,)
    elif carrier is not None:
        groups = carrier.groups
    else:  # no one group spans every rank set here: each is reduced over its own mesh
        return [_reduce_over([value], [block], block.ranks, block.groups, norm, general)[0] for value, block in zip(values, blocks)]
    return _reduce_over(values, blocks, union, groups, norm, general)


class PartsReduction:
    """The reducer of :class:`fusedclip.engine.PreparedCall`: turns the local accumulators of the
    call's parts (and optionally their per-tensor norms) into the global ones (see the module
    docstring for what goes where).

    ``positions[i]``: where part ``i``'s grads sit in the call (None: one part, in call order).
    """

    def __init__(
        self,
        contributions: list[_Contribution],
        blocks: list[_Block],
        positions: list[list[int]] | None = None,
        group: Any = None,
        sharded: bool = False,
    ) -> None:
        self.contributions = tuple(contributions)
        self.blocks = tuple(blocks)
        self.positions = [list(p) for p in positions] if positions is not None else None
        self.group = group
        self.group_ranks = _ranks_of(group) if group is not None else None
        self.sharded = sharded  # some DTensor grad is sharded along a mesh dimension
        # the grads of each block, in call order: the layout of its per-tensor rows on every rank
        self.block_positions: list[list[int]] = [[] for _ in blocks]
        for contribution, part_positions in zip(contributions, self.positions or [[]]):
            if contribution.block is not None:
                self.block_positions[contribution.block].extend(part_positions)
        for block_positions in self.block_positions:
            block_positions.sort()

    def __call__(
        self, accs: list[Tensor], norm: NormSpec, *, scales: list[Tensor] | None = None, per_tensor: list[Tensor] | None = None
    ) -> Reduced:
        if norm.kind is NormKind.COUNT and self.sharded:
            # a tensor counts once if any of its shards holds a non-zero element: summing per-shard
            # counts would count it once per such shard, a silently wrong result
            raise ValueError(
                "norm_type=0 (the number of gradients with a non-zero element) is not supported for"
                " sharded DTensor gradients; use p = 1, 2 or inf, or redistribute them to Replicate"
            )
        general = scales is not None
        device = accs[0].device
        neutral = _neutral_rows(1, norm, general, accs[0].dtype, device)[0]
        totals = [torch.stack([scale, acc]) if general else acc.reshape(1) for acc, scale in zip(accs, scales or accs)]
        # every block's rows: its total, then (with per_tensor) one row per grad of the block in call order
        block_rows = []
        for index, block_positions in enumerate(self.block_positions):
            rows = _neutral_rows(1 + (len(block_positions) if per_tensor is not None else 0), norm, general, accs[0].dtype, device)
            members = [i for i, c in enumerate(self.contributions) if c.block == index and c.representative]
            if members:
                rows[0] = _combine_rows(torch.stack([totals[i] for i in members]), norm, general)
            if per_tensor is not None:
                row_of = {position: row for row, position in enumerate(block_positions, 1)}
                for i in members:
                    within = _device_index([row_of[p] for p in self.positions[i]], device)  # type: ignore[index]
                    rows[within] = _to_accumulators(per_tensor[i], norm, general)
            block_rows.append(rows)
        local = [totals[i] for i, c in enumerate(self.contributions) if c.block is None]
        single_collective = self.group_ranks is not None and (
            per_tensor is None or not self.blocks
        ) and all(set(block.ranks) <= set(self.group_ranks) for block in self.blocks)
        if single_collective:
            # every mesh lies inside group: summing every rank's local shards (replicas neutral)
            # and plain grads over group counts each distinct shard once, in one collective
            reduced = [rows for rows in block_rows]
            block_totals = [rows[0] for rows in block_rows]
        else:
            reduced = _reduce_blocks(block_rows, list(self.blocks), norm, general) if self.blocks else []
            block_totals = [rows[0] for rows in reduced]
            if self.group_ranks is not None:
                # Two collectives: the meshes first, then group. This rank knows its own meshes and
                # group, not the meshes of the other members of group (a pipeline stage's meshes
                # span ranks outside group), so no group it knows spans every rank whose shards
                # must be added. A mesh shared by several members of group counts once: only its
                # lowest rank in group contributes its total.
                me = dist.get_rank()
                block_totals = [
                    total if min(set(block.ranks) & set(self.group_ranks)) == me else neutral
                    for total, block in zip(block_totals, self.blocks)
                ]
        total = _combine_rows(torch.stack(block_totals + local), norm, general)
        if self.group_ranks is not None:
            total = _reduce_over([total.unsqueeze(0)], [_Block(self.group_ranks, (self.group,))], self.group_ranks, (self.group,), norm, general)[0][0]
        per_tensor_norms = None
        if per_tensor is not None:
            count = sum(len(p) for p in self.positions) if self.positions is not None else per_tensor[0].numel()
            per_tensor_norms = torch.empty(count, dtype=accs[0].dtype, device=device)
            for rows, block_positions in zip(reduced, self.block_positions):
                if block_positions and not single_collective:
                    index = _device_index(block_positions, device)
                    per_tensor_norms[index] = _from_accumulators(rows[1:], norm, general)
            for i, c in enumerate(self.contributions):
                if c.block is None:  # plain grads: their own norms, local
                    index = _device_index(self.positions[i] if self.positions is not None else range(count), device)
                    per_tensor_norms[index] = per_tensor[i]
        if general:
            return Reduced(total[1], total[0], per_tensor_norms)
        return Reduced(total[0], None, per_tensor_norms)


def _ranks_of(group: Any) -> tuple[int, ...]:
    return tuple(sorted(dist.get_process_group_ranks(group)))


def group_reducer(group: Any) -> PartsReduction:
    """The reducer for plain grads split over ``group``: their accumulators summed over it."""
    return PartsReduction([_Contribution(None)], [], None, group)


def _is_sharded(placement: Any) -> bool:
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


@dataclass(frozen=True)
class _MeshInfo:
    ranks: tuple[int, ...]  # every rank of the mesh, sorted
    groups: tuple[Any, ...]  # the process group of each mesh dimension
    coordinate: tuple[int, ...] | None  # this rank's coordinate in the mesh


#: id(mesh) -> (weak reference to the mesh, its info): reading a DeviceMesh's ranks, groups and
#: coordinate costs far more than a clipping call's arithmetic, and meshes live for the whole run
_MESH_INFO: dict[int, tuple[Any, _MeshInfo]] = {}


def _mesh_info(mesh: Any) -> _MeshInfo:
    """The ranks, groups and coordinate of a DeviceMesh, read once per mesh object."""
    cached = _MESH_INFO.get(id(mesh))
    if cached is not None and cached[0]() is mesh:
        return cached[1]
    coordinate = mesh.get_coordinate()
    info = _MeshInfo(
        tuple(sorted(mesh.mesh.flatten().tolist())),
        tuple(mesh.get_group(dim) for dim in range(mesh.ndim)),
        None if coordinate is None else tuple(coordinate),
    )
    key = id(mesh)
    _MESH_INFO[key] = (weakref.ref(mesh, lambda _, key=key: _MESH_INFO.pop(key, None)), info)
    return info


def _is_representative(grad: Any, coordinate: tuple[int, ...] | None) -> bool:
    """Whether this rank's shard of a DTensor counts: it is at coordinate 0 along every mesh
    dimension the DTensor is not sharded over (the other replicas contribute the neutral element)."""
    return coordinate is not None and all(
        coordinate[dim] == 0 for dim, placement in enumerate(grad.placements) if not _is_sharded(placement)
    )


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
    positions: dict[_Contribution, list[int]] = {}
    first_mesh = None
    sharded = False
    for index, grad in enumerate(grads):
        if not is_dtensor(grad):
            parts.setdefault(_Contribution(None), []).append(grad)
            positions.setdefault(_Contribution(None), []).append(index)
            continue
        mesh = grad.device_mesh
        first_mesh = first_mesh if first_mesh is not None else mesh
        for dim, placement in enumerate(grad.placements):
            if placement.is_partial():
                raise ValueError(
                    f"gradient {index} is a DTensor with a Partial placement on mesh dim {dim}: its norm"
                    " needs the reduced values; redistribute it (e.g. to Shard or Replicate) before clipping"
                )
        info = _mesh_info(mesh)
        key = (info.ranks, mesh.device_type)
        if key not in block_of:
            block_of[key] = len(blocks)
            blocks.append(_Block(info.ranks, info.groups))
        sharded = sharded or any(_is_sharded(placement) for placement in grad.placements)
        contribution = _Contribution(block_of[key], _is_representative(grad, info.coordinate))
        parts.setdefault(contribution, []).append(grad.to_local())
        positions.setdefault(contribution, []).append(index)
    reducer = PartsReduction(list(parts), blocks, [positions[c] for c in parts], group, sharded)
    wrap = None if first_mesh is None else functools.partial(_wrap_like_torch, mesh=first_mesh)
    return list(parts.values()), reducer, wrap
