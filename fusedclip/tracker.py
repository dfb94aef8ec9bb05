"""Gradient norms accumulated during backward, while each grad is still hot in cache.

:class:`NormTracker` computes every grad's own norm on the device as soon as the grad is final, with
no host synchronisation, and keeps it as a 0-d tensor. After backward, :meth:`NormTracker.result`
stacks and reduces them (a few tiny ops per device) and finishes total and coefficient exactly as
:func:`fusedclip.clip_grad_norm_` does (:func:`fusedclip.backends.base.finish`), so clipping costs
no extra pass over gradient memory: with ``clip_and_step_(optimizer, max_norm, tracker=tracker)``
a training step is backward (with hooks) plus one fused optimizer step that applies the folded
coefficient.

Where the norms are taken:

* Single process (or a plain list of parameters): a ``register_post_accumulate_grad_hook`` on every
  leaf parameter with at least ``min_numel`` elements. Smaller tensors get no hook: a hook costs a
  Python call and a kernel launch (about 25 µs on a 2-core CPU) whatever the size, more than rereading a
  small grad in the one fused pass :meth:`result` makes over every grad it has no value for.
* ``DistributedDataParallel``: given the DDP module, the tracker registers a DDP communication hook
  (:meth:`NormTracker.ddp_comm_hook`) wrapping DDP's all-reduce (or a hook you pass as
  ``comm_hook``). When a bucket's reduction completes (the future's ``then``), the norms of its
  parameters' segments of the reduced flat buffer are taken in one ``_foreach_norm``: the norms of
  the averaged grads DDP then writes into ``.grad``. No post-accumulate hooks are registered.

Semantics (tested against ``torch.nn.utils.clip_grad_norm_`` computed after backward):

* The result is the norm of every tracked tensor's ``.grad`` *as it is when* :meth:`result` *runs*,
  exactly the set ``clip_grad_norm_(params)`` would see. Hook values are only a cache: with each
  value the grad's identity (a weak reference), ``_version`` and ``data_ptr()`` are recorded, and at
  :meth:`result` (host-side checks, no device synchronisation) any grad whose record does not match
  (modified in place afterwards, replaced, ``zero_grad(set_to_none=False)``, or never seen by a hook:
  small, frozen or non-leaf tensors, a grad assigned by hand) is recomputed in one fused pass
  (:func:`fusedclip.engine.total_norm`) over those grads only. A parameter without a grad counts
  nothing.
* Shared grad memory (post-accumulate hooks only): the version check sees only writes made through
  tensors that share the grad's version counter. Collectives (c10d's in-place ``all_reduce`` leaves
  the versions of its buffer and of every view of it unchanged) and other aliases of the memory
  (``.data``, a tensor built on the same storage) write without it. So a hook value is kept only
  for a grad that owns its storage outright: ``grad._base is None`` and
  ``grad.untyped_storage().nbytes() == grad.nbytes``. A grad that is a view (``_base`` set: DDP's
  ``gradient_as_bucket_view`` buckets, a flat grad buffer you assign views of) or that covers only
  part of its storage (autograd hands parameters concatenated or stacked in the forward slices of
  one gradient buffer; cuDNN RNNs' weight grads may be slices of one flat buffer too, unmeasured)
  gets no hook value and is recomputed at :meth:`result`. Ordinary grads (linear, convolution, embedding,
  normalisation, CPU LSTM, attention weights, accumulated micro-batches) own their storage. The rule
  is checked in the hook and again at :meth:`result`. The DDP-module route is exempt: it reads the
  reduced bucket itself.
* Gradient accumulation: the post-accumulate hook sees the accumulated grad and replaces the
  previous value, so only the final grad counts. Under DDP, micro-batches in ``no_sync()`` run no
  communication hook; the final, synchronised micro-batch reduces the accumulated grads and only
  its buckets count.
* DDP records: a bucket's value is taken before DDP copies the reduced buffer into ``.grad``, so the
  records are made at the end of backward, in an autograd final callback that runs after DDP's own
  (DDP's writes bump the grads' versions). A grad counts from its bucket only if DDP wrote it in
  that backward (its version or identity changed since the end of the backward pass proper) or it is
  a view of the reduced segment itself (``gradient_as_bucket_view=True``); otherwise it is
  recomputed. That covers ``find_unused_parameters`` (a globally unused parameter keeps its old grad
  and is recomputed; one without a grad counts nothing), ``static_graph`` (its first iteration
  reduces inside DDP's finalisation, so that step recomputes) and edits after backward (version).
* Step boundary: :meth:`result` consumes the step (every record dropped, host-side only);
  :meth:`reset` discards a step without computing it. Call :meth:`result` (or
  ``clip_and_step_(..., tracker=)``) once per optimizer step.
* Subsets: ``result(params=...)`` counts only those tracked tensors, and
  ``clip_and_step_(optimizer, max_norm, tracker=tracker)`` counts exactly the optimizer's parameters
  (the norm ``clip_and_step_(optimizer, max_norm)`` would clip with), however many more the tracker
  tracks. An optimizer parameter the tracker does not track is refused before anything is touched.
  A subset still ends the whole step, so a second optimizer clipped in the same step with the same
  tracker gets its grads recomputed (correct, without the hooks' benefit): give each optimizer its
  own tracker over its parameters.
* Tied weights: parameters are deduplicated by identity (as ``model.parameters()`` is), so a weight
  used twice counts once; autograd accumulates its two contributions before the one hook call.
* Given a DDP module's parameters rather than the module, the post-accumulate hooks run before the
  all-reduce. Without ``gradient_as_bucket_view`` DDP copies the reduced bucket into the grads
  (``copy_`` bumps their versions) and the hook values are discarded; with it the grads are views
  of the buckets, which the all-reduce (or a communication hook) rewrites without bumping a version,
  and the shared-memory rule above recomputes them. Correct either way, but the hooks are wasted
  work: give the tracker the DDP module.
* FSDP2 / DTensor parameters are not supported: refused at construction, and a DTensor grad
  reaching a hook raises.

Communication hooks: ``NormTracker(ddp)`` registers the tracker's hook around torch's
``allreduce_hook`` with DDP's process group (what DDP does without a hook, up to the order of the
division by the world size). ``NormTracker(ddp, comm_hook=hook, comm_state=state)`` wraps any hook
whose future's value is the flat reduced bucket DDP copies into the grads: ``fp16_compress_hook``,
``bf16_compress_hook`` (the norm is then of the decompressed grads DDP writes), or your own. DDP
accepts one communication hook per model, so a model that already has one is refused: build the
tracker with that hook as ``comm_hook`` instead, or pass ``register_comm_hook=False`` and register
``tracker.ddp_comm_hook(your_hook)`` yourself. Hooks that return something other than the reduced
bucket (PowerSGD's state-dependent hooks do return it; check yours), DDP's builtin C++ hooks and
``mixed_precision=`` (which registers its own hook) are not supported. DDP cannot unregister a
communication hook: after :meth:`remove` the tracker's hook passes the inner one through.

Accuracy: each grad's norm is accumulated by ``torch.linalg.vector_norm`` (``_foreach_norm`` for
DDP buckets) in float32 (float64 for float64 grads; the real dtype of complex grads) and the
per-tensor norms are combined in float64 and rounded once: the accuracy contract of fusedclip's
``torch`` backend (a tensor whose norm exceeds float32's range gives inf, as torch's own clipping
does, except on the CPU: there a norm whose float32 sum overflowed, or whose squares may have
underflowed, is recomputed from the grad after backward, in float64). Norm orders: 2, 1 and inf.

Limits: writes that bypass autograd's version counter cannot be seen. Notably
``GradScaler.unscale_`` (torch's ``_amp_foreach_non_finite_check_and_unscale_`` does not bump the
grads' versions, on CPU or CUDA), ``grad.data.mul_(...)`` and a fused optimizer's ``grad_scale``
write-back. After such a write call :meth:`NormTracker.invalidate` (everything is recomputed), or
better, with AMP, skip ``unscale_`` and pass the scaler's inverse scale as ``result(max_norm,
grad_scale=...)``. A fused optimizer's write-back happens after :meth:`result`, which drops every
record, so it is harmless. Whether the tracker pays off depends on the hardware and on tensor
sizes: see ``benchmarks/results/tracker_cpu.md``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import engine
from .backends import requested_backend
from .backends.base import ACC_DTYPE, NormResult, combine_accumulators, finish, host_reads_are_free
from .backends.torch_backend import float32_norms_untrusted
from .inputs import check_max_norm
from .norm_type import NormKind, NormSpec, parse_norm_type
from .optim import fold_coefficient, grads_foldable
from .plan import result_dtype_of

__all__ = ["NormTracker", "DEFAULT_MIN_NUMEL"]

_SUPPORTED = (1.0, 2.0, math.inf)

#: tensors with fewer elements get no post-accumulate hook by default (recomputed at ``result``)
DEFAULT_MIN_NUMEL = 1 << 18

#: the dtype a grad's norm is accumulated and kept in (complex: vector_norm's own real dtype)
_NORM_DTYPE: dict[torch.dtype, torch.dtype | None] = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.complex64: None,
    torch.complex128: None,
}

#: grad dtypes whose norms are accumulated in float64 (no float32 overflow or underflow to fear)
_WIDE_DTYPES = (torch.float64, torch.complex128)

#: a comm hook: (state, bucket) -> future of the reduced flat bucket
CommHook = Callable[[Any, Any], "torch.futures.Future[Tensor]"]


def _is_dtensor(tensor: object) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements")


def _shares_storage(grad: Tensor) -> bool:
    """True when ``grad``'s memory may also be reachable through another tensor: ``grad`` is a view
    (``_base`` set) or covers only part of its storage (or overlaps itself). Such memory can be
    rewritten without bumping ``grad._version`` (c10d collectives on a bucket, ``.data`` of an alias,
    another tensor on the same storage), so a norm taken in a hook cannot be trusted for it.
    Host-side attribute reads only; a tensor without an accessible storage counts as shared."""
    if grad._base is not None:
        return True
    try:
        return grad.untyped_storage().nbytes() != grad.nbytes
    except (RuntimeError, NotImplementedError, TypeError):
        return True


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


def _drop_untrusted(values: list[Tensor], grads: list[Tensor], p: float) -> tuple[list[Tensor], list[Tensor]]:
    """The hooked norms that stand, and the grads whose norms do not: on the CPU (where reading
    them is free) a float32-accumulated norm whose squares overflowed or may have underflowed
    (``float32_norms_untrusted``) is recomputed with the grads read after backward, by a backend
    that redoes such sums in float64. Elsewhere every norm stands, as torch's own per-tensor norms
    do (inf for grads above ~1.8e19)."""
    suspect = [i for i, (value, grad) in enumerate(zip(values, grads)) if host_reads_are_free(value.device) and grad.dtype not in _WIDE_DTYPES]
    if not suspect:
        return values, []
    norms = torch.stack([values[i] for i in suspect]).tolist()
    bad = {suspect[i] for i in float32_norms_untrusted(norms, [grads[i].numel() for i in suspect], p)}
    if not bad:
        return values, []
    return [v for i, v in enumerate(values) if i not in bad], [g for i, g in enumerate(grads) if i in bad]


def _queue_final_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the current backward's graph task ends (after the callbacks already
    queued). Raises RuntimeError outside a backward."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)  # type: ignore[attr-defined]


class _BucketLayout:
    """What a DDP bucket's reduced flat buffer holds, computed once per bucket layout."""

    __slots__ = ("indices", "offsets", "lengths", "contiguous", "ok")

    def __init__(self, indices: list[int], offsets: list[int], lengths: list[int], ok: bool) -> None:
        self.indices = indices
        self.offsets = offsets
        self.lengths = lengths
        self.contiguous = all(offsets[i] == sum(lengths[:i]) for i in range(len(offsets)))
        self.ok = ok


