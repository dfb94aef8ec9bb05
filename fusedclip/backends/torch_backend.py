"""The pure-torch backend: runs on every device torch supports, and is the reference for the others.

It follows torch's own recipe (per-tensor norms with ``_foreach_norm``, then a norm of those) with
fusedclip's accuracy rules: per-tensor norms are accumulated in float32 (float64 for float64 grads)
and never rounded to bf16/fp16 on the way, the combination happens in float64, and the coefficient
comes from the unrounded total. ``foreach`` is honoured exactly as torch honours it. General p
(see :mod:`fusedclip.backends.base`) is summed per tensor as ``(|x| / M')^p`` in float64, and every
root is taken by ``scaled_root``. ``scale_`` applies the coefficient as the kernel backends do
(see its docstring for what is decided where).

One exception, for speed: bf16 grads on the CPU (p = 1 and 2). Every torch CPU reduction that
returns float32 from bf16 input first makes a float32 copy of it, and that conversion alone made the
norm pass ~0.55-0.75x as fast as torch's own clip_grad_norm_ (which reduces bf16 in its own dtype);
converting cache-sized pieces into a reused float32 buffer was no faster. So for those grads the
per-tensor norms are torch's, bit for bit: ``_foreach_norm`` in bf16 (float32 accumulation inside,
each per-tensor norm rounded to bf16). They are combined in float64 and the total is rounded once,
so the result is never less accurate than torch's own (whose combination is a second bf16 rounding).
Where only the total of a 2-norm is wanted, small bf16 tensors (whose torch ops cost more than
their data) are packed into bf16 chunks as they are, and each chunk is normed by rows of 1024 in
float32 like the float32 path: their contribution is never rounded to bf16.
fp16 keeps the float32 path: torch's own fp16 CPU norm is about twice as slow as it, and fp16
per-tensor norms would overflow at 65504 (loss-scaled grads under ``grad_scale`` reach that), where
bf16 has float32's range.

Cost of the float32 path elsewhere: beyond 8M elements the float32 copy of a 16-bit tensor (over
32 MB) is a fresh allocation every call, and its page faults made the norm ~17x slower than torch's
own 16-bit norm. So large 16-bit CPU tensors that are converted are normed in pieces of at most
``CPU_PIECE_ELEMENTS`` elements, whose float32 copies reuse freed memory, and the piece norms are
combined in float64. The automatic choice on CPUs is the compiled ``cpu`` backend; this fallback
runs 16-bit CPU grads when the extension is missing or it is asked for by name.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..norm_type import NormKind, NormSpec
from ..plan import real_dtype
from .base import (
    ACC_DTYPE,
    Backend,
    DeviceWork,
    NormResult,
    finish_total,
    host_reads_are_free,
    is_general_p,
    round_odd_to_float,
    round_once,
    scaled_root,
    usable_norm_scale,
)

try:  # private helpers torch's own clip_grad uses; degrade to "foreach where torch supports it"
    from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support
except ImportError:  # pragma: no cover - older/newer torch without them

    def _device_has_foreach_support(device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")

    def _has_foreach_support(tensors: list[Tensor], device: torch.device) -> bool:
        return _device_has_foreach_support(device)


def _use_foreach(tensors: list[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's rule: foreach when asked or when supported; asking on an unsupported device raises."""
    if (foreach is None and _has_foreach_support(tensors, device)) or (foreach and _device_has_foreach_support(device)):
        return True
    if foreach:
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return False


#: largest piece of a 16-bit CPU tensor normed at once (its float32 copy: 4 MB, see the module docstring)
CPU_PIECE_ELEMENTS = 1 << 20


