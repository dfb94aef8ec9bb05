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

Grads that are not dense in memory (e.g. ``x[:, ::2]``) are copied into staging buffers before a
kernel runs and copied back after a kernel writes: in place from the caller's point of view. The
staging buffers belong to one primitive of one call (:meth:`DevicePlan.bind`), never to a cached
plan, so the cache never keeps grad-sized memory alive (see :class:`PlanCache` for what it keeps).
Dense but permuted grads (transposes, channels-last) are used in place, since norms and scaling do
not depend on element order.

Memory is judged by each grad's true extent, from its sizes and strides (:func:`span_bytes`), not by
its element count: ``buf[::2]`` reaches as far as ``buf[:-1]``. Grads whose extents overlap are
scaled one tensor after another, as torch does (:attr:`DevicePlan.aliased`); a grad whose own
elements share memory (``expand``) cannot be written in place at all, and :func:`check_writable`
refuses it, like an inference tensor, before any grad is written.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .codes import DTYPE_CODES

#: largest chunk, in elements; a power of two so chunk starts stay aligned like the tensor base
CHUNK_ELEMENTS = 1 << 16
_CPU = torch.device("cpu")
#: element size of each dtype code (indexed by code); every tensor made here names its device, so
#: a default device set by the caller (``torch.set_default_device('meta')``) never leaks in
_ITEMSIZE_OF_CODE = torch.tensor(
    [dtype.itemsize for dtype, _ in sorted(DTYPE_CODES.items(), key=lambda item: item[1])], device=_CPU
)

#: plans kept in the cache (a training loop needs one or two)
CACHE_SIZE = 16
#: largest grad (in elements) whose self-overlap is decided exactly when its strides interleave;
#: beyond it such a grad counts as self-overlapping (only exotic ``as_strided`` layouts get there)
EXACT_OVERLAP_LIMIT = 1 << 24

_REAL_OF_COMPLEX = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}
PLAIN_TENSOR_TYPES = frozenset({Tensor, torch.nn.Parameter})


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a norm of a tensor of ``dtype`` (complex -> its real counterpart)."""
    return _REAL_OF_COMPLEX.get(dtype, dtype)


def result_dtype_of(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype of the norm of tensors of these dtypes: torch's type promotion over their real
    counterparts (all-bf16 gives bf16; bf16 with float32 gives float32)."""
    return functools.reduce(torch.promote_types, sorted({real_dtype(dtype) for dtype in dtypes}, key=str))


def is_dense(tensor: Tensor) -> bool:
    """True when the tensor's elements fill one gap-free, non-overlapping span of memory: its
    dimensions, taken in order of stride, each step exactly over what the smaller ones cover.
    (Written without a sort, so that ``torch.compile`` can trace it.)"""
    if tensor.is_contiguous():
        return True
    dims = [(size, stride) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1]
    expected = 1
    while dims:
        for dim in dims:
            if dim[1] == expected:
                break
        else:
            return False
        dims.remove(dim)
        expected *= dim[0]
    return True


def span_bytes(tensor: Tensor) -> int:
    """Bytes from the tensor's data address to the end of its last element: its true extent in
    memory (strides are never negative in torch, so the data address is the lowest one).

    For a dense tensor this is ``nbytes``; for a view with gaps (``buf[::2]``) it is larger, and
    only this extent tells whether two grads can share memory. 0 for a tensor without elements.
    """
    if tensor.is_contiguous():
        return tensor.nbytes
    if tensor.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (last + 1) * tensor.element_size()