class NormTracker:
    """Accumulate every grad's norm during backward; finish total and coefficient after it.

    Args:
        model_or_params: an ``nn.Module`` (its ``parameters()``), a ``DistributedDataParallel``
            module (norms from its reduced buckets, see the module docstring) or an iterable of
            tensors. Duplicates are counted once. Every tracked tensor with a grad counts at
            :meth:`result`, hooked or not.
        norm_type: 2, 1 or inf (other orders raise ``NotImplementedError``: use
            :func:`fusedclip.clip_grad_norm_`).
        backend: the fusedclip backend for the recomputation pass (None: automatic).
        min_numel: tensors with fewer elements get no post-accumulate hook (their grads are read in
            :meth:`result`'s fused pass, which is cheaper for them than a hook call). 0 hooks
            every tensor. Not used for DDP, whose buckets are reduced whole.
        comm_hook: DDP only: the communication hook to wrap (default: torch's ``allreduce_hook``).
        comm_state: DDP only: its state (default: the DDP module's process group).
        register_comm_hook: DDP only: register the wrapped hook on the module (False: call
            ``ddp.register_comm_hook(state, tracker.ddp_comm_hook(hook))`` yourself).

    Use::

        tracker = fusedclip.NormTracker(model)
        for batch in data:
            loss(model, batch).backward()
            fusedclip.clip_and_step_(optimizer, max_norm=1.0, tracker=tracker)
            optimizer.zero_grad()
    """

    def __init__(
        self,
        model_or_params: torch.nn.Module | Iterable[Tensor],
        norm_type: float | str = 2.0,
        *,
        backend: str | None = None,
        min_numel: int = DEFAULT_MIN_NUMEL,
        comm_hook: CommHook | None = None,
        comm_state: Any = None,
        register_comm_hook: bool = True,
    ) -> None:
        norm = parse_norm_type(norm_type)
        if norm.p not in _SUPPORTED:
            raise NotImplementedError(
                f"NormTracker supports norm_type 2, 1 and inf; got {norm}. Use fusedclip.clip_grad_norm_ after backward instead."
            )
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative int; got {min_numel!r}")
        self.norm: NormSpec = norm
        self.backend = requested_backend(backend)
        self.min_numel = min_numel
        is_module = isinstance(model_or_params, torch.nn.Module)
        ddp = model_or_params if is_module and _is_ddp(model_or_params) else None
        if ddp is None and (comm_hook is not None or comm_state is not None):
            raise ValueError("comm_hook and comm_state apply to a DistributedDataParallel module only")
        if comm_hook is not None and not callable(comm_hook):
            raise TypeError(f"comm_hook must be callable; got {type(comm_hook).__name__}")
        if ddp is not None and register_comm_hook and getattr(ddp, "_comm_hooks", None):
            raise ValueError(
                "this DistributedDataParallel module already has a communication hook and DDP takes only one:"
                " build the tracker before registering it, passing it as NormTracker(ddp, comm_hook=hook,"
                " comm_state=state), or pass register_comm_hook=False and register tracker.ddp_comm_hook(hook)"
            )
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
        n = len(params)
        #: per parameter: (norm value, weakref to the grad, its _version, its data_ptr) or None
        self._records: list[tuple[Tensor, Any, int, int] | None] = [None] * n
        self._handles: list[Any] = []
        #: why no post-accumulate hooks are registered (None: hooking)
        self.untracked_reason: str | None = None
        # DDP state
        self._ddp = ddp
        self._comm_active = False
        self._index_of = {id(param): index for index, param in enumerate(params)}
        self._layouts: dict[tuple[int, ...], _BucketLayout] = {}
        self._generation = 0
        self._pending: dict[int, tuple[int, Tensor, int]] = {}  # index -> (generation, value, segment ptr)
        self._before: list[tuple[Any, int]] = [(None, 0)] * n
        if ddp is not None:
            self.untracked_reason = "DistributedDataParallel module: norms come from its communication hook"
            if register_comm_hook:
                state = ddp.process_group if comm_state is None else comm_state
                ddp.register_comm_hook(state, self.ddp_comm_hook(comm_hook))
            return
        for index, param in enumerate(params):
            if param.requires_grad and param.is_leaf and param.numel() >= min_numel:
                self._handles.append(param.register_post_accumulate_grad_hook(self._make_hook(index)))

    # -- during backward ---------------------------------------------------------------------------

    @property
    def tracking(self) -> bool:
        """True while hooks (post-accumulate or communication) compute norms during backward."""
        return bool(self._handles) or self._comm_active

    @property
    def hooked(self) -> int:
        """How many parameters carry a post-accumulate hook."""
        return len(self._handles)

    def _make_hook(self, index: int) -> Callable[[Tensor], None]:
        order = self.norm.p
        records = self._records
        strided = torch.strided
        plain = Tensor
        norm_dtypes = _NORM_DTYPE
        vector_norm = torch.linalg.vector_norm
        ref = weakref.ref

        def hook(param: Tensor) -> None:
            grad = param.grad
            if grad is None or grad.layout is not strided or grad.numel() == 0:
                records[index] = None  # recomputed (or skipped) at result()
                return
            if type(grad) is not plain and _is_dtensor(grad):
                raise NotImplementedError("NormTracker does not support DTensor grads (FSDP2); use fusedclip.clip_grad_norm_")
            dtype = grad.dtype
            if dtype not in norm_dtypes or _shares_storage(grad):
                records[index] = None  # recomputed at result()
                return
            source = grad.detach() if grad.requires_grad else grad  # create_graph=True backward
            value = vector_norm(source, order, dtype=norm_dtypes[dtype])
            records[index] = (value, ref(grad), grad._version, grad.data_ptr())

        return hook

    def ddp_comm_hook(self, inner: CommHook | None = None) -> Callable[[Any, Any], torch.futures.Future[Tensor]]:
        """A DDP communication hook that runs ``inner`` (default: torch's ``allreduce_hook``) and,
        when its future completes, takes the norm of each parameter's segment of the reduced bucket
        (on the device, no host synchronisation). Register it with
        ``ddp.register_comm_hook(state, tracker.ddp_comm_hook(inner))``, where ``state`` is
        ``inner``'s state (the process group for torch's default hooks). ``inner``'s future must
        hold the flat reduced bucket that DDP copies into the grads."""
        if self._ddp is None:
            raise ValueError("ddp_comm_hook needs a tracker built from a DistributedDataParallel module")
        if inner is None:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            inner = allreduce_hook
        self._comm_active = True
        tracker = self

        def fusedclip_norm_tracker_hook(state, bucket):  # no annotations: DDP compares them with real types
            if not tracker._comm_active or isinstance(bucket, tuple):
                return inner(state, bucket)
            generation = tracker._arm(bucket)
            layout = tracker._layout(bucket) if generation >= 0 else None
            fut = inner(state, bucket)
            if layout is None or not layout.ok:
                return fut
            return fut.then(lambda done: tracker._bucket_reduced(done, layout, generation))

        return fusedclip_norm_tracker_hook

    def _arm(self, bucket: Any) -> int:
        """At the first bucket of a backward (DDP launches buckets in index order): a new generation
        and the final callbacks that record the grads DDP writes. -1: not inside a backward."""
        if bucket.index() == 0:
            self._generation += 1
            generation = self._generation
            try:
                _queue_final_callback(lambda: self._end_of_backward(generation))
            except RuntimeError:
                self._generation += 1  # nothing of this reduction is ever committed
                return -1
        return self._generation

    def _layout(self, bucket: Any) -> _BucketLayout:
        params = bucket.parameters()
        key = tuple(id(param) for param in params)
        layout = self._layouts.get(key)
        if layout is None:
            buffer = bucket.buffer()
            indices = [self._index_of.get(id(param), -1) for param in params]
            ok = all(index >= 0 for index in indices) and buffer.layout is torch.strided and buffer.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
            offsets: list[int] = []
            lengths: list[int] = []
            if ok:
                size = buffer.element_size()
                for grad in bucket.gradients():
                    offsets.append((grad.data_ptr() - buffer.data_ptr()) // size)
                    lengths.append(grad.numel())
                ok = len(offsets) == len(indices)
            layout = self._layouts[key] = _BucketLayout(indices, offsets, lengths, ok)
        return layout

    def _bucket_reduced(self, done: Any, layout: _BucketLayout, generation: int) -> Tensor:
        """``then`` of a bucket's reduction: every segment's norm; returns the reduced bucket."""
        value = done.value()
        flat = value[0] if isinstance(value, (list, tuple)) else value
        if flat.layout is torch.strided and flat.is_contiguous() and flat.dtype in _NORM_DTYPE and flat.numel() >= sum(layout.lengths):
            flat = flat.detach().view(-1)
            if layout.contiguous:
                segments = list(flat[: sum(layout.lengths)].split(layout.lengths))
            else:
                segments = [flat.narrow(0, offset, length) for offset, length in zip(layout.offsets, layout.lengths)]
            norms = torch._foreach_norm(segments, self.norm.p, dtype=_NORM_DTYPE[flat.dtype])
            base = flat.data_ptr()
            size = flat.element_size()
            pending = self._pending
            for index, offset, norm in zip(layout.indices, layout.offsets, norms):
                pending[index] = (generation, norm, base + offset * size)
        return value

    def _end_of_backward(self, generation: int) -> None:
        """First final callback: runs before DDP's finalisation (queued earlier than it is); notes
        each grad's identity and version, then queues :meth:`_commit` to run after DDP's writes."""
        if generation != self._generation:
            return
        self._before = [(param.grad, param.grad._version if param.grad is not None else 0) for param in self.params]
        _queue_final_callback(lambda: self._commit(generation))

    def _commit(self, generation: int) -> None:
        """Second final callback, after DDP copied the reduced buckets into the grads: a bucket value
        becomes a record for each grad DDP wrote (or that is a view of the reduced segment)."""
        if generation != self._generation:
            return
        records, before, params = self._records, self._before, self.params
        ref = weakref.ref
        for index, (gen, value, segment) in list(self._pending.items()):
            if gen != generation:
                continue
            grad = params[index].grad
            old, old_version = before[index]
            if grad is not None and (grad is not old or grad._version != old_version or grad.data_ptr() == segment):
                records[index] = (value, ref(grad), grad._version, grad.data_ptr())
            else:
                records[index] = None
        self._pending.clear()
        self._before = [(None, 0)] * len(params)

    # -- after backward ----------------------------------------------------------------------------

    @torch.no_grad()
    def result(
        self, max_norm: float | Tensor | None = None, *, grad_scale: Tensor | None = None, params: Iterable[Tensor] | None = None
    ) -> NormResult:
        """Total norm and clip coefficient of the tracked grads as they are now; ends the step.

        Returns a :class:`~fusedclip.backends.base.NormResult`: ``total`` (0-d, torch's promoted
        dtype of the grads, on the first grad's device), ``coef`` (float64
        ``min(max_norm / (total + 1e-6), 1)`` from the unrounded total; None without ``max_norm``)
        and ``acc`` (the float64 accumulator). ``grad_scale`` (0-d tensor ``s``, e.g. a GradScaler's
        inverse scale while the grads are still scaled): the grads count as ``s * grad``, the total
        is ``s`` times theirs and ``coef`` is the factor for the stored grads (as in
        :func:`fusedclip.backends.base.finish`). No host synchronisation. Without grads: ``total`` is
        ``tensor(0.)`` and ``coef`` 1. ``params``: count only these tensors (each must be tracked,
        else ValueError before anything is read; None: every tracked tensor), as
        ``clip_grad_norm_(params)`` would; ``clip_and_step_(tracker=)`` passes the optimizer's
        parameters. Every record is dropped (those outside ``params`` too), so the next backward
        starts a new step.
        """
        if max_norm is not None:
            max_norm = check_max_norm(max_norm)
        only = None if params is None else self._subset(params)
        try:
            return self._result(max_norm, grad_scale, only)
        finally:
            self.reset()

    def _subset(self, params: Iterable[Tensor]) -> set[int]:
        """The ids of ``params``, all of them tracked (ValueError naming how many are not)."""
        if isinstance(params, Tensor):
            params = [params]
        ids = {id(param) for param in params}
        missing = sum(ident not in self._index_of for ident in ids)
        if missing:
            raise ValueError(
                f"{missing} of the {len(ids)} tensors given are not tracked by the tracker;"
                " build it over them (NormTracker(model) or NormTracker(list_of_params))"
            )
        return ids

    def _result(self, max_norm: float | Tensor | None, grad_scale: Tensor | None, only: set[int] | None = None) -> NormResult:
        records = self._records
        dtypes: list[torch.dtype] = []
        first: torch.device | None = None
        several = False
        trusted: list[Tensor] = []
        trusted_grads: list[Tensor] = []
        stale: list[Tensor] = []
        for index, param in enumerate(self.params):
            grad = param.grad
            if grad is None or (only is not None and id(param) not in only):
                continue
            dtypes.append(grad.dtype)
            if first is None:
                first = grad.device
            elif not several and grad.device != first:
                several = True
            if self._record_matches(index, grad):
                trusted.append(records[index][0])  # type: ignore[index]
                trusted_grads.append(grad)
            else:
                stale.append(grad)
        if trusted and self.norm.p != math.inf:
            trusted, recompute = _drop_untrusted(trusted, trusted_grads, self.norm.p)
            stale.extend(recompute)
        if first is None:
            total = torch.tensor(0.0, device=torch.get_default_device())  # torch's result without grads
            coef = None if max_norm is None else torch.ones((), dtype=ACC_DTYPE, device=total.device)
            return NormResult(total, coef, torch.zeros((), dtype=ACC_DTYPE, device=total.device))
        accs: list[Tensor] = []
        if trusted:
            if several:
                by_device: dict[torch.device, list[Tensor]] = {}
                for value in trusted:
                    by_device.setdefault(value.device, []).append(value)
                groups = list(by_device.values())
            else:
                groups = [trusted]
            for group in groups:
                accs.append(_reduce(torch.stack(group).to(ACC_DTYPE), self.norm).to(first))
        if stale:
            accs.append(engine.total_norm(engine.prepare(stale, self.backend), self.norm).acc.to(first))
        acc = accs[0] if len(accs) == 1 else combine_accumulators(accs, self.norm)
        return finish(acc, self.norm, max_norm, result_dtype_of(dtypes), grad_scale)

    def _record_matches(self, index: int, grad: Tensor) -> bool:
        """True when the value was computed from ``grad`` as it is now (same object, same version,
        same memory) and, for a post-accumulate hook's value, nothing else can have written that
        memory unversioned (:func:`_shares_storage`; the DDP-module route reads the reduced bucket
        itself): host-side attribute reads only."""
        record = self._records[index]
        return (
            record is not None
            and record[1]() is grad
            and grad._version == record[2]
            and grad.data_ptr() == record[3]
            and (self._ddp is not None or not _shares_storage(grad))
        )

    def invalidate(self) -> None:
        """Distrust every hook value of this step: :meth:`result` recomputes every grad. Call it
        after writes autograd's version counter does not see (``GradScaler.unscale_``,
        ``grad.data`` edits)."""
        self._records[:] = [None] * len(self.params)

    def reset(self) -> None:
        """Discard this step's hook values (host-side records only)."""
        self._records[:] = [None] * len(self.params)

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
        """Remove the post-accumulate hooks and turn the communication hook into a pass-through
        (DDP cannot unregister it); the tracker then recomputes every grad at :meth:`result`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._comm_active = False

    def __enter__(self) -> NormTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        if self._comm_active:
            state = "tracking DDP buckets"
        elif self._handles:
            state = f"tracking {len(self._handles)} hooked"
        else:
            state = f"not tracking ({self.untracked_reason or 'no hooks'})"
        return f"<NormTracker p={self.norm} params={len(self.params)} {state}>"


@torch.no_grad()
def tracked_step(optimizer: torch.optim.Optimizer, max_norm: float | Tensor, norm_type: float | str, tracker: NormTracker, scaler: Any = None) -> Tensor:
    """``clip_and_step_(optimizer, max_norm, tracker=tracker)``: the tracker's norm (no norm pass),
    folded into a fused optimizer's ``grad_scale``; any other optimizer gets one scale pass, then
    its step. Returns the total norm.

    The norm is over exactly the optimizer's parameters (``tracker.result(params=...)``), as
    ``clip_and_step_(optimizer, max_norm)`` computes it: grads the tracker tracks beyond them do not
    count and are left unscaled. An optimizer parameter the tracker does not track raises ValueError
    before any grad, parameter or optimizer state is touched."""
    if not isinstance(tracker, NormTracker):
        raise TypeError(f"tracker must be a fusedclip.NormTracker; got {type(tracker).__name__}")
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        raise NotImplementedError("clip_and_step_(tracker=...) does not take an enabled GradScaler; use clip_and_step_(scaler=...) without a tracker")
    if parse_norm_type(norm_type) != tracker.norm:
        raise ValueError(f"norm_type {norm_type!r} differs from the tracker's ({tracker.norm})")
    tracked = tracker._index_of
    params = [param for group in optimizer.param_groups for param in group["params"]]
    missing = sum(id(param) not in tracked for param in params)
    if missing:
        raise ValueError(
            f"{missing} of the optimizer's {len(params)} parameters are not tracked by the tracker;"
            " build it over the optimizer's parameters (or a model that holds them all)"
        )
    result = tracker.result(max_norm, params=params)
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
    with_grads = [param for param in params if param.grad is not None]
    foldable = grads_foldable(call, with_grads)
    grad_scale = fold_coefficient(result.coef, call, {grad.dtype for grad in grads}, foldable)  # type: ignore[arg-type]
    if grad_scale is not None:
        optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        if hasattr(optimizer, "grad_scale"):
            del optimizer.grad_scale  # type: ignore[attr-defined]
    return result.total