def _pieces(group: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """The tensors of ``group`` with every large contiguous one split into views of at most
    CPU_PIECE_ELEMENTS elements, and how many pieces each tensor became."""
    pieces: list[Tensor] = []
    counts: list[int] = []
    for tensor in group:
        if tensor.numel() > CPU_PIECE_ELEMENTS and tensor.is_contiguous():
            split = tensor.view(-1).split(CPU_PIECE_ELEMENTS)
            pieces.extend(split)
            counts.append(len(split))
        else:
            pieces.append(tensor)
            counts.append(1)
    return pieces, counts


def _combine_pieces(piece_norms: list[Tensor], counts: list[int], p: float) -> list[Tensor]:
    """Per-tensor norms from the norms of their pieces (combined in float64)."""
    if len(piece_norms) == len(counts):
        return piece_norms
    norms: list[Tensor] = []
    start = 0
    for count in counts:
        if count == 1:
            norms.append(piece_norms[start])
        else:
            parts = torch.stack(piece_norms[start : start + count]).to(ACC_DTYPE)
            # the p-norm of the pieces' p-norms is the tensor's p-norm (a count adds up instead)
            combined = parts.sum() if p == 0 else torch.linalg.vector_norm(parts, p)
            norms.append(combined.to(piece_norms[start].dtype))
        start += count
    return norms


def _opmath(dtype: torch.dtype) -> torch.dtype | None:
    if dtype.is_complex:
        return None  # torch returns a real norm for complex input by itself
    return torch.float64 if dtype == torch.float64 else torch.float32


#: the flat CPU path packs at most this many elements into one chunk (float32: 4 MB), and p = 1
#: reduces at most this many per torch op
CPU_CHUNK_ELEMENTS = 1 << 20
#: p = 1: float32 CPU tensors at least this large are reduced where they lie; smaller ones are
#: packed into a chunk first (a copy instead of a few torch ops per tensor)
CPU_DIRECT_ELEMENTS = 1 << 18
#: p = 2: float32 CPU tensors at least this large are reduced where they lie; from CPU_ROWS_ELEMENTS
#: by rows (below: torch's own per-tensor norm, one ``_foreach_norm`` for all of them, whose float32
#: accumulation along the tensor is torch's accuracy; rows cost ~25% more per tensor at 128K elements)
CPU_DIRECT_ROWS_ELEMENTS = 1 << 15
CPU_ROWS_ELEMENTS = 1 << 20
#: p = 2 reduces float32 tensors of CPU_ROWS_ELEMENTS and more, and the packed chunks, as rows of this
#: many elements (torch's vectorised norm kernel, parallel over the rows) whose norms are combined in
#: float64: what accumulates in float32 is one row, at most 128 terms per SIMD lane (AVX2: 8 lanes)
CPU_ROW_ELEMENTS = 1024
_CPU_FLAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtypes whose CPU per-tensor norms are torch's own, rounded to the dtype (see the module docstring)
CPU_TORCH_NORM_DTYPES = (torch.bfloat16,)
#: p = 2, total only: tensors of CPU_TORCH_NORM_DTYPES below this size are packed into chunks in
#: their own dtype and normed by rows in float32 (``_row_norms``); larger ones get torch's own
#: per-tensor norms. Packing costs ~1-4 us per tensor below it where torch's norm and stack cost
#: ~2-4.5 us, and more above it (measured on 2-core x86: 16K elements 4.0 vs 4.5 us, 64K 12.5 vs 11.0 us)
CPU_PACK_OWN_DTYPE_ELEMENTS = 1 << 14
#: key in DevicePlan.scratch of a dtype group's ``_FlatLayout``
_FLAT_LAYOUT_KEY = "torch-flat-layout"


def _batches(numels: list[int], limit: int) -> list[tuple[int, int]]:
    """(start, end) ranges of consecutive items, each range at most ``limit`` elements in all
    (every item is at most ``limit``)."""
    ranges: list[tuple[int, int]] = []
    start, size = 0, 0
    for index, numel in enumerate(numels):
        if index > start and size + numel > limit:
            ranges.append((start, index))
            start, size = index, 0
        size += numel
    if start < len(numels):
        ranges.append((start, len(numels)))
    return ranges


@dataclass(frozen=True)
class _FlatLayout:
    """How ``_flat_cpu_norms`` cuts one dtype group of a plan, from its sizes (made once per plan).

    ``direct``: group positions of float32 tensors reduced where they lie (p = 2: by rows);
    ``medium``: p = 2's tensors reduced where they lie by torch's own norm (float32 ones of medium
    size; bf16 ones from CPU_PACK_OWN_DTYPE_ELEMENTS); ``split``: positions of other tensors larger
    than a chunk, packed in CPU_CHUNK_ELEMENTS pieces; ``whole``: positions of the rest, packed
    whole. The packed items are, in order, the ``whole`` tensors, the last partial row of each
    ``direct`` tensor (p = 2) and the pieces of the ``split`` ones, packed into chunks of
    ``packed_dtype`` (float32; bf16 as it is); ``batches`` gives each chunk's (start, end) range of
    them, ``sizes`` its elements and ``padding`` the zeros that complete its last row (p = 2).
    ``rows``: p = 2's row count (direct bodies and padded chunks)."""

    direct: tuple[int, ...]
    medium: tuple[int, ...]
    split: tuple[int, ...]
    whole: tuple[int, ...]
    batches: tuple[tuple[int, int], ...]
    sizes: tuple[int, ...]
    padding: tuple[int, ...]
    rows: int
    elements: int
    packed_dtype: torch.dtype

    @classmethod
    def make(cls, numels: list[int], dtype: torch.dtype, p: float) -> "_FlatLayout":
        row = CPU_ROW_ELEMENTS if p == 2.0 else 0
        threshold = CPU_DIRECT_ROWS_ELEMENTS if row else CPU_DIRECT_ELEMENTS
        own_dtype = dtype in CPU_TORCH_NORM_DTYPES  # packed as they are (see CPU_PACK_OWN_DTYPE_ELEMENTS)
        if own_dtype and not row:
            raise ValueError(f"{dtype} grads take the flat path only for p = 2, not {p}")
        direct, medium, split, whole = [], [], [], []
        for position, numel in enumerate(numels):
            if own_dtype:
                (medium if numel >= CPU_PACK_OWN_DTYPE_ELEMENTS else whole).append(position)
            elif dtype == torch.float32 and row and threshold <= numel < CPU_ROWS_ELEMENTS:
                medium.append(position)
            elif dtype == torch.float32 and numel >= threshold:
                direct.append(position)
            elif numel > CPU_CHUNK_ELEMENTS:
                split.append(position)
            else:
                whole.append(position)
        items = [numels[i] for i in whole]
        if row:
            items += [numels[i] % row for i in direct if numels[i] % row]
        for i in split:
            items += [min(CPU_CHUNK_ELEMENTS, numels[i] - start) for start in range(0, numels[i], CPU_CHUNK_ELEMENTS)]
        batches = _batches(items, CPU_CHUNK_ELEMENTS)
        sizes = tuple(sum(items[a:b]) for a, b in batches)
        padding = tuple(-size % row if row else 0 for size in sizes)
        rows = 0
        if row:
            rows = sum(numels[i] // row for i in direct) + sum((size + pad) // row for size, pad in zip(sizes, padding))
            rows += len(medium)  # one norm each
        packed_dtype = dtype if own_dtype else torch.float32
        return cls(
            tuple(direct), tuple(medium), tuple(split), tuple(whole), tuple(batches), sizes, padding, rows, sum(numels), packed_dtype
        )


def flat_layout(plan: Any, dtype: torch.dtype, positions: list[int], p: float) -> _FlatLayout:
    """The plan's ``_FlatLayout`` for the non-empty grads of a dtype group (``positions``: their
    local indices), made on first use."""
    key = (_FLAT_LAYOUT_KEY, dtype, p, CPU_ROW_ELEMENTS, CPU_ROWS_ELEMENTS, CPU_DIRECT_ROWS_ELEMENTS, CPU_PACK_OWN_DTYPE_ELEMENTS)
    layout = plan.scratch.get(key)
    if layout is None:
        layout = plan.scratch[key] = _FlatLayout.make([plan.numels[i] for i in positions], dtype, p)
    return layout


def _pack(pieces: list[Tensor], out: Tensor) -> None:
    """Copy the elements of ``pieces`` (one dtype, any shapes) into ``out`` (1-d float32 or their own
    dtype), converting 16-bit values to float32: one ``torch._chunk_cat`` (no Python code per piece);
    a ``cat`` of flattened views where torch lacks it or it refuses the pieces (0-d tensors)."""
    if len(pieces) == 1:
        out.copy_(pieces[0].reshape(-1))
        return
    chunk_cat = getattr(torch, "_chunk_cat", None)
    # torch 2.13's _chunk_cat crashes the process (a segfault) when every piece is 0-d, and raises
    # when only some are; the check stops at the first piece with a dimension, usually the first
    if chunk_cat is not None and not all(piece.dim() == 0 for piece in pieces):
        try:
            chunk_cat(pieces, 0, 1, out=out.view(1, -1))
            return
        except RuntimeError:  # a 0-d grad among them: not taken by _chunk_cat
            pass
    if pieces[0].dtype == out.dtype:
        torch.cat([piece.reshape(-1) for piece in pieces], out=out)
    else:
        out.copy_(torch.cat([piece.reshape(-1) for piece in pieces]))


def _chunks(group: list[Tensor], layout: _FlatLayout, row: int) -> tuple[list[Tensor], Iterator[Tensor]]:
    """The ``direct`` data of ``group`` (1-d views: whole tensors, or p = 2's whole rows) and the
    packed chunks, each filled on demand into one reused buffer of ``layout.packed_dtype`` (padded
    with zeros to whole rows for p = 2)."""
    direct: list[Tensor] = []
    packed = [group[i] for i in layout.whole]
    for position in layout.direct:
        flat = group[position].reshape(-1)
        body = flat.numel() - flat.numel() % row if row else flat.numel()
        direct.append(flat[:body])
        if body < flat.numel():
            packed.append(flat[body:])
    for position in layout.split:
        packed.extend(group[position].reshape(-1).split(CPU_CHUNK_ELEMENTS))

    def filled() -> Iterator[Tensor]:
        if not layout.batches:
            return
        size = max(s + p for s, p in zip(layout.sizes, layout.padding))
        buffer = torch.empty(size, dtype=layout.packed_dtype, device="cpu")
        for (start, end), size, padding in zip(layout.batches, layout.sizes, layout.padding):
            _pack(packed[start:end], buffer[:size])
            if padding:
                buffer[size : size + padding].zero_()
            yield buffer[: size + padding]

    return direct, filled()


def _flat_cpu_norms(group: list[Tensor], p: float, layout: _FlatLayout) -> Tensor:
    """float64 vector of p-norms (p = 1 or 2) of pieces of ``group`` (float32/bf16/fp16 CPU tensors,
    no zero-size ones) whose p-norm is that of all their elements together. ``layout``: how
    ``group`` is cut (``flat_layout``).

    The total of a sum does not need each tensor's own norm, so large float32 tensors are reduced
    where they lie (``_FlatLayout``), and everything else is packed into float32 chunks of at most
    CPU_CHUNK_ELEMENTS (one reused buffer, one copy each, converting fp16 values on the way):
    below that size the torch ops per tensor would cost more than the copy saves. Every element is
    read from the grads once, packed 16-bit values are accumulated in float32 (never rounded to
    bf16/fp16 on the way, unlike torch's per-tensor norms), and the partial norms are combined in
    float64.
    bf16 (p = 2 only) is packed as it is, small tensors only, and converted by the row norm op
    (see CPU_PACK_OWN_DTYPE_ELEMENTS and ``_row_norms``); larger bf16 tensors get torch's own norms.

    The way data is summed keeps the error independent of a tensor's length, where torch's own CPU
    norm accumulates along the tensor and loses accuracy with it (measured on 1M float32 elements in
    [1, 2): 340 ulps for p = 1), except where it is torch's own. p = 2: the norms of rows of
    CPU_ROW_ELEMENTS, one op per large tensor or chunk writing into one vector of row norms (no
    scratch writes: a large tensor is read once, as by torch's own norm); float32 tensors from
    CPU_DIRECT_ROWS_ELEMENTS to CPU_ROWS_ELEMENTS get torch's own norms (one ``_foreach_norm``: a
    row op per tensor costs more than their read there), so their accuracy is torch's; all of it
    combined in float64. p = 1: ``|x|`` summed in a cascade per
    chunk of at most CPU_CHUNK_ELEMENTS (``_chunk_norm``). Data whose float32 sums overflow or may
    have lost squares to underflow is redone in float64 (``_wide_norm``): for p = 2 the whole group,
    judged once on the total (see ``_float32_sum_trusted``; a total of 0 from all-zero grads stands),
    for p = 1 each chunk.
    """
    if p == 2.0:
        direct, packed = _chunks(group, layout, CPU_ROW_ELEMENTS)
        row_norms = torch.empty(layout.rows, dtype=torch.float32, device="cpu")
        at = 0
        for values in itertools.chain(direct, packed):
            count = values.numel() // CPU_ROW_ELEMENTS
            _row_norms(values.view(count, CPU_ROW_ELEMENTS), row_norms[at : at + count])
            at += count
        if layout.medium:
            row_norms[at:] = torch.stack(torch._foreach_norm([group[i] for i in layout.medium], 2.0))
        norm = torch.linalg.vector_norm(row_norms.to(ACC_DTYPE), 2.0)
        value = norm.item()
        if _float32_sum_trusted(value * value, layout.elements, p) or (value == 0 and all(_zero_sums(group))):
            return norm.reshape(1)
        return _wide_group_norm(group, p)
    direct, packed = _chunks(group, layout, 0)
    norms: list[Tensor] = []
    scratch: Tensor | None = None
    for flat in direct:
        for piece in flat.split(CPU_CHUNK_ELEMENTS):
            if scratch is None:
                scratch = torch.empty(CPU_CHUNK_ELEMENTS, dtype=torch.float32, device="cpu")
            norm = _chunk_norm(piece, scratch[: piece.numel()], p)
            norms.append(_wide_norm([piece], p) if norm is None else norm)
    for chunk in packed:
        norm = _chunk_norm(chunk, chunk, p)
        if norm is None:
            return _wide_group_norm(group, p)
        norms.append(norm)
    return torch.stack(norms)


def _row_norms(rows: Tensor, out: Tensor) -> None:
    """The 2-norm of each row of ``rows`` (float32, or bf16 packed as it is) into float32 ``out``:
    torch's vectorised norm, accumulating in float32. A bf16 chunk is converted by the op itself,
    at most CPU_CHUNK_ELEMENTS at a time (a cache-sized temporary, unlike converting during the
    packing copy, which runs element by element)."""
    torch.linalg.vector_norm(rows, 2.0, dim=1, dtype=out.dtype, out=out)


def _zero_sums(tensors: list[Tensor]) -> list[bool]:
    """Whether each of ``tensors`` is all zeros (a host read), from its sum of |x| in its own dtype,
    one op for all (torch's CPU 1-norm is faster than its max-norm): any non-zero element makes
    that sum positive (a sum of positive floats never rounds to 0), NaN makes it NaN."""
    if not tensors:
        return []
    return [value == 0.0 for value in torch.stack(torch._foreach_norm(tensors, 1.0)).tolist()]


def _wide_group_norm(group: list[Tensor], p: float) -> Tensor:
    """``_wide_norm`` of every element of ``group``, as a 1-element vector."""
    return _wide_norm([piece for t in group for piece in t.reshape(-1).split(CPU_CHUNK_ELEMENTS)], p).reshape(1)


def float32_norms_untrusted(norms: list[float], numels: list[int], p: float) -> list[int]:
    """The positions of ``norms`` (read on the host: of float32-accumulated sums, p = 1 or 2, over
    tensors of ``numels`` elements) that cannot stand for the exact ones (``_float32_sum_trusted``)."""
    sums = [value * value if p == 2.0 else value for value in norms]
    return [i for i, (total, count) in enumerate(zip(sums, numels)) if not _float32_sum_trusted(total, count, p)]


def _redo_untrusted_norms(norms: Tensor, tensors: list[Tensor], p: float) -> None:
    """CPU per-tensor norms (float64 ``norms`` of ``tensors``, accumulated in float32 or bf16) that
    a float32 sum cannot stand for (``float32_norms_untrusted``) are recomputed in float64, in
    place, CPU_CHUNK_ELEMENTS at a time: squares above ~1.8e19 overflow float32 (and bf16) where the
    norm itself does not, and a total of inf would zero every grad; squares below ~1e-19 underflow,
    and a grad of 1e-25s has norm 0 there. An all-zero grad keeps its 0 (no float64 pass); a grad
    that holds inf or NaN gets inf or NaN again. Host reads, free on the CPU; elsewhere such norms
    stay what torch's own are."""
    values = norms.tolist()
    untrusted = float32_norms_untrusted(values, [t.numel() for t in tensors], p)
    if not untrusted:
        return
    # all-zero grads (common: unused experts) keep their exact 0 without a float64 pass
    zeros = [index for index in untrusted if values[index] == 0]
    exact = {index for index, zero in zip(zeros, _zero_sums([tensors[i] for i in zeros])) if zero}
    for index in untrusted:
        if index in exact:
            continue
        tensor = tensors[index]
        if tensor.is_complex():
            norms[index] = torch.linalg.vector_norm(tensor, p, dtype=torch.complex128)
        else:
            norms[index] = _wide_group_norm([tensor], p)[0]


#: a float32 sum of squares of ``n`` elements below ``n`` times this may have lost squares to
#: underflow (each lost square is below 2^-126: together under 2^-26 of the sum), so it is redone
SQUARES_UNDERFLOW_PER_ELEMENT = 2.0**-100


def _float32_sum_trusted(value: float, count: int, p: float) -> bool:
    """Whether a float32 sum of ``count`` values ``|x|`` (p = 1) or ``x * x`` (p = 2) can stand for
    the exact one: finite (squares above ~1.8e19 overflow, so does a sum of ``|x|`` above float32's
    range, and an inf/NaN grad makes it non-finite too) and, for squares, large enough that squares
    lost to underflow (elements below ~1e-19) cannot matter. Otherwise the caller redoes the data in
    float64 (``_wide_norm``), as the ``cpu`` kernels redo such blocks."""
    if not math.isfinite(value):
        return False
    return p == 1.0 or value >= count * SQUARES_UNDERFLOW_PER_ELEMENT


def _chunk_norm(values: Tensor, scratch: Tensor, p: float) -> Tensor | None:
    """The 1-norm of float32 ``values`` as a float64 scalar, using ``scratch`` (float32, same size;
    may be ``values`` itself when that is a copy of ours, as for the packed chunks): ``|x|`` is
    written to ``scratch`` and summed by ``Tensor.sum``, whose CPU kernel sums in a cascade (its
    error grows with the log of the count). None when the float32 sum cannot stand for it
    (``_float32_sum_trusted``)."""
    if p != 1.0:
        raise ValueError(f"chunk sums take p = 1, not {p}")
    total = torch.abs(values, out=scratch).sum()
    return total.to(ACC_DTYPE) if _float32_sum_trusted(total.item(), values.numel(), p) else None


def _wide_norm(pieces: list[Tensor], p: float) -> Tensor:
    """The p-norm (p = 1 or 2) of the elements of ``pieces`` (each at most CPU_CHUNK_ELEMENTS)
    summed in float64, at most CPU_CHUNK_ELEMENTS converted at a time (an inf/NaN element still gives
    inf/NaN)."""
    sums = []
    for start, end in _batches([piece.numel() for piece in pieces], CPU_CHUNK_ELEMENTS):
        wide = torch.cat([piece.reshape(-1).to(ACC_DTYPE) for piece in pieces[start:end]])
        sums.append(wide.abs().sum() if p == 1.0 else torch.dot(wide, wide))
    total = torch.stack(sums).sum()
    return total if p == 1.0 else total.sqrt()


#: float32's smallest normal number and its largest finite one
FLOAT_MIN_NORMAL = 2.0**-126
FLOAT_MAX = float(torch.finfo(torch.float32).max)
#: the exact product (see ``_scaled_exactly``) is formed on pieces of at most this many elements of
#: a contiguous grad, so that its float64 temporaries stay small (8 MB each)
WIDE_PIECE_ELEMENTS = 1 << 20


def coef_needs_wide(value: float) -> bool:
    """True when ``float32(value)`` cannot stand for the coefficient: finite, non-zero and outside
    float32's normal range (``csrc/fusedclip.h``'s ``coef_needs_wide``)."""
    magnitude = abs(value)
    return 0.0 < magnitude < FLOAT_MIN_NORMAL or FLOAT_MAX < magnitude < math.inf


def _split_coef(coef: Tensor) -> tuple[Tensor, Tensor]:
    """float64 ``coef`` as ``hi + lo`` exactly: ``hi`` keeps its top 24 significant bits, ``lo`` the rest."""
    hi = (coef.view(torch.int64) & ~((1 << 29) - 1)).view(torch.float64)
    return hi, coef - hi


def _product_round_odd(x: Tensor, coef: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """``x * coef`` rounded to odd at float64 precision, for float64 ``x`` holding values of at most 24
    significant bits (``product_round_odd`` in ``csrc/fusedclip.h``): ``a = x * hi`` and ``b = x * lo``
    are exact, ``s = a + b`` rounded and ``t = b - (s - a)`` its exact error; an inexact ``s`` is
    truncated toward zero with its last bit set. Zero, inf, NaN and overflow take ``x * coef``."""
    a = x * hi
    b = x * lo
    s = a + b
    t = b - (s - a)
    step = ((t < 0) != (s < 0)).to(torch.int64)  # s is beyond x * coef: one step toward zero truncates
    odd = ((s.view(torch.int64) - step) | 1).view(torch.float64)
    rounded = torch.where(t == 0, s, odd)
    return torch.where((s == 0) | ~torch.isfinite(s), x * coef, rounded)


def _scaled_exactly(x: Tensor, coef: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """``x * coef`` (float32/bf16/fp16 ``x``, float64 ``coef`` split by ``_split_coef``) rounded once to
    ``x``'s dtype, as the kernel backends apply a coefficient outside float32's normal range."""
    product = _product_round_odd(x.to(torch.float64), coef, hi, lo)
    if x.dtype == torch.float32:
        return product.to(torch.float32)  # the one rounding
    return round_odd_to_float(product).to(x.dtype)  # odd float32, then the one rounding that counts


def _scale_exactly_(grad: Tensor, coef: Tensor, hi: Tensor, lo: Tensor) -> None:
    """``grad = _scaled_exactly(grad)`` in place, a contiguous grad in pieces (see WIDE_PIECE_ELEMENTS)."""
    if grad.numel() > WIDE_PIECE_ELEMENTS and grad.is_contiguous():
        for piece in grad.view(-1).split(WIDE_PIECE_ELEMENTS):
            piece.copy_(_scaled_exactly(piece, coef, hi, lo))
    else:
        grad.copy_(_scaled_exactly(grad, coef, hi, lo))


#: key in ``DevicePlan.scratch`` of the per-tensor scatter index (see ``_write_per_tensor``)
_ORDER_KEY = "torch-per-tensor-order"


class TorchBackend(Backend):
    name = "torch"

    def _per_tensor_norms(self, work: DeviceWork, norm: NormSpec, *, flat: bool = False) -> list[Tensor]:
        """Per-tensor norms, one float64 vector per dtype group (not general p: see ``_general_sums``).

        ``flat``: only the total is wanted (no per-tensor norms, not p = 0), so a CPU group of
        float32/bf16/fp16 grads may return norms of chunks instead (see ``_flat_cpu_norms``).
        """
        plan, grads = work.plan, work.grads
        # Zero-size tensors contribute the identity (0) to sums, max and counts; torch's foreach
        # would raise for them with p = inf, so leave them out.
        keep_empty = norm.needs_nonempty_tensors
        # max |x| and min |x| are exact in the grads' own dtype: no wider copy needed
        extreme = norm.kind in (NormKind.MAX, NormKind.MIN)
        norms: list[Tensor] = []
        for dtype, indices in plan.dtype_groups.items():
            positions = [i for i in indices if keep_empty or plan.numels[i]]
            if not positions:
                continue
            group = [grads[i] for i in positions]
            opmath = _opmath(dtype)
            # torch's own per-tensor norms, in the grads' dtype (see the module docstring)
            as_torch = (
                norm.kind is NormKind.SUM_POW
                and plan.device.type == "cpu"
                and dtype in CPU_TORCH_NORM_DTYPES
                and not (flat and norm.p == 2.0)  # small ones packed, large ones torch's (see _FlatLayout)
            )
            if (extreme or as_torch) and opmath is not None:
                opmath = None
            elif flat and dtype in _CPU_FLAT_DTYPES:  # p = 1, 2: empty grads are left out above
                norms.append(_flat_cpu_norms(group, norm.p, flat_layout(plan, dtype, positions, norm.p)))
                continue
            tensors, counts = group, None
            if plan.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not (extreme or as_torch):
                group, counts = _pieces(group)  # see the module docstring
            if _use_foreach(group, plan.device, work.foreach):
                group_norms = torch._foreach_norm(group, norm.p, dtype=opmath)
            else:
                group_norms = [torch.linalg.vector_norm(g, norm.p, dtype=opmath) for g in group]
            if counts is not None:
                group_norms = _combine_pieces(list(group_norms), counts, norm.p)
            stacked = torch.stack(group_norms).to(ACC_DTYPE)
            if host_reads_are_free(plan.device) and norm.kind is NormKind.SUM_POW and real_dtype(dtype) != torch.float64:
                _redo_untrusted_norms(stacked, tensors, norm.p)
            norms.append(stacked)
        return norms

    def _per_tensor_vector(self, work: DeviceWork, norm: NormSpec, per_tensor: Tensor | None) -> Tensor | None:
        """A float64 vector whose norm is the total (None without non-empty tensors): per-tensor
        norms, or on the CPU (p != 0) norms of chunks (see ``_flat_cpu_norms``). ``per_tensor``
        then takes its per-tensor norms from a second pass, so the total is the same bits with or
        without it."""
        # the CPU's flat path reads its sums on the host (see _flat_cpu_norms)
        flat = norm.kind is not NormKind.COUNT and host_reads_are_free(work.plan.device)
        norms = self._per_tensor_norms(work, norm, flat=flat)
        if per_tensor is not None:
            own = self._per_tensor_norms(work, norm) if flat else norms
            self._write_per_tensor(work, norm, own, per_tensor)
        if not norms:
            return None
        return norms[0] if len(norms) == 1 else torch.cat(norms)

    @staticmethod
    def _accumulator(per_tensor: Tensor, norm: NormSpec) -> Tensor:
        if norm.kind is NormKind.MAX:
            return per_tensor.amax()
        if norm.kind is NormKind.MIN:
            return per_tensor.amin()
        if norm.kind is NormKind.COUNT:
            return (per_tensor != 0).sum().to(ACC_DTYPE)
        if norm.p == 1.0:
            return per_tensor.sum()
        if norm.p == 2.0:
            return (per_tensor * per_tensor).sum()
        return per_tensor.pow(norm.p).sum()

    @staticmethod
    def _general_sums(work: DeviceWork, norm: NormSpec, scale: Tensor) -> Tensor | None:
        """General p: every grad's sum of ``(|x| / M')^p`` in float64 (``scale``: ``M'``), in dtype-group
        order (as ``_write_per_tensor`` takes them); None without grads.

        Sums, not per-tensor norms: for a tiny ``|p|`` a tensor's root (``3 ** 1000``) can leave
        float64's range while the norm does not, and the accumulator is the sum of the sums. Every
        root is then taken by ``scaled_root``."""
        plan, grads = work.plan, work.grads
        keep_empty = norm.needs_nonempty_tensors
        sums: list[Tensor] = []
        for dtype, indices in plan.dtype_groups.items():
            # |x| in float64 (a complex grad's modulus), a fresh tensor each, then over M' and to the p
            wide = torch.complex128 if dtype.is_complex else ACC_DTYPE
            group = [grads[i].to(wide).abs() for i in indices if keep_empty or plan.numels[i]]
            if not group:
                continue
            if _use_foreach(group, plan.device, work.foreach):
                torch._foreach_div_(group, scale)
                torch._foreach_pow_(group, norm.p)
            else:
                for magnitude in group:
                    magnitude.div_(scale).pow_(norm.p)
            sums.append(torch.stack([magnitude.sum() for magnitude in group]))
        if not sums:
            return None
        return sums[0] if len(sums) == 1 else torch.cat(sums)

    def _general(
        self, work: DeviceWork, norm: NormSpec, per_tensor: Tensor | None, scale: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """General p: (accumulator, ``M'``), writing ``per_tensor`` when given."""
        if scale is None:
            scale = torch.ones((), dtype=ACC_DTYPE, device=work.device)
        scale = usable_norm_scale(scale.to(device=work.device, dtype=ACC_DTYPE))
        sums = self._general_sums(work, norm, scale)
        if sums is None:
            if per_tensor is not None:
                per_tensor.zero_()
            return torch.zeros((), dtype=ACC_DTYPE, device=work.device), scale
        if per_tensor is not None:
            self._write_per_tensor(work, norm, [scaled_root(sums, norm.p, scale)], per_tensor)
        return sums.sum(), scale

    def accumulate(
        self, work: DeviceWork, norm: NormSpec, per_tensor: Tensor | None = None, *, scale: Tensor | None = None
    ) -> Tensor:
        if is_general_p(norm):
            return self._general(work, norm, per_tensor, scale)[0]
        vector = self._per_tensor_vector(work, norm, per_tensor)
        if vector is None:
            return torch.zeros((), dtype=ACC_DTYPE, device=work.device)
        return self._accumulator(vector, norm)

    def norm(
        self,
        work: DeviceWork,
        norm: NormSpec,
        max_norm: float | Tensor | None,
        out_dtype: torch.dtype,
        *,
        per_tensor: Tensor | None = None,
        grad_scale: Tensor | None = None,
        scale: Tensor | None = None,
    ) -> NormResult:
        """torch's second stage (the norm of the per-tensor norms) in float64: one root, not two.
        General p: ``M'`` times the root of the accumulator (``scaled_root``)."""
        if is_general_p(norm):
            acc, usable = self._general(work, norm, per_tensor, scale)
            total = scaled_root(acc, norm.p, usable)
            return finish_total(total, acc, norm, max_norm, out_dtype, grad_scale, scale)
        vector = self._per_tensor_vector(work, norm, per_tensor)
        if vector is None:
            zero = torch.zeros((), dtype=ACC_DTYPE, device=work.device)
            return finish_total(zero, zero, norm, max_norm, out_dtype, grad_scale)
        total = torch.linalg.vector_norm(vector, norm.p)
        return finish_total(total, self._accumulator(vector, norm), norm, max_norm, out_dtype, grad_scale)

    @staticmethod
    def _write_per_tensor(work: DeviceWork, norm: NormSpec, norms: list[Tensor], out: Tensor) -> None:
        """Scatter the per-dtype-group norms back into the grads' order (zero-size grads: 0).

        The scatter's index is made once per plan and device and kept with the plan: made from a
        Python list on every call, it would be a host-to-device copy (a host sync) per call."""
        plan = work.plan
        keep_empty = norm.needs_nonempty_tensors
        key = (_ORDER_KEY, keep_empty, out.device)
        index = plan.scratch.get(key)
        if index is None:
            order = [i for indices in plan.dtype_groups.values() for i in indices if keep_empty or plan.numels[i]]
            index = torch.tensor(order, dtype=torch.int64, device=out.device)
            plan.scratch[key] = index
        out.zero_()
        if index.numel():
            out.index_copy_(0, index, round_once(torch.cat(norms), out.dtype))

    def scale_(self, work: DeviceWork, coef: Tensor) -> None:
        """Multiply every grad by ``coef`` as the kernel backends do (see ``kernel_base``): float64
        grads by ``coef``; float32/bf16/fp16 grads by ``float32(coef)`` (torch's result, and torch's
        speed: ``_foreach_mul_`` per dtype group) when ``coef`` is 0, inf, NaN or a normal float32,
        else by the exact ``coef``, each product rounded once to the grad's dtype (``_scaled_exactly``).

        Which of the two applies is read from ``coef`` where that is free: a CPU coefficient (always
        so for CPU grads). On other devices reading it would be a host synchronisation, and choosing
        on the device means computing both results and selecting one (``torch.where``): the exact
        product is about a dozen float64 passes over the grads where the common case is one
        multiplication, so the select is used there only for aliased grads (scaled one tensor after
        another anyway; the kernel backends hand exactly those to this backend, which keeps their
        results) and while tracing. Other grads on such devices take ``float32(coef)``, torch's
        result, also when ``coef`` is outside float32's normal range (below 2^-126: a ``max_norm``
        below about 1e-38 times the total norm).
        """
        plan, grads = work.plan, work.grads
        wide: bool | None = None  # does coef need the exact product? None: decided on the device
        if host_reads_are_free(coef.device):
            value = coef.item()
            if value == 1 and plan.device.type == "cpu":
                return  # x * 1 == x in every dtype: an unclipped step costs only the norm pass
            wide = coef_needs_wide(value)
        elif plan.device.type != "cpu" and not torch.compiler.is_compiling() and not plan.aliased:
            wide = False  # see the docstring
        exact: tuple[Tensor, Tensor, Tensor] | None = None  # float64 coef, hi, lo on the device
        coef_by_dtype: dict[torch.dtype, Tensor] = {}
        for dtype, indices in plan.dtype_groups.items():
            # Multiply in float32 (float64 for float64 grads), rounding each element once.
            opmath = _opmath(dtype) or torch.float32
            factor = coef_by_dtype.get(opmath)
            if factor is None:
                factor = coef_by_dtype[opmath] = coef.to(device=plan.device, dtype=opmath)
            group = [grads[i] for i in indices]
            use_foreach = _use_foreach(group, plan.device, work.foreach)
            if wide is not False and dtype in _CPU_FLAT_DTYPES:  # float32, bf16, fp16
                if exact is None:
                    coef64 = coef.to(device=plan.device, dtype=torch.float64)
                    exact = (coef64, *_split_coef(coef64))
                # one tensor after another: an element shared by two grads is scaled once per grad
                if wide:
                    for grad in group:
                        _scale_exactly_(grad, *exact)
                else:
                    magnitude = exact[0].abs()
                    needs_wide = ((magnitude > 0) & (magnitude < FLOAT_MIN_NORMAL)) | (
                        (magnitude > FLOAT_MAX) & (magnitude < math.inf)
                    )
                    for grad in group:
                        grad.copy_(torch.where(needs_wide, _scaled_exactly(grad, *exact), grad * factor))
                continue
            if use_foreach:
                torch._foreach_mul_(group, factor)
            else:
                for grad in group:
                    grad.mul_(factor)

    def clamp_(self, work: DeviceWork, clip_value: float) -> None:
        plan, grads = work.plan, work.grads
        for indices in plan.dtype_groups.values():
            group = [grads[i] for i in indices]
            if _use_foreach(group, plan.device, work.foreach):
                torch._foreach_clamp_min_(group, -clip_value)
                torch._foreach_clamp_max_(group, clip_value)
            else:
                for grad in group:
                    grad.clamp_(min=-clip_value, max=clip_value)
