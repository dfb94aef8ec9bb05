"""The shared plan: one list of grads becomes, per device, a tensor table and a chunk table.

Both kernel backends (Triton and the compiled extension) read the same tables, so chunking,
alignment and dtype mixing are solved once, here:

* tensor table, one row per grad: data address, element count, dtype code;
* chunk table, one row per chunk of at most ``CHUNK_ELEMENTS`` elements: tensor index and 64-bit
  start offset (so one tensor may hold more than 2**31 elements);
* ``first_chunk[t]`` .. ``first_chunk[t+1]``: the chunks of tensor ``t`` (for per-tensor results).

Plans are cached. The cache key holds the address, element count, dtype and contiguity of every grad
(and their devices when an address is ambiguous), so a hit guarantees that the tables describe the
memory of the grads passed *now*: a grad reallocated between calls changes the key and forces a
new plan; a stale address is never read or written. The cache holds no reference to any grad.

Training loops that set grads to None between steps (``zero_grad()``'s default) get new grads, at
new addresses, every step. When only the addresses changed (same sizes, dtypes and device, every
grad dense), the new plan is the cached plan of that layout with its address column rewritten
(``DevicePlan.rebased``): the chunk tables are reused instead of rebuilt, and only the aliasing
check looks at the new addresses.

Grads that are not dense in memory (e.g. ``x[:, ::2]``) are copied into staging buffers owned by
the plan before a kernel runs and copied back after a kernel writes: in place from the caller's
point of view. Dense but permuted grads (transposes, channels-last) are used in place, since norms
and scaling do not depend on element order.
"""

from __future__ import annotations

import functools
import operator
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

#: dtype codes shared with the kernels (see csrc/fusedclip.h)
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
#: largest chunk, in elements; a power of two so chunk starts stay aligned like the tensor base
CHUNK_ELEMENTS = 1 << 16
#: element size of each dtype code (indexed by code)
_ITEMSIZE_OF_CODE = torch.tensor([dtype.itemsize for dtype, _ in sorted(DTYPE_CODES.items(), key=lambda item: item[1])])

#: plans kept in the cache (a training loop needs one or two)
CACHE_SIZE = 16

_REAL_OF_COMPLEX = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}
PLAIN_TENSOR_TYPES = frozenset({Tensor, torch.nn.Parameter})

_CPU = torch.device("cpu")


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a norm of a tensor of ``dtype`` (complex -> its real counterpart)."""
    return _REAL_OF_COMPLEX.get(dtype, dtype)


def is_dense(tensor: Tensor) -> bool:
    """True when the tensor's elements fill one gap-free, non-overlapping span of memory."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass(frozen=True)
class KernelTables:
    """The tables the kernels read, as int64 tensors on one device (views into one buffer)."""

    packed: Tensor  # the one buffer all tables below are views of (one copy moves them all)
    addresses: Tensor  # [T] data address of each tensor (or of its staging buffer)
    numels: Tensor  # [T] elements per tensor
    dtype_codes: Tensor  # [T] DTYPE_CODES of each tensor
    first_chunk: Tensor  # [T + 1] chunks of tensor t are first_chunk[t] .. first_chunk[t+1]-1
    chunk_tensor: Tensor  # [C] tensor index of each chunk
    chunk_start: Tensor  # [C] first element of each chunk within its tensor
    num_tensors: int
    num_chunks: int
    chunk_elements: int
    max_numel: int

    def to(self, device: torch.device) -> KernelTables:
        return _slice_tables(
            self.packed.to(device), self.num_tensors, self.num_chunks, self.chunk_elements, self.max_numel
        )


def _slice_tables(packed: Tensor, t: int, c: int, chunk_elements: int, max_numel: int) -> KernelTables:
    cuts = [t, t, t, t + 1, c, c]
    parts = torch.split(packed, cuts)
    return KernelTables(packed, *parts, num_tensors=t, num_chunks=c, chunk_elements=chunk_elements, max_numel=max_numel)