def self_overlapping(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True when two elements of a tensor of this shape and these strides share memory (an
    ``expand``-ed or overlapping ``as_strided`` view): such a tensor cannot be written in place."""
    if math.prod(shape) <= 1:
        return False
    extent = 0  # the largest offset the dimensions of smaller stride reach
    for stride_, size in sorted((st, sz) for sz, st in zip(shape, stride) if sz > 1):
        if stride_ <= extent:  # stride 0, or interleaved with a smaller dimension
            break
        extent += (size - 1) * stride_
    else:
        return False  # each dimension steps past everything the smaller ones reach
    if math.prod(shape) > EXACT_OVERLAP_LIMIT:
        return True
    offsets = torch.zeros(1, dtype=torch.int64, device=_CPU)
    for size, stride_ in zip(shape, stride):
        steps = torch.arange(size, dtype=torch.int64, device=_CPU) * stride_
        offsets = (offsets[:, None] + steps).reshape(-1)
    return torch.unique(offsets).numel() != offsets.numel()


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
    #: on CUDA: the upload's event and the streams already ordered after it (see UploadOrder)
    order: UploadOrder | None = field(default=None, compare=False, repr=False)

    def to(self, device: torch.device) -> KernelTables:
        return _slice_tables(
            self.packed.to(device), self.num_tensors, self.num_chunks, self.chunk_elements, self.max_numel
        )


class UploadOrder:
    """Stream ordering of device tables uploaded asynchronously (no host synchronisation).

    The upload runs on the stream current when the tables are built; a kernel may read them later
    on any stream. Before the first read on a stream other than the upload's, that stream waits on
    the upload's event (a device-side wait, not a launch, not a host sync) and the table memory is
    recorded as used by that stream (``record_stream``), so when the plan dies (evicted from the
    cache) the allocator does not hand the memory out again before that stream's reads are done.
    Later reads on the same stream are ordered after the first by the stream itself.
    """

    __slots__ = ("event", "packed", "streams", "_lock")

    def __init__(self, event: Any, packed: Tensor, upload_stream: int) -> None:
        self.event = event
        self.packed = packed
        self.streams = {upload_stream}  # handles of the streams ordered after the upload
        self._lock = threading.Lock()

    def ready_on(self, stream: Any) -> None:
        """Order ``stream`` (a ``torch.cuda.Stream``) after the upload, once per stream."""
        handle = stream.cuda_stream
        if handle in self.streams:
            return
        with self._lock:
            if handle not in self.streams:
                stream.wait_event(self.event)
                self.packed.record_stream(stream)
                self.streams.add(handle)


def _slice_tables(packed: Tensor, t: int, c: int, chunk_elements: int, max_numel: int) -> KernelTables:
    cuts = [t, t, t, t + 1, c, c]
    parts = torch.split(packed, cuts)
    return KernelTables(packed, *parts, num_tensors=t, num_chunks=c, chunk_elements=chunk_elements, max_numel=max_numel)


def build_tables(addresses: list[int], numels: list[int], codes: list[int], chunk_elements: int) -> KernelTables:
    """Chunk every tensor into pieces of at most ``chunk_elements`` elements (vectorised, on the CPU)."""
    t = len(numels)
    numel_t = torch.tensor(numels, dtype=torch.int64, device=_CPU)
    chunks_per_tensor = (numel_t + (chunk_elements - 1)) // chunk_elements
    first_chunk = torch.zeros(t + 1, dtype=torch.int64, device=_CPU)
    torch.cumsum(chunks_per_tensor, 0, out=first_chunk[1:])
    c = int(first_chunk[-1])
    arange_t = torch.arange(t, dtype=torch.int64, device=_CPU)
    chunk_tensor = torch.repeat_interleave(arange_t, chunks_per_tensor, output_size=c)
    chunk_start = (torch.arange(c, dtype=torch.int64, device=_CPU) - first_chunk[chunk_tensor]) * chunk_elements
    packed = torch.cat(
        [
            torch.tensor(addresses, dtype=torch.int64, device=_CPU),
            numel_t,
            torch.tensor(codes, dtype=torch.int64, device=_CPU),
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
    spans: tuple[int, ...] = ()  # span_bytes of each grad (its extent from its address; 0 if unknown)
    write_reason: str | None = None  # why some grad cannot be written in place (see check_writable)
    scratch: dict[Any, Any] = field(default_factory=dict)  # per-backend workspaces
    _tables: dict[torch.device, KernelTables] = field(default_factory=dict)
    _staging: dict[int, Tensor] | None = None  # set only in a plan bound to one call (see bind)
    _aliased: bool | None = None
    _upload_source: Tensor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def num_tensors(self) -> int:
        return len(self.numels)

    def first_empty(self) -> int | None:
        return self.positions[self.numels.index(0)] if 0 in self.numels else None

    def grads(self, call_grads: list[Tensor]) -> list[Tensor]:
        """This device's grads, picked from the call's list."""
        if self.whole_call:
            return call_grads
        return [call_grads[i] for i in self.positions]

    @property
    def aliased(self) -> bool:
        """True when the memory extents of two grads overlap (one grad listed twice, views sharing
        elements, interleaved strided views): scaling must then go one tensor after another, as in
        torch, so shared elements are scaled once per grad that holds them and no two programs race."""
        if self._aliased is None:
            if not self.has_storage:
                self._aliased = False  # no addresses; the torch backend runs these one op at a time anyway
                return False
            tables = None if self.strided else self._tables.get(_CPU)
            if tables is not None:  # dense grads span numel * itemsize: the columns, as tensors already
                starts, sizes = tables.addresses, tables.numels * _ITEMSIZE_OF_CODE[tables.dtype_codes]
            else:
                starts, sizes = _byte_spans(self.addresses, self.spans)
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
            # a writable copy: torch warns when it wraps read-only memory (frombuffer is always on the CPU)
            packed[: self.num_tensors] = torch.frombuffer(bytearray(address_column), dtype=torch.int64)
            tables[_CPU] = _slice_tables(
                packed, cpu_tables.num_tensors, cpu_tables.num_chunks, cpu_tables.chunk_elements, cpu_tables.max_numel
            )
        addresses = tuple(memoryview(address_column).cast("q"))
        # fresh workspaces and lock: plans of one layout may serve different grads at the same time
        return replace(
            self,
            addresses=addresses,
            kernel_reason=_alignment_reason(self.positions, addresses, self.dtypes) or _kernel_reason(set(self.dtypes)),
            scratch={},
            _tables=tables,
            _staging=None,
            _aliased=None,
            _upload_source=None,
            _lock=threading.Lock(),
        )

    def bind(self, grads: list[Tensor]) -> DevicePlan:
        """The plan to launch one primitive with: this plan itself when every grad is dense; else a
        copy for this call only, whose tables point at fresh staging buffers for the strided grads
        (:meth:`stage_in` fills them, :meth:`stage_out` copies them back).

        The copy, its staging buffers and its workspaces die with the call, so no cached plan holds
        memory proportional to the grads. While a CUDA graph is being captured the copy is kept by
        this plan instead: a replay reads its tables and buffers.
        """
        if not self.strided or self._staging is not None:
            return self
        if self.kernel_reason is not None:
            raise RuntimeError(self.kernel_reason)
        staging = {i: torch.empty_like(grads[i], memory_format=torch.contiguous_format) for i in self.strided}
        cpu_tables = self._cpu_tables()
        packed = cpu_tables.packed.clone()
        index = torch.tensor(self.strided, dtype=torch.int64, device=_CPU)
        packed[index] = torch.tensor([buffer.data_ptr() for buffer in staging.values()], dtype=torch.int64, device=_CPU)
        tables = _slice_tables(
            packed, cpu_tables.num_tensors, cpu_tables.num_chunks, cpu_tables.chunk_elements, cpu_tables.max_numel
        )
        bound = replace(
            self,
            scratch={},
            _tables={_CPU: tables},
            _staging=staging,
            _aliased=self.aliased,
            _upload_source=None,
            _lock=threading.Lock(),
        )
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            with self._lock:
                self.scratch.setdefault(_CAPTURED_BINDINGS, []).append(bound)
        return bound

    def kernel_tables(self, grads: list[Tensor]) -> KernelTables:
        """Tables on this plan's device, safe to read on the current stream. A plan with strided
        grads has tables only once bound to a call's staging buffers (:meth:`bind`).

        CUDA: eager launches share the plan's tables, and the current stream is ordered after their
        upload (:class:`UploadOrder`). A launch being captured into a CUDA graph gets tables of its
        own, uploaded inside the capture (the graph re-uploads them, a small host-to-device copy,
        on every replay, so nothing it reads depends on work outside it) and kept alive by this plan.
        """
        if self.strided and self._staging is None:
            raise RuntimeError("internal error: a plan with strided grads must be bound to a call (DevicePlan.bind)")
        cuda = self.device.type == "cuda"
        if cuda and torch.cuda.is_current_stream_capturing():
            return self._captured_tables()
        tables = self._tables.get(self.device)
        if tables is None:
            with self._lock:
                tables = self._tables.get(self.device)
                if tables is None:
                    tables = self._build_kernel_tables()
        if cuda and tables.order is not None:
            tables.order.ready_on(torch.cuda.current_stream(self.device))
        return tables

    def _captured_tables(self) -> KernelTables:
        """Tables uploaded inside the CUDA graph capture in progress, kept with the plan for its replays."""
        if self.kernel_reason is not None:
            raise RuntimeError(self.kernel_reason)
        cpu_tables = self._tables.get(_CPU) or self._cpu_tables()
        with self._lock:
            if self._upload_source is None:
                self._upload_source = cpu_tables.packed.pin_memory()
            source = self._upload_source
        tables = _slice_tables(
            source.to(self.device, non_blocking=True),
            cpu_tables.num_tensors,
            cpu_tables.num_chunks,
            cpu_tables.chunk_elements,
            cpu_tables.max_numel,
        )
        with self._lock:
            self.scratch.setdefault(_CAPTURED_TABLES, []).append(tables)
        return tables

    def workspace(self, kind: str, stream: Any, make: Callable[[], Any], capturing: bool) -> Any:
        """The workspace ``kind`` (a backend's scratch memory) for a launch on ``stream`` (its handle,
        or a tuple of the handle and whatever else tells the backend's workspaces apart).

        The rule: an eager launch uses the workspace of (kind, stream), made by ``make`` on that
        stream at its first use there, so the allocator's stream is the only stream that touches it.
        A launch being captured into a CUDA graph gets a fresh one, made inside the capture (from the
        graph's memory pool) and kept alive by this plan for the graph's replays: a graph's workspace
        is never shared with eager launches (even on the capturing stream) nor with another graph, so
        graphs and eager calls may interleave and graphs may replay concurrently.
        """
        if capturing:
            made = make()
            with self._lock:
                self.scratch.setdefault((kind, _CAPTURED_WORKSPACES), []).append(made)
            return made
        key = (kind, stream)
        found = self.scratch.get(key)
        if found is None:
            with self._lock:
                found = self.scratch.get(key)
                if found is None:
                    found = self.scratch[key] = make()
        return found

    def _cpu_tables(self) -> KernelTables:
        """The tables on the CPU, built once (strided grads' addresses are 0 until bound to a call)."""
        tables = self._tables.get(_CPU)
        if tables is None:
            if self.kernel_reason is not None:
                raise RuntimeError(self.kernel_reason)
            with self._lock:
                tables = self._tables.get(_CPU)
                if tables is None:
                    addresses = list(self.addresses)
                    for i in self.strided:
                        addresses[i] = 0
                    codes = [DTYPE_CODES[dtype] for dtype in self.dtypes]
                    tables = build_tables(addresses, list(self.numels), codes, self.chunk_elements)
                    self._tables[_CPU] = tables
        return tables

    def _build_kernel_tables(self) -> KernelTables:
        if self.kernel_reason is not None:
            raise RuntimeError(self.kernel_reason)
        cpu_tables = self._tables.get(_CPU)  # present in a rebased or bound plan
        if cpu_tables is None:
            codes = [DTYPE_CODES[dtype] for dtype in self.dtypes]
            cpu_tables = build_tables(list(self.addresses), list(self.numels), codes, self.chunk_elements)
            self._tables[_CPU] = cpu_tables
        if self.device.type == "cpu":
            tables = cpu_tables
        elif self.device.type == "cuda":
            # from pinned memory, asynchronously: building a plan never synchronises the host
            # (the pinned source stays referenced until the plan dies, so the copy cannot outlive it);
            # an event after the copy orders the other streams that read the tables (UploadOrder)
            if self._upload_source is None:
                self._upload_source = cpu_tables.packed.pin_memory()
            stream = torch.cuda.current_stream(self.device)
            packed = self._upload_source.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            tables = replace(
                _slice_tables(
                    packed,
                    cpu_tables.num_tensors,
                    cpu_tables.num_chunks,
                    cpu_tables.chunk_elements,
                    cpu_tables.max_numel,
                ),
                order=UploadOrder(event, packed, stream.cuda_stream),
            )
        else:
            tables = cpu_tables.to(self.device)
        self._tables[self.device] = tables
        return tables

    def stage_in(self, grads: list[Tensor]) -> None:
        """Copy non-dense grads into this call's staging buffers (before a kernel reads them)."""
        if self._staging:
            for i, buffer in self._staging.items():
                buffer.copy_(grads[i])

    def stage_out(self, grads: list[Tensor]) -> None:
        """Copy this call's staging buffers back into non-dense grads (after a kernel wrote them)."""
        if self._staging:
            for i, buffer in self._staging.items():
                grads[i].copy_(buffer)

    def retained_bytes(self) -> int:
        """Bytes of tensor memory this plan keeps alive: its tables (on the CPU, the device, and a
        pinned upload copy) and the backends' workspaces. Never a copy of a grad."""
        seen: dict[int, int] = {}
        for tables in self._tables.values():
            _note_storage(tables.packed, seen)
        if self._upload_source is not None:
            _note_storage(self._upload_source, seen)
        for value in self.scratch.values():
            _note_tensors(value, seen)
        if self._staging:
            for buffer in self._staging.values():
                _note_storage(buffer, seen)
        return sum(seen.values())

    def table_bytes_bound(self) -> int:
        """What :meth:`retained_bytes` may reach for the tables: ``8 * (4T + 1 + 2C)`` bytes per copy
        (T grads, C chunks, ``C <= T + elements / chunk_elements``), three copies on CUDA (CPU,
        pinned, device), two on other accelerators, one on the CPU."""
        chunks = sum(-(-n // self.chunk_elements) for n in self.numels)
        copies = {"cpu": 1, "cuda": 3}.get(self.device.type, 2)
        return 8 * (4 * self.num_tensors + 1 + 2 * chunks) * copies

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


def _byte_spans(addresses: tuple[int, ...], spans: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(start address, extent in bytes) of every grad, as int64 tensors on the CPU."""
    return torch.tensor(addresses, dtype=torch.int64, device=_CPU), torch.tensor(spans, dtype=torch.int64, device=_CPU)


def _spans_overlap(starts: Tensor, sizes: Tensor) -> bool:
    """True when two of the non-empty byte spans [start, start + size) overlap (vectorised: a plan
    may describe tens of thousands of grads)."""
    nonempty = sizes > 0
    starts, sizes = starts[nonempty], sizes[nonempty]
    starts, order = torch.sort(starts)
    ends = starts + sizes[order]
    # sorted by start, some pair overlaps exactly when some span starts before the previous one ends
    return bool((starts[1:] < ends[:-1]).any())


#: key in DevicePlan.scratch of the per-call plans bound while a CUDA graph was being captured
_CAPTURED_BINDINGS = "fusedclip.plan: bound during capture"
#: key in DevicePlan.scratch of the device tables uploaded inside CUDA graph captures
_CAPTURED_TABLES = "fusedclip.plan: tables uploaded during capture"
#: second part of the DevicePlan.scratch key of the workspaces made during CUDA graph captures
_CAPTURED_WORKSPACES = "captured"


def _note_storage(tensor: Tensor, seen: dict[int, int]) -> None:
    storage = tensor.untyped_storage()
    seen[storage.data_ptr() or id(storage)] = storage.nbytes()


def _note_tensors(value: Any, seen: dict[int, int], depth: int = 0) -> None:
    """Note the storages of the tensors in ``value`` (a tensor, a container, or an object whose
    attributes hold tensors: the backends' workspaces), a few levels deep."""
    if isinstance(value, Tensor):
        _note_storage(value, seen)
    elif depth < 3:
        if isinstance(value, dict):
            items: Iterable[Any] = value.values()
        elif isinstance(value, (list, tuple)):
            items = value
        elif isinstance(value, DevicePlan):
            seen[id(value)] = value.retained_bytes()
            return
        else:
            items = list(getattr(value, "__dict__", {}).values())
            items += [getattr(value, name, None) for name in getattr(type(value), "__slots__", ())]
        for item in items:
            _note_tensors(item, seen, depth + 1)


def all_plain(tensors: list[Tensor]) -> bool:
    """True when every item is a plain torch.Tensor or Parameter (no DTensor or other subclass)."""
    return type(tensors) is PlainTensors or set(map(type, tensors)) <= PLAIN_TENSOR_TYPES


def _kernel_reason(dtypes: set[torch.dtype]) -> str | None:
    unsupported = sorted(str(dtype) for dtype in dtypes if dtype not in DTYPE_CODES)
    if unsupported:
        return f"the kernels take float32, float16, bfloat16 and float64 grads, not {', '.join(unsupported)}"
    return None


def _alignment_reason(
    positions: Iterable[int], addresses: tuple[int, ...], dtypes: tuple[torch.dtype, ...]
) -> str | None:
    """Why the kernel backends refuse these grads when one starts at an address that is not a
    multiple of its element size (a view made with ``set_``/``as_strided`` on a byte offset of a
    storage, ``torch.frombuffer(..., offset=1)``), or None. The kernels load whole elements; such a
    load faults on a GPU and is undefined in C++, so these grads are refused up front, before any
    grad is read or written (the torch backend, chosen automatically, takes them)."""
    if not addresses:
        return None
    column = torch.frombuffer(array("q", addresses), dtype=torch.int64)
    if not bool((column & 7).any()):  # 8-byte aligned: every element size here divides 8
        return None
    for position, address, dtype in zip(positions, addresses, dtypes):
        if address % dtype.itemsize:
            return (
                f"gradient {position} ({dtype}) starts at address {address:#x}, which is not a multiple of its"
                f" element size ({dtype.itemsize} bytes); the fused kernels read whole elements and cannot take it."
                " No gradient was read or modified. Use backend='torch' (or leave backend unset), or give the"
                " parameter an aligned gradient (p.grad = p.grad.clone())"
            )
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


def _no_storage_reason(grads: list[Tensor]) -> str:
    """Why the kernel backends cannot take grads whose memory fusedclip cannot see."""
    for grad in grads:
        kind = type(grad)
        if kind not in PLAIN_TENSOR_TYPES:
            return (
                f"the gradients include a {kind.__module__}.{kind.__qualname__}, a torch.Tensor subclass; the"
                " kernel backends read raw memory and take only plain torch.Tensor gradients (use backend='torch',"
                " or leave backend unset to have it chosen)"
            )
    return (
        "the gradients have no memory fusedclip can address (data_ptr() fails: fake, functional or"
        " otherwise storage-less tensors); use backend='torch', or leave backend unset to have it chosen"
    )


def _write_reason(position: int, grad: Tensor) -> str | None:
    """Why ``grad`` cannot be scaled or clamped in place (its elements share memory), or None."""
    if grad.is_contiguous():
        return None
    try:
        shape, stride = tuple(grad.shape), grad.stride()
    except (RuntimeError, NotImplementedError):  # a subclass without strides: torch will say
        return None
    if not self_overlapping(shape, stride):
        return None
    return (
        f"gradient {position} (shape {shape}, strides {stride}) has elements that share memory (an expand()-ed"
        " or overlapping view), so it cannot be modified in place; torch refuses to write it too. No gradient"
        " was modified. Give the parameter a gradient of its own, e.g. p.grad = p.grad.clone()"
    )


def build_plan(grads: list[Tensor], has_storage: bool, chunk_elements: int = CHUNK_ELEMENTS) -> Plan:
    """Group grads by device and describe each group (no caching here)."""
    by_device: dict[torch.device, list[int]] = {}
    for index, grad in enumerate(grads):
        _check_grad(index, grad)
        by_device.setdefault(grad.device, []).append(index)
    result_dtype = result_dtype_of(grad.dtype for grad in grads)
    no_storage = None if has_storage else _no_storage_reason(grads)
    devices = []
    for device, positions in by_device.items():
        local = [grads[i] for i in positions]
        dtypes = tuple(grad.dtype for grad in local)
        groups: dict[torch.dtype, list[int]] = {}
        for i, dtype in enumerate(dtypes):
            groups.setdefault(dtype, []).append(i)
        write_reason = next(filter(None, (_write_reason(p, g) for p, g in zip(positions, local))), None)
        addresses = tuple(grad.data_ptr() for grad in local) if has_storage else (0,) * len(local)
        devices.append(
            DevicePlan(
                device=device,
                positions=tuple(positions),
                numels=tuple(grad.numel() for grad in local),
                dtypes=dtypes,
                dtype_groups={dtype: tuple(ix) for dtype, ix in groups.items()},
                strided=tuple(i for i, grad in enumerate(local) if has_storage and not is_dense(grad)),
                addresses=addresses,
                has_storage=has_storage,
                whole_call=len(by_device) == 1,
                kernel_reason=(_alignment_reason(positions, addresses, dtypes) or _kernel_reason(set(dtypes)))
                if has_storage
                else no_storage,
                chunk_elements=chunk_elements,
                # span_bytes looked up at call time: the tests swap in a broken one to prove they catch it
                spans=tuple(span_bytes(grad) for grad in local) if has_storage else (0,) * len(local),
                write_reason=write_reason,
            )
        )
    return Plan(devices=devices, result_dtype=result_dtype)


def check_writable(works: Iterable[Any]) -> None:
    """Raise ``RuntimeError`` unless every grad of ``works`` (objects with ``.plan``, a
    :class:`DevicePlan`, and ``.grads``, its grads) can be written in place; called before the first
    write of a call, so a refusal leaves every grad untouched (torch would have scaled some first).

    Refused, as torch refuses them: a grad whose elements share memory (``expand``), known from its
    plan; an inference tensor outside ``torch.inference_mode()`` (checked on every call: a new grad
    at a cached address may be one).
    """
    works = list(works)
    for work in works:
        if work.plan.write_reason is not None:
            raise RuntimeError(work.plan.write_reason)
    if torch.is_inference_mode_enabled():
        return  # inside inference mode torch writes inference tensors in place too
    for work in works:
        if any(map(_is_inference, work.grads)):
            local = next(i for i, grad in enumerate(work.grads) if grad.is_inference())
            raise RuntimeError(
                f"gradient {work.plan.positions[local]} is an inference tensor (made under torch.inference_mode())"
                " and cannot be modified in place outside inference mode; torch raises here too. No gradient was"
                " modified. Clip inside torch.inference_mode(), or give the parameter a normal gradient"
                " (p.grad = p.grad.clone() outside inference mode)"
            )


_is_inference = Tensor.is_inference


class PlanCache:
    """A small thread-safe LRU of plans, keyed by the memory layout of the grads.

    What the cache can keep alive is bounded, and never proportional to the grads' bytes:

    * at most ``size`` plans, plus at most ``size`` layout plans (the templates of rebased plans),
      plus the plans used while a CUDA graph was captured (kept until :meth:`clear`);
    * each plan holds only its tables (``8 * (4T + 1 + 2C)`` bytes for T grads in C chunks,
      ``C <= T + elements / chunk_elements``, so about 1/8192 of the bytes of bf16 grads at the
      default chunk size; once on the CPU, again on the plan's device, and a pinned upload copy
      for CUDA: :meth:`DevicePlan.table_bytes_bound`) and the backends' workspaces, which are sized
      by the number of kernel programs, not by the grads;
    * no grad and no staging copy of a grad: staging buffers live for one primitive of one call
      (:meth:`DevicePlan.bind`), except the ones of a CUDA graph capture, which the graph needs.

    :meth:`retained_bytes` measures it.
    """

    def __init__(self, size: int = CACHE_SIZE, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.size = size
        self.chunk_elements = chunk_elements
        self._plans: OrderedDict[PlanKey, tuple[PlanKey, Plan]] = OrderedDict()
        # plans used while a CUDA graph was being captured: a replay reads their tables and
        # workspaces, so they are never evicted (clear() releases them)
        self._pinned: dict[PlanKey, Plan] = {}
        # one plan per layout (sizes, dtypes, device; no addresses), from which a plan for grads of
        # that layout at new addresses is made without rebuilding its chunk tables
        self._layouts: OrderedDict[PlanKey, Plan] = OrderedDict()
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

    def _device_plans(self) -> list[DevicePlan]:
        with self._lock:
            plans = [plan for _, plan in self._plans.values()] + list(self._layouts.values())
            plans += list(self._pinned.values())
        unique = {id(device_plan): device_plan for plan in plans for device_plan in plan.devices}
        return list(unique.values())

    def retained_bytes(self) -> int:
        """Bytes of tensor memory the cached plans keep alive (tables and workspaces)."""
        return sum(device_plan.retained_bytes() for device_plan in self._device_plans())

    def table_bytes_bound(self) -> int:
        """The most the cached plans' tables may take (:meth:`DevicePlan.table_bytes_bound`); the
        workspaces of the ``triton`` and ``cuda`` backends come on top, sized by their programs."""
        return sum(device_plan.table_bytes_bound() for device_plan in self._device_plans())

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

    def _plan_on_miss(self, key: PlanKey, grads: list[Tensor]) -> Plan:
        """A new plan for a key not in the cache: the plan of the same layout rebased onto these
        grads' addresses when there is one, else built; cached either way."""
        layout = key.layout()
        with self._lock:
            same_layout = None if layout is None else self._layouts.get(layout)
            if same_layout is not None:
                self._layouts.move_to_end(layout)
        # the key names only the first grad's device when no address is null (see _cache_key)
        if same_layout is not None and _all_on(grads, same_layout.first_device):
            rebased = same_layout.devices[0].rebased(key.addresses)
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


@dataclass(frozen=True, eq=False)
class PlanKey:
    """What makes a cached plan safe to reuse for a list of grads: two lists with equal keys get
    the same plan.

    It holds every fact a plan is built from and checked against (``build_plan``): each grad's
    address, size in bytes, dtype and contiguity, the strides of non-contiguous grads, and the
    device. A grad with a layout the plan refuses (sparse and other non-strided layouts) has no
    address, so it never gets a key and always meets ``build_plan``'s checks; a dtype the plan
    refuses is part of the key, so a key that hits was checked when its plan was built.
    The columns are flat byte strings (one compare or hash each, however many grads), the bytes
    the extension's gather packs (``csrc/gather.h``).
    """

    #: int64 data address of every grad
    addresses: bytes
    #: int64 size in bytes of every grad (with the dtype, it fixes the element count)
    nbytes: bytes
    #: int64 identity of every grad's dtype (dtype objects are immortal singletons)
    dtypes: bytes
    #: one byte per grad, 1 when contiguous
    contiguous: bytes
    #: the first grad's device, or every grad's when an address is null (null addresses of empty
    #: or meta tensors are not unique across devices; live CPU and CUDA addresses are)
    devices: torch.device | tuple[torch.device, ...]
    #: (shape, stride) of every non-contiguous grad, in order; None when all are contiguous
    strides: tuple[tuple[torch.Size, tuple[int, ...]], ...] | None
    _hash: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # hashed once: a lookup and the LRU update would each hash the long columns
        fields = (self.addresses, self.nbytes, self.dtypes, self.contiguous, self.devices, self.strides)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PlanKey)
            and self._hash == other._hash
            and self.addresses == other.addresses
            and self.nbytes == other.nbytes
            and self.dtypes == other.dtypes
            and self.contiguous == other.contiguous
            and self.devices == other.devices
            and self.strides == other.strides
        )

    def layout(self) -> PlanKey | None:
        """The key without the addresses, for dense grads on one device with no null address (None
        otherwise): grads with the same layout can share chunk tables."""
        if self.strides is not None or not isinstance(self.devices, torch.device):
            return None
        return replace(self, addresses=b"")


def _key_columns(
    addresses: Iterable[int], nbytes: Iterable[int], dtypes: Iterable[torch.dtype], contiguous: Iterable[bool]
) -> tuple[bytes, bytes, bytes, bytes]:
    """The key's four columns as the extension's gather packs them (see :class:`PlanKey`)."""
    return (
        array("q", addresses).tobytes(),
        array("q", nbytes).tobytes(),
        array("q", map(id, dtypes)).tobytes(),
        bytes(map(int, contiguous)),
    )


def _cache_key(grads: list[Tensor]) -> PlanKey | None:
    """The :class:`PlanKey` of these grads; None for grads without addresses (no storage)."""
    columns = getattr(grads, "key_parts", None)  # read by the extension with the .grad attributes
    if columns is not None:
        null_address = grads.null_address  # type: ignore[attr-defined]
    else:
        try:
            addresses = tuple(map(Tensor.data_ptr, grads))
        except RuntimeError:  # tensors without storage (meta-like or functional wrappers)
            return None
        null_address = 0 in addresses
        # nbytes (a cheap attribute) with the dtype determines numel (a slower method call)
        columns = _key_columns(addresses, map(_get_nbytes, grads), map(_get_dtype, grads), map(Tensor.is_contiguous, grads))
    addresses_column, nbytes, dtypes, contiguous = columns
    devices = tuple(map(_get_device, grads)) if null_address else grads[0].device
    strides = None
    if 0 in contiguous:
        strides = tuple((g.shape, g.stride()) for g, c in zip(grads, contiguous) if not c)
    return PlanKey(addresses_column, nbytes, dtypes, contiguous, devices, strides)


#: the process-wide plan cache
PLANS = PlanCache()
