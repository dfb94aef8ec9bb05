"""Gradient norms accumulated during backward, while each grad is still hot in cache.

:class:`NormTracker` registers a ``register_post_accumulate_grad_hook`` on every parameter. Each
time autograd has accumulated a parameter's grad, the hook computes that grad's own norm on the
device (no host synchronisation) and writes it into the parameter's slot of a small per-device
vector, overwriting the slot's previous value. After backward, :meth:`NormTracker.result` reduces
the slots (one tiny op per device) and finishes total and coefficient exactly as
:func:`fusedclip.clip_grad_norm_` does (:func:`fusedclip.backends.base.finish`), so clipping costs
no extra pass over gradient memory: with ``clip_and_step_(optimizer, max_norm, tracker=tracker)``
a training step is backward (with hooks) plus one fused optimizer step that applies the folded
coefficient.

Semantics (tested against ``torch.nn.utils.clip_grad_norm_`` computed after backward):

* The result is the norm of every tracked tensor's ``.grad`` *as it is when* :meth:`result` *runs*,
  exactly the set ``clip_grad_norm_(params)`` would see. Hook values are only a cache: at the hook
  the grad's identity (a weak reference), ``_version`` and ``data_ptr()`` are recorded, and at
  :meth:`result` (host-side checks, no device synchronisation) any grad whose record does not
  match — modified in place afterwards (user edits, DDP's all-reduce, ``zero_grad(set_to_none=False)``),
  replaced, or never seen by a hook (frozen or non-leaf tensors, a grad assigned by hand) — is
  recomputed in one fused pass (:func:`fusedclip.get_norms`) over those grads only. A parameter
  without a grad counts nothing, whatever its slot held.
* Gradient accumulation: the post-accumulate hook sees the accumulated grad, and each micro-batch's
  hook overwrites the slot, so only the final grad counts.
* Step boundary: :meth:`result` consumes the step (slots zeroed, records dropped, both on the
  device or host without a sync); :meth:`reset` discards a step without computing it. Call
  :meth:`result` (or ``clip_and_step_(..., tracker=)``) once per optimizer step.
* Tied weights: parameters are deduplicated by identity (as ``model.parameters()`` is), so a weight
  used twice counts once; autograd accumulates its two contributions before the one hook call.
* DDP: the hook runs before DDP's all-reduce, which then rewrites the grads in place (bumping their
  version), so hook values would be stale. Given a ``DistributedDataParallel`` module, the tracker
  registers no hooks and :meth:`result` makes the full pass; given its parameters directly, the
  version check catches the all-reduce and recomputes every grad (correct, but the hooks are wasted
  work). A DDP communication hook computing the norm from the reduced buckets is not implemented.
* FSDP2 / DTensor parameters are not supported: refused at construction, and a DTensor grad
  reaching a hook raises.

Accuracy: each grad's norm is accumulated by ``torch.linalg.vector_norm`` in float32 (float64 for
float64 grads; the real dtype of complex grads) and the per-tensor norms are combined in float64 and
rounded once — the accuracy contract of fusedclip's ``torch`` backend (a tensor whose norm exceeds
float32's range gives inf, as torch's own clipping does). Norm orders: 2, 1 and inf.

Limits: writes that bypass autograd's version counter cannot be seen. Notably
``GradScaler.unscale_`` (torch's ``_amp_foreach_non_finite_check_and_unscale_`` does not bump the
grads' versions, on CPU or CUDA), ``grad.data.mul_(...)`` and a fused optimizer's ``grad_scale``
write-back. After such a write call :meth:`NormTracker.invalidate` (everything is recomputed), or
better, with AMP, skip ``unscale_`` and pass the scaler's inverse scale as ``result(max_norm,
grad_scale=...)``. A fused optimizer's write-back happens after :meth:`result`, which drops every
record, so it is harmless. Each hook call costs a Python call and one small kernel
(tens of microseconds on a CPU), so the tracker pays off only for large tensors: see
``benchmarks/results/tracker_cpu.md``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import engine
from .backends.base import ACC_DTYPE, NormResult, combine_accumulators, finish
from .inputs import check_max_norm
from .norm_type import NormKind, NormSpec, parse_norm_type
from .plan import result_dtype_of

__all__ = ["NormTracker"]

_SUPPORTED = (1.0, 2.0, math.inf)


def _is_dtensor(tensor: object) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements")


def _is_ddp(module: object) -> bool:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(module, DistributedDataParallel)


def _reduce(norms: Tensor, norm: NormSpec) -> Tensor:
    """The float64 accumulator (base.py's format) of per-tensor norms (float64, 1-d)."""
    if norm.kind is NormKind.MAX:
        return norms.amax() if norms.numel() else norms.new_zeros(())
    if norm.p == 2.0:
        return norms.square().sum()
    return norms.sum()


class NormTracker:
    """Accumulate every grad's norm during backward; finish total and coefficient after it.

    Args:
        model_or_params: an ``nn.Module`` (its ``parameters()``) or an iterable of tensors. Duplicates
            are counted once. Hooks go on leaf tensors that require grad; every other tensor is
            still counted (recomputed at :meth:`result`) when it has a grad.
        norm_type: 2, 1 or inf (other orders raise ``NotImplementedError``: use
            :func:`fusedclip.clip_grad_norm_`).
        backend: the fusedclip backend for the recomputation pass (None: automatic).

    Use::

        tracker = fusedclip.NormTracker(model)
        for batch in data:
            loss(model, batch).backward()
            fusedclip.clip_and_step_(optimizer, max_norm=1.0, tracker=tracker)
            optimizer.zero_grad()
    """

    def __init__(self, model_or_params: torch.nn.Module | Iterable[Tensor], norm_type: float | str = 2.0, *, backend: str | None = None) -> None:
        norm = parse_norm_type(norm_type)
        if norm.p not in _SUPPORTED:
            raise NotImplementedError(
                f"NormTracker supports norm_type 2, 1 and inf; got {norm}. Use fusedclip.clip_grad_norm_ after backward instead."
            )
        self.norm: NormSpec = norm
        self.backend = backend
        is_module = isinstance(model_or_params, torch.nn.Module)
        raw = list(model_or_params.parameters() if is_module else model_or_params)  # type: ignore[union-attr]
        seen: set[int] = set()
        params: list[Tensor] = []
        for param in raw:
            if not isinstance(param, Tensor):
                raise TypeError(f"NormTracker takes a module or tensors; got {type(param).__name__}")
            if _is_dtensor(param):
                raise NotImplementedError("NormTracker does not support DTensor parameters (FSDP2, tensor parallel); use fusedclip.clip_grad_norm_")
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
        self.params: list[Tensor] = params
        #: why no hooks are registered (None: tracking)
        self.untracked_reason: str | None = "DistributedDataParallel module: grads change in the all-reduce after the hooks" if is_module and _is_ddp(model_or_params) else None
        n = len(params)
        self._refs: list[Any] = [None] * n  # weakref to the grad the slot was computed from
        self._versions: list[int] = [0] * n
        self._ptrs: list[int] = [0] * n
        self._written: list[Tensor | None] = [None] * n  # the slot view last written this step
        self._slots: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._views: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        self._handles: list[Any] = []
        if self.untracked_reason is None:
            for index, param in enumerate(params):
                if param.requires_grad and param.is_leaf:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._make_hook(index)))

    # -- during backward ---------------------------------------------------------------------------

    @property
    def tracking(self) -> bool:
        """True while hooks are registered."""
        return bool(self._handles)

    def _slot_views(self, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        key = (device, dtype)
        views = self._views.get(key)
        if views is None:
            slots = torch.zeros(len(self.params), dtype=dtype, device=device)
            self._slots[key] = slots
            views = self._views[key] = list(slots.unbind())
        return views

    def _make_hook(self, index: int):
        order = self.norm.p
        refs, versions, ptrs, written = self._refs, self._versions, self._ptrs, self._written
        strided = torch.strided
        vector_norm = torch.linalg.vector_norm

        def hook(param: Tensor) -> None:
            grad = param.grad
            if grad is None or grad.layout is not strided or grad.numel() == 0:
                refs[index] = None  # recomputed (or skipped) at result()
                return
            if _is_dtensor(grad):
                raise NotImplementedError("NormTracker does not support DTensor grads (FSDP2); use fusedclip.clip_grad_norm_")
            dtype = grad.dtype
            if dtype.is_complex:
                norm_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
            else:
                norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            view = self._slot_views(grad.device, norm_dtype)[index]
            previous = written[index]
            if previous is not None and previous is not view:
                previous.zero_()
            with torch.no_grad():
                if dtype.is_complex:
                    vector_norm(grad, order, out=view)
                else:
                    vector_norm(grad, order, dtype=norm_dtype, out=view)
            written[index] = view
            refs[index] = weakref.ref(grad)
            versions[index] = grad._version
            ptrs[index] = grad.data_ptr()

        return hook

    # -- after backward ----------------------------------------------------------------------------

    @torch.no_grad()
    def result(self, max_norm: float | Tensor | None = None, *, grad_scale: Tensor | None = None) -> NormResult:
        """Total norm and clip coefficient of the tracked grads as they are now; ends the step.

        Returns a :class:`~fusedclip.backends.base.NormResult`: ``total`` (0-d, torch's promoted
        dtype of the grads, on the first grad's device), ``coef`` (float64
        ``min(max_norm / (total + 1e-6), 1)`` from the unrounded total; None without ``max_norm``)
        and ``acc`` (the float64 accumulator). ``grad_scale`` (0-d tensor ``s``, e.g. a GradScaler's
        inverse scale while the grads are still scaled): the grads count as ``s * grad``, the total
        is ``s`` times theirs and ``coef`` is the factor for the stored grads (as in
        :func:`fusedclip.backends.base.finish`). No host synchronisation. Without grads: ``total`` is
        ``tensor(0.)`` and ``coef`` 1. The slots are zeroed and every record dropped, so the next
        backward starts a new step.
        """
        if max_norm is not None:
            max_norm = check_max_norm(max_norm)
        try:
            return self._result(max_norm, grad_scale)
        finally:
            self.reset()

    def _result(self, max_norm: float | Tensor | None, grad_scale: Tensor | None) -> NormResult:
        written = self._written
        dtypes: list[torch.dtype] = []
        first: torch.device | None = None
        stale: list[Tensor] = []
        counted: set[tuple[torch.device, torch.dtype]] = set()
        for index, param in enumerate(self.params):
            grad = param.grad
            if grad is not None:
                dtypes.append(grad.dtype)
                if first is None:
                    first = grad.device
            if grad is not None and self._record_matches(index, grad):
                view = written[index]
                counted.add((grad.device, torch.float64 if view.dtype == torch.float64 else torch.float32))  # type: ignore[union-attr]
                continue
            slot = written[index]
            if slot is not None:  # a hook value this grad no longer has: it must not count
                slot.zero_()
            if grad is not None:
                stale.append(grad)
        if first is None:
            total = torch.tensor(0.0, device=torch.get_default_device())  # torch's result without grads
            coef = None if max_norm is None else torch.ones((), dtype=ACC_DTYPE, device=total.device)
            return NormResult(total, coef, torch.zeros((), dtype=ACC_DTYPE, device=total.device))
        accs = [_reduce(self._slots[key].to(ACC_DTYPE), self.norm).to(first) for key in self._slots if key in counted]
        if stale:
            from .clip import get_norms

            _, per_tensor = get_norms(stale, self.norm.p, backend=self.backend)
            accs.append(_reduce(per_tensor.to(ACC_DTYPE), self.norm).to(first))
        acc = accs[0] if len(accs) == 1 else combine_accumulators(accs, self.norm)
        return finish(acc, self.norm, max_norm, result_dtype_of(dtypes), grad_scale)

    def _record_matches(self, index: int, grad: Tensor) -> bool:
        """True when the slot was computed from ``grad`` as it is now (same object, same version,
        same memory): host-side attribute reads only."""
        ref = self._refs[index]
        return ref is not None and ref() is grad and grad._version == self._versions[index] and grad.data_ptr() == self._ptrs[index]

    def invalidate(self) -> None:
        """Distrust every hook value of this step: :meth:`result` recomputes every grad. Call it
        after writes autograd's version counter does not see (``GradScaler.unscale_``,
        ``grad.data`` edits)."""
        self._refs[:] = [None] * len(self.params)

    def reset(self) -> None:
        """Discard this step's hook values (slots zeroed on the device, records dropped)."""
        for slots in self._slots.values():
            slots.zero_()
        n = len(self.params)
        self._refs[:] = [None] * n
        self._written[:] = [None] * n

    @torch.no_grad()
    def clip_(self, max_norm: float | Tensor) -> Tensor:
        """``clip_grad_norm_(tracker.params, max_norm)`` from the tracked norms: one scale pass over
        the grads, no norm pass (ends the step). Returns the total norm."""
        result = self.result(max_norm)
        grads = [param.grad for param in self.params if param.grad is not None]
        if grads:
            engine.scale_(engine.prepare(grads, self.backend), result.coef)  # type: ignore[arg-type]
        return result.total

    def remove(self) -> None:
        """Remove the hooks (the tracker then recomputes every grad at :meth:`result`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> NormTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "tracking" if self.tracking else f"not tracking ({self.untracked_reason or 'no hooks'})"
        return f"<NormTracker p={self.norm} params={len(self.params)} {state}>"


def _fold(coef: Tensor, call: engine.PreparedCall, dtypes: set[torch.dtype]) -> Tensor | None:
    """``fusedclip.optim``'s folding (see its module docstring): the optimizer divides by
    ``1 / coef`` when that is a normal float32 (no write to the grads), else one scale pass applies
    ``coef`` (chosen on the device); float64 grads always take the scale pass."""
    tiny = torch.finfo(torch.float32).tiny
    if any(dtype in (torch.float64, torch.complex128) for dtype in dtypes):
        engine.scale_(call, coef)
        return None
    coef = coef.to(torch.float64)
    carried = (coef >= tiny) & (coef <= 1.0 / tiny)
    one = torch.ones_like(coef)
    engine.scale_(call, torch.where(carried, one, coef))
    return torch.where(carried, coef.reciprocal(), one).to(torch.float32)


@torch.no_grad()
def tracked_step(optimizer: torch.optim.Optimizer, max_norm: float | Tensor, norm_type: float | str, tracker: NormTracker, scaler: Any = None) -> Tensor:
    """``clip_and_step_(optimizer, max_norm, tracker=tracker)``: the tracker's norm (no norm pass),
    folded into a fused optimizer's ``grad_scale``; any other optimizer gets one scale pass, then
    its step. Returns the total norm."""
    if not isinstance(tracker, NormTracker):
        raise TypeError(f"tracker must be a fusedclip.NormTracker; got {type(tracker).__name__}")
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        raise NotImplementedError("clip_and_step_(tracker=...) does not take an enabled GradScaler; use clip_and_step_(scaler=...) without a tracker")
    if parse_norm_type(norm_type) != tracker.norm:
        raise ValueError(f"norm_type {norm_type!r} differs from the tracker's ({tracker.norm})")
    tracked = {id(param) for param in tracker.params}
    params = [param for group in optimizer.param_groups for param in group["params"]]
    missing = sum(id(param) not in tracked for param in params)
    if missing:
        raise ValueError(f"{missing} of the optimizer's parameters are not tracked by the tracker")
    result = tracker.result(max_norm)
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        optimizer.step()
        return result.total
    call = engine.prepare(grads, tracker.backend)
    fused = optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False)
    if not fused:
        engine.scale_(call, result.coef)  # type: ignore[arg-type]
        optimizer.step()
        return result.total
    grad_scale = _fold(result.coef, call, {grad.dtype for grad in grads})  # type: ignore[arg-type]
    if grad_scale is not None:
        optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        if hasattr(optimizer, "grad_scale"):
            del optimizer.grad_scale  # type: ignore[attr-defined]
    return result.total