def build_tables(addresses: list[int], numels: list[int], codes: list[int], chunk_elements: int) -> KernelTables:
    """Chunk every tensor into pieces of at most ``chunk_elements`` elements (vectorised, on the CPU)."""
    t = len(numels)
    numel_t = torch.tensor(numels, dtype=torch.int64)
    chunks_per_tensor = (numel_t + (chunk_elements - 1)) // chunk_elements
    first_chunk = torch.zeros(t + 1, dtype=torch.int64)
    torch.cumsum(chunks_per_tensor, 0, out=first_chunk[1:])
    c = int(first_chunk[-1])
    chunk_tensor = torch.repeat_interleave(torch.arange(t, dtype=torch.int64), chunks_per_tensor, output_size=c)
    chunk_start = (torch.arange(c, dtype=torch.int64) - first_chunk[chunk_tensor]) * chunk_elements
    packed = torch.cat(
        [
            torch.tensor(addresses, dtype=torch.int64),
            numel_t,
            torch.tensor(codes, dtype=torch.int64),
            first_chunk,
            chunk_tensor,
            chunk_start,
        ]
    )
    return _slice_tables(packed, t, c, chunk_elements, max(numels, default=0))


@dataclass
class DevicePlan:
    """Everything about the grads of one call that live on one device."""

    device: torch.device
    positions: tuple[int, ...]  # where these grads sit in the call's list
    numels: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    dtype_groups: dict[torch.dtype, tuple[int, ...]]  # local indices per dtype
    strided: tuple[int, ...]  # local indices of grads that are not dense in memory
    addresses: tuple[int, ...]  # data_ptr of each grad (0 where unknown)
    has_storage: bool  # addresses are real (not meta, fake or wrapper tensors)
    whole_call: bool  # these are all the call's grads, in order
    kernel_reason: str | None  # why the kernel backends cannot take these grads, if they cannot
    chunk_elements: int = CHUNK_ELEMENTS
    scratch: dict[Any, Any] = field(default_factory=dict)  # per-backend workspaces
    _tables: dict[torch.device, KernelTables] = field(default_factory=dict)
    _staging: dict[int, Tensor] | None = None
    _aliased: bool | None = None
    _upload_source: Tensor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def num_tensors(self) -> int:
        return len(self.numels)

    @property
    def has_empty(self) -> bool:
        return 0 in self.numels

    @property
    def has_fp64(self) -> bool:
        return torch.float64 in self.dtype_groups

    def first_empty(self) -> int | None:
        return self.positions[self.numels.index(0)] if 0 in self.numels else None

    def grads(self, call_grads: list[Tensor]) -> list[Tensor]:
        """This device's grads, picked from the call's list."""
        if self.whole_call:
            return call_grads
        return [call_grads[i] for i in self.positions]

    @property
    def aliased(self) -> bool:
        """True when two grads share memory (e.g. one grad listed twice): scaling must not race."""
        if self._aliased is None:
            tables = None if self.strided else self._tables.get(_CPU)
            if tables is not None:  # its columns, as tensors already: no conversion of long tuples
                starts, sizes = tables.addresses, tables.numels * _ITEMSIZE_OF_CODE[tables.dtype_codes]
            else:
                starts, sizes = _byte_spans(self.addresses, self.numels, self.dtype_groups)
            self._aliased = _spans_overlap(starts, sizes)
        return self._aliased

    def rebased(self, address_column: bytes) -> DevicePlan:
        """This plan for grads of the same layout at other addresses (no strided grads), given as
        native int64 values (the cache key's first column): the chunk tables are reused and only the
        address column is rewritten, so a training loop whose grads are reallocated every step
        (``zero_grad(set_to_none=True)``) does not rebuild its plan."""
        if self.strided or not self.has_storage:
            raise ValueError("only plans of dense grads with storage can be rebased")
        tables: dict[torch.device, KernelTables] = {}
        cpu_tables = self._tables.get(_CPU)
        if cpu_tables is not None:
            packed = cpu_tables.packed.clone()
            # a writable copy: torch warns when it wraps read-only memory
            packed[: self.num_tensors] = torch.frombuffer(bytearray(address_column), dtype=torch.int64)
            tables[_CPU] = _slice_tables(
                packed, cpu_tables.num_tensors, cpu_tables.num_chunks, cpu_tables.chunk_elements, cpu_tables.max_numel
            )
        # fresh workspaces and lock: plans of one layout may serve different grads at the same time
        return replace(
            self,
            addresses=tuple(memoryview(address_column).cast("q")),
            scratch={},
            _tables=tables,
            _staging=None,
            _aliased=None,
            _upload_source=None,
            _lock=threading.Lock(),
        )

    def kernel_tables(self, grads: list[Tensor]) -> KernelTables:
        """Tables on this plan's device; strided grads are redirected to staging buffers."""
        tables = self._tables.get(self.device)
        if tables is None:
            with self._lock:
                tables = self._tables.get(self.device)
                if tables is None:
                    tables = self._build_kernel_tables(grads)
        return tables

    def _build_kernel_tables(self, grads: list[Tensor]) -> KernelTables:
        if self.kernel_reason is not None:
            raise RuntimeError(self.kernel_reason)
        cpu_tables = self._tables.get(_CPU)  # present in a rebased plan
        if cpu_tables is None:
            addresses = list(self.addresses)
            if self.strided:
                self._staging = {
                    i: torch.empty_like(grads[i], memory_format=torch.contiguous_format) for i in self.strided
                }
                for i, buffer in self._staging.items():
                    addresses[i] = buffer.data_ptr()
            codes = [DTYPE_CODES[dtype] for dtype in self.dtypes]
            cpu_tables = build_tables(addresses, list(self.numels), codes, self.chunk_elements)
            self._tables[_CPU] = cpu_tables
        if self.device.type == "cpu":
            tables = cpu_tables
        elif self.device.type == "cuda":
            # from pinned memory, asynchronously: building a plan never synchronises the host
            # (the pinned source stays referenced until the plan dies, so the copy cannot outlive it)
            self._upload_source = cpu_tables.packed.pin_memory()
            tables = _slice_tables(
                self._upload_source.to(self.device, non_blocking=True),
                cpu_tables.num_tensors,
                cpu_tables.num_chunks,
                cpu_tables.chunk_elements,
                cpu_tables.max_numel,
            )
        else:
            tables = cpu_tables.to(self.device)
        self._tables[self.device] = tables
        return tables

    def stage_in(self, grads: list[Tensor]) -> None:
        """Copy non-dense grads into their staging buffers (before a kernel reads them)."""
        if self._staging:
            for i, buffer in self._staging.items():
                buffer.copy_(grads[i])

    def stage_out(self, grads: list[Tensor]) -> None:
        """Copy staging buffers back into non-dense grads (after a kernel wrote them)."""
        if self._staging:
            for i, buffer in self._staging.items():
                grads[i].copy_(buffer)


