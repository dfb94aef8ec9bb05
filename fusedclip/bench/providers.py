"""The implementations measured side by side: torch's own variants, apex, and every fusedclip backend.

A provider turns a ``max_norm`` into a call ``clip(params) -> total_norm``. fusedclip backends are
found through the backend registry, so a backend added to fusedclip appears here by itself.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import backends as fusedclip_backends
from ..clip import clip_grad_norm_ as fusedclip_clip_grad_norm_
from .errors import BenchError

Clip = Callable[[list[Tensor]], Tensor]

#: the provider every speedup is relative to; always measured
BASELINE = "torch"
#: --provider group names and what they expand to (a prefix of provider names)
GROUPS = {"fusedclip": "fusedclip-"}

INTERPRETER_REASON = (
    "excluded: TRITON_INTERPRET=1 runs Triton kernels through its interpreter, far too slow to benchmark"
)


@dataclass(frozen=True)
class Provider:
    """One implementation of clip_grad_norm_; ``unavailable`` says why it cannot run here."""

    name: str
    label: str
    bind: Callable[[float], Clip]
    unavailable: str | None = None
    compiles: bool = False  # the first call of each binding compiles (timed apart, budgeted)

    @property
    def available(self) -> bool:
        return self.unavailable is None


def _torch_eager(foreach: bool | None) -> Callable[[float], Clip]:
    def bind(max_norm: float) -> Clip:
        return lambda params: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)

    return bind


def _torch_compiled(max_norm: float) -> Clip:
    # Every binding is a new graph (max_norm is a constant to dynamo); forget the previous ones so
    # that dynamo's per-function recompile limit never silently sends a binding back to eager.
    torch._dynamo.reset()

    def clip(params: list[Tensor]) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    return torch.compile(clip)


def _compile_reason(device: torch.device) -> str | None:
    try:
        import torch._dynamo as dynamo
    except Exception as error:  # pragma: no cover - torch builds without dynamo
        return f"torch._dynamo cannot be imported: {error}"
    if not dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python/torch combination"
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        return "no C++ compiler found (inductor's CPU backend needs one)"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (inductor's CUDA backend needs it)"
    return None


def _apex(device: torch.device) -> tuple[Callable[[float], Clip], str | None]:
    def unbound(max_norm: float) -> Clip:  # never called while unavailable
        raise RuntimeError("apex is unavailable")

    if device.type != "cuda":
        return unbound, "apex's fused clipping runs on CUDA tensors only"
    try:
        from apex.contrib.clip_grad import clip_grad as apex_clip
    except Exception as error:
        return unbound, f"apex is not importable ({type(error).__name__}: {error})"
    if not getattr(apex_clip, "_kernel_import_succeeded", False):
        return unbound, "apex is installed without its CUDA extension amp_C (its clip_grad_norm_ would be torch's)"

    def bind(max_norm: float) -> Clip:
        return lambda params: apex_clip.clip_grad_norm_(params, max_norm)

    return bind, None


def _fusedclip(backend: str) -> Callable[[float], Clip]:
    def bind(max_norm: float) -> Clip:
        return lambda params: fusedclip_clip_grad_norm_(params, max_norm, backend=backend)

    return bind


def _fusedclip_reason(backend: str, device: torch.device) -> str | None:
    if backend == "triton" and device.type != "cuda":
        # Not timed off CUDA either way, so triton (seconds to import) is not even imported.
        if os.environ.get("TRITON_INTERPRET") == "1":
            return INTERPRETER_REASON
        return "Triton kernels run on CUDA tensors (CPU tensors only through its interpreter, too slow to time)"
    reason = fusedclip_backends._reason(backend, device, None)
    if reason is None and backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETER_REASON
    return reason


def discover(device: torch.device) -> list[Provider]:
    """Every provider the benchmark knows, available or not, in report order."""
    from torch.utils._foreach_utils import _device_has_foreach_support

    foreach = True if _device_has_foreach_support(device) else None
    found = [
        Provider(BASELINE, "torch clip_grad_norm_ (foreach)", _torch_eager(foreach)),
        Provider("torch-loop", "torch clip_grad_norm_ (foreach=False)", _torch_eager(False)),
        Provider(
            "torch-compile", "torch.compile(clip_grad_norm_)", _torch_compiled, _compile_reason(device), compiles=True
        ),
    ]
    apex_bind, apex_reason = _apex(device)
    found.append(Provider("apex", "apex.contrib.clip_grad.clip_grad_norm_", apex_bind, apex_reason))
    for backend in fusedclip_backends.BACKEND_NAMES:
        found.append(
            Provider(
                f"fusedclip-{backend}",
                f"fusedclip backend={backend!r}",
                _fusedclip(backend),
                _fusedclip_reason(backend, device),
            )
        )
    return found


def select(known: Sequence[Provider], requested: Sequence[str] | None, device: torch.device) -> list[Provider]:
    """The providers to measure: all available ones, or the requested ones (comma lists and the
    group name ``fusedclip`` allowed), always with the baseline first. Unknown names and requested
    providers that cannot run here raise :class:`BenchError` with the reason."""
    by_name = {provider.name: provider for provider in known}
    if not requested:
        return [provider for provider in known if provider.available]
    chosen: list[str] = []
    for item in requested:
        for raw in item.split(","):
            name = raw.strip().lower()
            if not name:
                continue
            if name in GROUPS:
                members = [p for p in known if p.name.startswith(GROUPS[name])]
                names = [p.name for p in members if p.available]
                if not names:
                    reasons = "; ".join(f"{p.name}: {p.unavailable}" for p in members)
                    raise BenchError(f"no {name} provider can run on {device.type} here ({reasons})")
            elif name in by_name:
                provider = by_name[name]
                if not provider.available:
                    raise BenchError(f"provider {name!r} is unavailable on {device.type}: {provider.unavailable}")
                names = [name]
            else:
                accepted = ", ".join([p.name for p in known] + list(GROUPS))
                raise BenchError(f"unknown provider {raw.strip()!r}; choose from: {accepted}")
            chosen += [n for n in names if n not in chosen]
    if not chosen:
        raise BenchError("--provider was given no provider name")
    if BASELINE not in chosen:
        chosen.insert(0, BASELINE)  # every speedup is relative to it
    order = [provider.name for provider in known]
    return [by_name[name] for name in sorted(chosen, key=order.index)]
