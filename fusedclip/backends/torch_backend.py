"""The pure-torch backend: runs on every device torch supports, and is the reference for the others.

It follows torch's own recipe (per-tensor norms with ``_foreach_norm``, then a norm of those) with
fusedclip's accuracy rules: per-tensor norms are accumulated in float32 (float64 for float64 grads)
and never rounded to bf16/fp16 on the way, the combination happens in float64, and the coefficient
comes from the unrounded total. ``foreach`` is honoured exactly as torch honours it.

One exception, for speed: bf16 grads on the CPU (p = 1, 2 and any other finite p without a norm
scale). Every torch CPU reduction that returns float32 from bf16 input first makes a float32 copy
of it, and that conversion alone made the norm pass ~0.55-0.75x as fast as torch's own
clip_grad_norm_ (which reduces bf16 in its own dtype); converting cache-sized pieces into a reused
float32 buffer was no faster. So for those grads the per-tensor norms are torch's, bit for bit:
``_foreach_norm`` in bf16 (float32 accumulation inside, each per-tensor norm rounded to bf16).
They are combined in float64 and the total is rounded once, so the result is never less accurate
than torch's own (whose combination is a second bf16 rounding). fp16 keeps the float32 path: torch's
own fp16 CPU norm is about twice as slow as it, and fp16 per-tensor norms would overflow at 65504
(loss-scaled grads under ``grad_scale`` reach that), where bf16 has float32's range.

Cost of the float32 path elsewhere: beyond 8M elements the float32 copy of a 16-bit tensor (over
32 MB) is a fresh allocation every call, and its page faults made the norm ~17x slower than torch's
own 16-bit norm. So large 16-bit CPU tensors that are converted are normed in pieces of at most
``CPU_PIECE_ELEMENTS`` elements, whose float32 copies reuse freed memory, and the piece norms are
combined in float64. The automatic choice on CPUs is the compiled ``cpu`` backend; this fallback
runs 16-bit CPU grads when the extension is missing or it is asked for by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..norm_type import NormKind, NormSpec
from .base import ACC_DTYPE, Backend, DeviceWork, NormResult, finish_total, is_general_p, usable_norm_scale

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
#: into the chunk buffer first (one ``cat`` instead of one reduction per tensor)
CPU_DIRECT_ELEMENTS = 1 << 16
_CPU_FLAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtypes whose CPU per-tensor norms are torch's own, rounded to the dtype (see the module docstring)
CPU_TORCH_NORM_DTYPES = (torch.bfloat16,)


def _flat_cpu_norms(group: list[Tensor], p: float) -> Tensor:
    """float64 vector of p-norms of float32 chunks of ``group`` (float32/bf16/fp16 CPU tensors, no
    zero-size ones) whose p-norm, max or min is that of all their elements together.

    The total of a sum, max or min does not need each tensor's own norm, so the elements are
    reduced in chunks of at most CPU_CHUNK_ELEMENTS: large float32 tensors where they lie (split
    into views), everything else converted or packed into one float32 buffer with a single copy
    (``cat``/``copy_`` with a float32 destination) and reduced there. Every element is read from
    the grads once, 16-bit values are accumulated in float32 (never rounded to bf16/fp16 on the
    way, unlike torch's per-tensor norms), and each reduction covers at most CPU_CHUNK_ELEMENTS
    elements; the chunk norms are combined in float64 by the caller. The buffer is reused for
    every chunk, so the float32 copy of a large set never exists at once.
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
    norms: list[Tensor] = list(torch._foreach_norm(direct, p)) if direct else []
    if packed:
        buffer = torch.empty(max(sum(t.numel() for t in b) for b in packed), dtype=torch.float32, device="cpu")
        for pieces in packed:
            numel = sum(t.numel() for t in pieces)
            view = buffer[:numel]
            if len(pieces) == 1:
                view.copy_(pieces[0])
            elif pieces[0].dtype == torch.float32:
                torch.cat(pieces, out=view)
            else:  # a same-dtype cat is one memcpy per piece; a converting cat is one copy_ op per piece
                view.copy_(torch.cat(pieces))
            norms.append(torch.linalg.vector_norm(view, p))
    return torch.stack(norms).to(ACC_DTYPE)


def _skip_scale(coef: Tensor, device: torch.device) -> bool:
    """True when ``coef`` is exactly 1 and reading it costs nothing: CPU grads and a CPU coefficient
    (the CPU has no queue to wait for; the kernel backends skip a coefficient of 1 the same way).
    Never on other devices (that would be a host synchronisation) nor while tracing."""
    if device.type != "cpu" or coef.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(coef == 1)


class TorchBackend(Backend):
    name = "torch"

    def _per_tensor_norms(
        self, work: DeviceWork, norm: NormSpec, scale: Tensor | None = None, *, flat: bool = False
    ) -> list[Tensor]:
        """Per-tensor norms, one float64 vector per dtype group.

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
                and scale is None
                and plan.device.type == "cpu"
                and dtype in CPU_TORCH_NORM_DTYPES
            )
            if (extreme or as_torch) and opmath is not None:
                opmath = None
            elif flat and scale is None and plan.device.type == "cpu" and dtype in _CPU_FLAT_DTYPES:
                nonempty = [g for g in group if g.numel()]
                if nonempty:
                    norms.append(_flat_cpu_norms(nonempty, norm.p))
                continue
            if scale is not None:  # general p: the grads over the norm scale M', in float64 (see backends.base)
                group, opmath = [g.to(torch.complex128 if g.is_complex() else ACC_DTYPE) / scale for g in group], None
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

    def _per_tensor_vector(
        self, work: DeviceWork, norm: NormSpec, per_tensor: Tensor | None, scale: Tensor | None = None
    ) -> Tensor | None:
        """A float64 vector whose norm is the total (None without non-empty tensors): per-tensor
        norms, or on the CPU (p != 0) norms of chunks (see ``_flat_cpu_norms``). ``per_tensor``
        then takes its per-tensor norms from a second pass, so the total is the same bits with or
        without it."""
        flat = norm.kind is not NormKind.COUNT and work.plan.device.type == "cpu"
        norms = self._per_tensor_norms(work, norm, scale, flat=flat)
        if per_tensor is not None:
            own = self._per_tensor_norms(work, norm, scale) if flat else norms
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

    def accumulate(
        self, work: DeviceWork, norm: NormSpec, per_tensor: Tensor | None = None, *, scale: Tensor | None = None
    ) -> Tensor:
        scale = usable_norm_scale(scale) if scale is not None and is_general_p(norm) else None
        vector = self._per_tensor_vector(work, norm, per_tensor, scale)
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
        """torch's second stage (the norm of the per-tensor norms) in float64: one root, not two."""
        raw_scale = scale if is_general_p(norm) else None
        scale = None if raw_scale is None else usable_norm_scale(raw_scale)
        vector = self._per_tensor_vector(work, norm, per_tensor, scale)
        if vector is None:
            zero = torch.zeros((), dtype=ACC_DTYPE, device=work.device)
            return finish_total(zero, zero, norm, max_norm, out_dtype, grad_scale)
        total = torch.linalg.vector_norm(vector, norm.p)
        if scale is not None:
            total = scale * total
        return finish_total(total, self._accumulator(vector, norm), norm, max_norm, out_dtype, grad_scale, raw_scale)

    @staticmethod
    def _write_per_tensor(work: DeviceWork, norm: NormSpec, norms: list[Tensor], out: Tensor) -> None:
        """Scatter the per-dtype-group norms back into the grads' order (zero-size grads: 0)."""
        plan = work.plan
        keep_empty = norm.needs_nonempty_tensors
        order = [i for indices in plan.dtype_groups.values() for i in indices if keep_empty or plan.numels[i]]
        out.zero_()
        if order:
            index = torch.tensor(order, dtype=torch.int64, device=out.device)
            out.index_copy_(0, index, torch.cat(norms).to(out.dtype))

    def scale_(self, work: DeviceWork, coef: Tensor) -> None:
        plan, grads = work.plan, work.grads
        if _skip_scale(coef, plan.device):
            return  # x * 1 == x in every dtype: an unclipped step costs only the norm pass
        coef_by_dtype: dict[torch.dtype, Tensor] = {}
        for dtype, indices in plan.dtype_groups.items():
            # Multiply in float32 (float64 for float64 grads), rounding each element once.
            opmath = _opmath(dtype) or torch.float32
            factor = coef_by_dtype.get(opmath)
            if factor is None:
                factor = coef_by_dtype[opmath] = coef.to(device=plan.device, dtype=opmath)
            group = [grads[i] for i in indices]
            if _use_foreach(group, plan.device, work.foreach):
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