@dataclass
class Plan:
    """The grads of one call, grouped by device (the first grad's device first)."""

    devices: list[DevicePlan]
    result_dtype: torch.dtype  # torch's promotion over the grads' (real) dtypes

    @property
    def first_device(self) -> torch.device:
        return self.devices[0].device

    @property
    def single(self) -> DevicePlan | None:
        return self.devices[0] if len(self.devices) == 1 else None


class PlainTensors(list):
    """A list whose items were checked to be plain torch.Tensor or Parameter objects.

    The public functions check the types of the grads once per call (``inputs.grads_of``,
    ``inputs.check_tensors``) and pass this list on, so the later checks (``all_plain``, the plan
    cache) cost nothing per tensor. Never mutated after the check.

    ``key_parts``, when set, holds what :func:`_cache_key` would read from these tensors (the
    columns of :func:`_key_columns`), gathered in the same pass that read the ``.grad`` attributes;
    ``null_address`` whether any address is 0.
    """

    __slots__ = ("key_parts", "null_address")


def _byte_spans(
    addresses: tuple[int, ...], numels: tuple[int, ...], dtype_groups: dict[torch.dtype, tuple[int, ...]]
) -> tuple[Tensor, Tensor]:
    """(start address, size in bytes) of every grad, as int64 tensors."""
    starts = torch.tensor(addresses, dtype=torch.int64)
    sizes = torch.tensor(numels, dtype=torch.int64)
    if len(dtype_groups) == 1:
        return starts, sizes * next(iter(dtype_groups)).itemsize
    itemsizes = torch.empty_like(sizes)
    for dtype, indices in dtype_groups.items():
        itemsizes[torch.tensor(indices, dtype=torch.int64)] = dtype.itemsize
    return starts, sizes * itemsizes


def _spans_overlap(starts: Tensor, sizes: Tensor) -> bool:
    """True when two of the non-empty byte spans [start, start + size) overlap (vectorised: a plan
    may describe tens of thousands of grads)."""
    nonempty = sizes > 0
    starts, sizes = starts[nonempty], sizes[nonempty]
    starts, order = torch.sort(starts)
    ends = starts + sizes[order]
    # sorted by start, some pair overlaps exactly when some span starts before the previous one ends
    return bool((starts[1:] < ends[:-1]).any())


