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

import math

import torch
from torch import Tensor

from ..norm_type import NormKind, NormSpec
from .base import (
    ACC_DTYPE,
    Backend,
    DeviceWork,
    NormResult,
    finish_total,
    is_general_p,
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


#: the flat CPU path reduces at most this many elements per torch op (its float32 buffer: 4 MB)
CPU_CHUNK_ELEMENTS = 1 << 20
#: float32 CPU tensors at least this large are reduced where they lie; smaller ones are packed
#: into the chunk buffer first (one ``cat`` instead of a few ops per tensor: measured on the
#: benchmark's sets, 2^16 made sets of many 64K-256K tensors ~1.5x slower, 2^20 large ones slower)
CPU_DIRECT_ELEMENTS = 1 << 18
_CPU_FLAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtypes whose CPU per-tensor norms are torch's own, rounded to the dtype (see the module docstring)
CPU_TORCH_NORM_DTYPES = (torch.bfloat16,)


def _flat_cpu_norms(group: list[Tensor], p: float) -> Tensor:
    """float64 vector of p-norms (p = 1 or 2) of float32 chunks of ``group`` (float32/bf16/fp16 CPU
    tensors, no zero-size ones) whose p-norm is that of all their elements together.

    The total of a sum does not need each tensor's own norm, so the elements are reduced in chunks
    of at most CPU_CHUNK_ELEMENTS: large float32 tensors where they lie (split into views),
    everything else converted or packed into one float32 buffer with a single copy
    (``cat``/``copy_`` with a float32 destination); each chunk is summed by ``_chunk_norm`` (a
    cascade, as accurate for a chunk packed from many small grads as for one grad, where torch's own
    CPU norm loses accuracy with length). Large means at least CPU_DIRECT_ELEMENTS: below that, the
    few torch ops per chunk would cost more than the copy into the buffer saves. Every element is read from the grads once, 16-bit
    values are accumulated in float32 (never rounded to bf16/fp16 on the way, unlike torch's
    per-tensor norms), and the chunk norms are combined in float64 by the caller. The buffer is
    reused for every chunk, so the float32 copy of a large set never exists at once. Chunks whose
    float32 result overflows or may have lost squares to underflow are redone in float64
    (``_wide_norm``).
    """
    direct: list[Tensor] = []  # float32 views reduced in place
    packed: list[list[Tensor]] = []  # batches copied into the buffer, each <= CPU_CHUNK_ELEMENTS
    batch: list[Tensor] = []
    batch_numel = 0
    for tensor in group:
        flat = tensor.reshape(-1)
        numel = flat.numel()
        if tensor.dtype == torch.float32 and numel >= CPU_DIRECT_ELEMENTS:
            direct.extend(flat.split(CPU_CHUNK_ELEMENTS) if numel > CPU_CHUNK_ELEMENTS else (flat,))
            continue
        for piece in flat.split(CPU_CHUNK_ELEMENTS) if numel > CPU_CHUNK_ELEMENTS else (flat,):
            if batch_numel + piece.numel() > CPU_CHUNK_ELEMENTS:
                packed.append(batch)
                batch, batch_numel = [], 0
            batch.append(piece)
            batch_numel += piece.numel()
    if batch:
        packed.append(batch)
    largest = max([t.numel() for t in direct] + [sum(t.numel() for t in b) for b in packed])
    buffer = torch.empty(largest, dtype=torch.float32, device="cpu")
    norms: list[Tensor] = []
    for chunk in direct:
        norm = _chunk_norm(chunk, buffer[: chunk.numel()], p)
        norms.append(_wide_norm([chunk], p) if norm is None else norm)
    for pieces in packed:
        view = buffer[: sum(t.numel() for t in pieces)]
        if len(pieces) == 1:
            view.copy_(pieces[0])
        elif pieces[0].dtype == torch.float32:
            torch.cat(pieces, out=view)
        else:  # a same-dtype cat is one memcpy per piece; a converting cat is one copy_ op per piece
            view.copy_(torch.cat(pieces))
        norm = _chunk_norm(view, view, p)
        norms.append(_wide_norm(pieces, p) if norm is None else norm)
    return torch.stack(norms)


#: a float32 sum of squares below this may have lost squares to underflow (each lost square is below
#: 2^-126, at most 2^20 of them per chunk: under 2^-24 of a sum this large), so the chunk is redone
SQUARES_UNDERFLOW_SUM = 2.0**-80


def _chunk_norm(values: Tensor, scratch: Tensor, p: float) -> Tensor | None:
    """The p-norm (p = 1 or 2) of float32 ``values`` as a float64 scalar, using ``scratch`` (float32,
    same size; may be ``values`` itself when that is a copy of ours, as for the packed chunks); None
    when a float32 sum cannot stand for it (see below).

    ``|x|`` or ``x * x`` is written to ``scratch`` and summed by ``Tensor.sum``, whose CPU kernel sums
    in a cascade: its error grows with the log of the count. ``torch.linalg.vector_norm``'s CPU
    reduction accumulates along the tensor instead, and its error grows with the count (measured on
    1M float32 elements in [1, 2): 340 ulps for p = 1, where this sum is within 1 ulp) — it would
    make a set of many small packed grads less accurate than torch's per-tensor norms of the same
    grads. It is also not faster.

    None when the float32 sum is not finite (squares above ~1.8e19 overflow, a sum of |x| above
    float32's range, or an inf/NaN grad) or may have lost squares to underflow (elements below
    ~1e-19): the caller then redoes the chunk in float64 (``_wide_norm``), as the ``cpu`` kernels
    redo such blocks. The sum is read on the host, which costs nothing on the CPU.
    """
    if p == 1.0:
        total = torch.abs(values, out=scratch).sum()
        return total.to(ACC_DTYPE) if math.isfinite(total.item()) else None
    if p == 2.0:
        total = torch.mul(values, values, out=scratch).sum()
        value = total.item()
        return total.to(ACC_DTYPE).sqrt() if math.isfinite(value) and value >= SQUARES_UNDERFLOW_SUM else None
    raise ValueError(f"chunked CPU norms take p = 1 or 2, not {p}")


def _wide_norm(pieces: list[Tensor], p: float) -> Tensor:
    """The p-norm (p = 1 or 2) of the elements of ``pieces`` summed in float64 (an inf/NaN element
    still gives inf/NaN)."""
    wide = torch.cat([piece.reshape(-1).to(ACC_DTYPE) for piece in pieces])
    return wide.abs().sum() if p == 1.0 else torch.dot(wide, wide).sqrt()


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


def _readable(coef: Tensor) -> bool:
    """True when reading ``coef`` on the host costs nothing: a CPU tensor (the CPU has no queue to
    wait for), outside tracing."""
    return coef.device.type == "cpu" and not torch.compiler.is_compiling()


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


def _round_odd_to_float(d: Tensor) -> Tensor:
    """float64 ``d`` rounded to odd at float32 precision (``round_odd_to_float`` in ``csrc/fusedclip.h``):
    rounding that once more to bfloat16 or float16 is rounding ``d`` once."""
    f = d.to(torch.float32)
    back = f.to(torch.float64)
    step = (back.abs() > d.abs()).to(torch.int32)  # f was rounded away from zero: step back
    odd = ((f.view(torch.int32) - step) | 1).view(torch.float32)
    return torch.where((back == d) | torch.isnan(d), f, odd)


def _scaled_exactly(x: Tensor, coef: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """``x * coef`` (float32/bf16/fp16 ``x``, float64 ``coef`` split by ``_split_coef``) rounded once to
    ``x``'s dtype, as the kernel backends apply a coefficient outside float32's normal range."""
    product = _product_round_odd(x.to(torch.float64), coef, hi, lo)
    if x.dtype == torch.float32:
        return product.to(torch.float32)  # the one rounding
    return _round_odd_to_float(product).to(x.dtype)  # odd float32, then the one rounding that counts


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
            group = [grads[i] for i in indices if keep_empty or plan.numels[i]]
            if not group:
                continue
            opmath = _opmath(dtype)
            # torch's own per-tensor norms, in the grads' dtype (see the module docstring)
            as_torch = (
                norm.kind is NormKind.SUM_POW
                and plan.device.type == "cpu"
                and dtype in CPU_TORCH_NORM_DTYPES
            )
            if (extreme or as_torch) and opmath is not None:
                opmath = None
            elif flat and plan.device.type == "cpu" and dtype in _CPU_FLAT_DTYPES:
                nonempty = [g for g in group if g.numel()]
                if nonempty:
                    norms.append(_flat_cpu_norms(nonempty, norm.p))
                continue
            counts = None
            if plan.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not (extreme or as_torch):
                group, counts = _pieces(group)  # see the module docstring
            if _use_foreach(group, plan.device, work.foreach):
                group_norms = torch._foreach_norm(group, norm.p, dtype=opmath)
            else:
                group_norms = [torch.linalg.vector_norm(g, norm.p, dtype=opmath) for g in group]
            if counts is not None:
                group_norms = _combine_pieces(list(group_norms), counts, norm.p)
            norms.append(torch.stack(group_norms).to(ACC_DTYPE))
        return norms

    def _per_tensor_vector(self, work: DeviceWork, norm: NormSpec, per_tensor: Tensor | None) -> Tensor | None:
        """A float64 vector whose norm is the total (None without non-empty tensors): per-tensor
        norms, or on the CPU (p != 0) norms of chunks (see ``_flat_cpu_norms``). ``per_tensor``
        then takes its per-tensor norms from a second pass, so the total is the same bits with or
        without it."""
        flat = norm.kind is not NormKind.COUNT and work.plan.device.type == "cpu"
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
            out.index_copy_(0, index, torch.cat(norms).to(out.dtype))

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
        if _readable(coef):
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