def all_plain(tensors: list[Tensor]) -> bool:
    """True when every item is a plain torch.Tensor or Parameter (no DTensor or other subclass)."""
    return type(tensors) is PlainTensors or set(map(type, tensors)) <= PLAIN_TENSOR_TYPES


def _kernel_reason(dtypes: set[torch.dtype]) -> str | None:
    unsupported = sorted(str(dtype) for dtype in dtypes if dtype not in DTYPE_CODES)
    if unsupported:
        return f"the kernels take float32, float16, bfloat16 and float64 grads, not {', '.join(unsupported)}"
    return None


def _check_grad(index: int, grad: Tensor) -> None:
    if grad.layout != torch.strided:
        raise TypeError(
            f"gradient {index} has layout {grad.layout}; fusedclip takes dense (strided) gradients."
            " Convert sparse gradients with .to_dense() first."
        )
    if not (grad.is_floating_point() or grad.is_complex()):
        raise TypeError(
            f"gradient {index} has dtype {grad.dtype}; gradients must be floating point"
            " (float32, float16, bfloat16, float64) or complex"
        )


def build_plan(grads: list[Tensor], has_storage: bool, chunk_elements: int = CHUNK_ELEMENTS) -> Plan:
    """Group grads by device and describe each group (no caching here)."""
    by_device: dict[torch.device, list[int]] = {}
    for index, grad in enumerate(grads):
        _check_grad(index, grad)
        by_device.setdefault(grad.device, []).append(index)
    all_dtypes = {grad.dtype for grad in grads}
    result_dtype = functools.reduce(torch.promote_types, sorted({real_dtype(d) for d in all_dtypes}, key=str))
    devices = []
    for device, positions in by_device.items():
        local = [grads[i] for i in positions]
        dtypes = tuple(grad.dtype for grad in local)
        groups: dict[torch.dtype, list[int]] = {}
        for i, dtype in enumerate(dtypes):
            groups.setdefault(dtype, []).append(i)
        devices.append(
            DevicePlan(
                device=device,
                positions=tuple(positions),
                numels=tuple(grad.numel() for grad in local),
                dtypes=dtypes,
                dtype_groups={dtype: tuple(ix) for dtype, ix in groups.items()},
                strided=tuple(i for i, grad in enumerate(local) if has_storage and not is_dense(grad)),
                addresses=tuple(grad.data_ptr() for grad in local) if has_storage else (0,) * len(local),
                has_storage=has_storage,
                whole_call=len(by_device) == 1,
                kernel_reason=_kernel_reason(set(dtypes)) if has_storage else "these tensors have no storage",
                chunk_elements=chunk_elements,
            )
        )
    return Plan(devices=devices, result_dtype=result_dtype)


class PlanCache:
    """A small thread-safe LRU of plans, keyed by the memory layout of the grads."""

    def __init__(self, size: int = CACHE_SIZE, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.size = size
        self.chunk_elements = chunk_elements
        self._plans: OrderedDict[_PlanKey, tuple[_PlanKey, Plan]] = OrderedDict()
        # plans used while a CUDA graph was being captured: a replay reads their tables and
        # workspaces, so they are never evicted (clear() releases them)
        self._pinned: dict[_PlanKey, Plan] = {}
        # one plan per layout (sizes, dtypes, device; no addresses), from which a plan for grads of
        # that layout at new addresses is made without rebuilding its chunk tables
        self._layouts: OrderedDict[_PlanKey, Plan] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.rebased = 0  # misses served by rebasing a plan of the same layout

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._pinned.clear()
            self._layouts.clear()

    def __len__(self) -> int:
        return len(self._plans)

    def plan_for(self, grads: list[Tensor]) -> Plan:
        """The plan for these grads; built (and cached) when their layout has not been seen."""
        if not all_plain(grads):
            return build_plan(grads, False, self.chunk_elements)  # wrapper/fake tensors: no addresses
        key = _cache_key(grads)
        if key is None:
            return build_plan(grads, False, self.chunk_elements)
        with self._lock:
            entry = self._plans.get(key)
            if entry is not None:
                stored_key, plan = entry
                self._plans.move_to_end(stored_key)  # found by identity: no second comparison
                self.hits += 1
            else:
                plan = self._pinned.get(key)
        if plan is None:
            plan = self._plan_on_miss(key, grads)
        if grads[0].is_cuda and torch.cuda.is_current_stream_capturing():
            with self._lock:
                self._pinned[key] = plan
        return plan

    def _plan_on_miss(self, key: _PlanKey, grads: list[Tensor]) -> Plan:
        """A new plan for a key not in the cache: the plan of the same layout rebased onto these
        grads' addresses when there is one, else built; cached either way."""
        layout = key.layout()
        with self._lock:
            same_layout = None if layout is None else self._layouts.get(layout)
            if same_layout is not None:
                self._layouts.move_to_end(layout)
        # the key names only the first grad's device when no address is null (see _cache_key)
        if same_layout is not None and _all_on(grads, same_layout.first_device):
            rebased = same_layout.devices[0].rebased(key.parts[0])
            plan = Plan([rebased], same_layout.result_dtype)
        else:
            same_layout = None
            plan = build_plan(grads, True, self.chunk_elements)
        with self._lock:
            self.misses += 1
            self._plans[key] = (key, plan)
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
            if same_layout is not None:
                self.rebased += 1
            elif layout is not None and plan.single is not None and not plan.single.strided:
                self._layouts[layout] = plan  # the first plan of a layout serves its later rebases
                while len(self._layouts) > self.size:
                    self._layouts.popitem(last=False)
        return plan


_get_dtype = operator.attrgetter("dtype")
_get_nbytes = operator.attrgetter("nbytes")
_get_device = operator.attrgetter("device")
_get_is_cpu = operator.attrgetter("is_cpu")


def _all_on(grads: list[Tensor], device: torch.device) -> bool:
    """True when every grad lives on ``device`` (``is_cpu`` costs half of ``.device``)."""
    if device.type == "cpu":
        return all(map(_get_is_cpu, grads))
    return set(map(_get_device, grads)) == {device}


class _PlanKey:
    """A cache key that hashes its long tuple once (a lookup and the LRU update would each hash it)."""

    __slots__ = ("_hash", "parts")

    def __init__(self, parts: tuple) -> None:
        self.parts = parts
        self._hash = hash(parts)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PlanKey) and self._hash == other._hash and self.parts == other.parts

    def layout(self) -> _PlanKey | None:
        """The key without the addresses, for grads that are all dense and on one device with no null
        address (None otherwise): grads with the same layout can share chunk tables."""
        # five parts, the fifth a device: no null address (see _cache_key) and no strided grads
        if len(self.parts) != 5 or not isinstance(self.parts[4], torch.device):
            return None
        return _PlanKey(self.parts[1:])


def _key_columns(
    addresses: Iterable[int], nbytes: Iterable[int], dtypes: Iterable[torch.dtype], contiguous: Iterable[bool]
) -> tuple[bytes, bytes, bytes, bytes]:
    """The key's columns as flat byte strings (one compare or hash each, however many grads), the
    same bytes the extension's gather packs: int64 addresses, int64 sizes in bytes, int64 dtype
    identities (dtype objects are immortal singletons) and one byte of contiguity per grad."""
    return (
        array("q", addresses).tobytes(),
        array("q", nbytes).tobytes(),
        array("q", map(id, dtypes)).tobytes(),
        bytes(map(int, contiguous)),
    )


def _cache_key(grads: list[Tensor]) -> _PlanKey | None:
    """Address, size (in bytes), dtype and contiguity of every grad: what makes a cached plan safe to reuse."""
    parts = getattr(grads, "key_parts", None)  # read by the extension with the .grad attributes
    if parts is not None:
        key: tuple = parts
        null_address = grads.null_address  # type: ignore[attr-defined]
    else:
        try:
            addresses = tuple(map(Tensor.data_ptr, grads))
        except RuntimeError:  # tensors without storage (meta-like or functional wrappers)
            return None
        null_address = 0 in addresses
        # nbytes (a cheap attribute) with the dtype determines numel (a slower method call)
        key = _key_columns(addresses, map(_get_nbytes, grads), map(_get_dtype, grads), map(Tensor.is_contiguous, grads))
    if null_address:
        # Null addresses (empty or meta tensors) are not unique across devices; elsewhere, unified
        # virtual addressing keeps addresses of live CPU and CUDA memory apart.
        key += (tuple(map(_get_device, grads)),)
    else:
        key += (grads[0].device,)
    contiguous = key[3]
    if 0 in contiguous:
        key += (tuple((g.shape, g.stride()) for g, c in zip(grads, contiguous) if not c),)
    return _PlanKey(key)


#: the process-wide plan cache
PLANS = PlanCache()
