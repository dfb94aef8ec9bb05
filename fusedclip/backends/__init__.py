"""The backend registry: one name per backend, lazy imports, and the choice per device.

Choice: the ``backend=`` argument, else the ``FUSEDCLIP_BACKEND`` environment variable, else the
best backend for the device (``cuda`` -> ``triton`` -> ``torch`` on CUDA, ``cpu`` -> ``torch`` on
the CPU, ``torch`` elsewhere). An explicitly requested backend that cannot run raises with the
reason; the automatic choice never raises and logs its fallbacks once at debug level.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading

import torch

from ..plan import DevicePlan
from .base import Backend, DeviceWork

__all__ = ["Backend", "DeviceWork", "BACKEND_NAMES", "get_backend", "resolve_backend", "available_backends"]

log = logging.getLogger("fusedclip")

#: name -> (module, class); modules are imported on first use (triton is slow to import)
_REGISTRY: dict[str, tuple[str, str]] = {
    "cuda": ("fusedclip.backends.cuda_backend", "CudaBackend"),
    "triton": ("fusedclip.backends.triton_backend", "TritonBackend"),
    "cpu": ("fusedclip.backends.cpu_backend", "CpuBackend"),
    "torch": ("fusedclip.backends.torch_backend", "TorchBackend"),
}
BACKEND_NAMES: tuple[str, ...] = tuple(_REGISTRY)

#: automatic order per device type; anything not listed uses "torch"
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
ENV_VAR = "FUSEDCLIP_BACKEND"

_instances: dict[str, Backend | str] = {}  # a Backend, or the reason it could not be loaded
_lock = threading.Lock()
_logged: set[tuple[str, str]] = set()


def _load(name: str) -> Backend | str:
    found = _instances.get(name)
    if found is not None:
        return found
    with _lock:
        if name not in _instances:
            module_name, class_name = _REGISTRY[name]
            try:
                backend: Backend | str = getattr(importlib.import_module(module_name), class_name)()
            except (ImportError, OSError) as error:  # an optional dependency not installed, a library not loadable
                backend = f"{type(error).__name__}: {error}"
            # anything else is a bug in the backend's module: it propagates, so that it is never
            # mistaken for "unavailable" and silently replaced by the automatic choice
            _instances[name] = backend
        return _instances[name]


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown fusedclip backend {name!r}; choose one of {', '.join(BACKEND_NAMES)} (or None for automatic)")


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises ``RuntimeError`` with the reason if it cannot be loaded."""
    _check_name(name)
    backend = _load(name)
    if isinstance(backend, str):
        raise RuntimeError(f"fusedclip backend {name!r} is unavailable: {backend}")
    return backend


def _reason(name: str, device: torch.device | None, plan: DevicePlan | None) -> str | None:
    backend = _load(name)
    if isinstance(backend, str):
        return backend
    reason = backend.unavailable_reason()
    if reason is None and device is not None:
        reason = backend.device_reason(device)
    if reason is None and plan is not None:
        reason = backend.plan_reason(plan)
    return reason


def requested_backend(backend: str | None) -> str | None:
    """The explicitly requested backend name (argument, else environment), validated; or None."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        if backend is None:
            return None
        backend = backend.strip().lower()
        if backend in ("", "auto"):
            return None
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None; got {type(backend).__name__}")
    _check_name(backend)
    return backend


def resolve_backend(requested: str | None, plan: DevicePlan) -> Backend:
    """The backend to run ``plan``'s grads with (``requested`` from :func:`requested_backend`)."""
    device = plan.device
    if requested is not None:
        reason = _reason(requested, device, plan)
        if reason is not None:
            raise RuntimeError(f"fusedclip backend {requested!r} cannot run on these {device.type} gradients: {reason}")
        return _instances[requested]  # type: ignore[return-value]
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        reason = _reason(name, device, plan)
        if reason is None:
            return _instances[name]  # type: ignore[return-value]
        if (name, reason) not in _logged:
            _logged.add((name, reason))
            log.debug("fusedclip: backend %r not used for %s gradients: %s", name, device.type, reason)
    return _instances["torch"]  # type: ignore[return-value]


def _as_device(device: torch.device | str | int) -> torch.device:
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    if isinstance(device, (str, torch.device)):
        try:
            return torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"available_backends: {device!r} is not a device ({error})") from None
    raise TypeError(
        f"available_backends: device must be a torch.device, a string or an int; got {type(device).__name__}"
    )


def _device_absent(device: torch.device) -> str | None:
    """Why no backend can run on ``device`` in this process (a CUDA device torch cannot see), or None."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"torch sees {torch.cuda.device_count()} CUDA device(s); there is no {device}"
    return None


def _present_devices() -> list[torch.device]:
    """The devices of this process: the CPU, and the current CUDA device when torch sees one."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def available_backends(device: torch.device | str | int | None = None) -> dict[str, bool | str]:
    """Which backends can run, as ``{name: True or the reason it cannot}``, in registry order.

    ``available_backends(device)`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``, or a
    CUDA index): True for a backend that can run on that device's tensors in this process, else the
    reason. True means ``backend=name`` works on real floating-point grads on that device; a reason
    is what ``backend=name`` raises there (``RuntimeError``).

    ``available_backends()`` (no device): True for a backend that can run on at least one device of
    this process -- the CPU, and the current CUDA device when torch sees one; else the reason it runs
    on none of them (one reason per device, ``"cpu: ...; cuda: ..."``, when they differ). On a
    machine without a GPU that is the same as ``available_backends("cpu")``.
    """
    if device is not None:
        target = _as_device(device)
        absent = _device_absent(target)
        return {name: absent or _reason(name, target, None) or True for name in BACKEND_NAMES}
    devices = _present_devices()
    result: dict[str, bool | str] = {}
    for name in BACKEND_NAMES:
        reasons = {str(d.type): _reason(name, d, None) for d in devices}
        if any(reason is None for reason in reasons.values()):
            result[name] = True
        elif len(set(reasons.values())) == 1:
            result[name] = next(iter(reasons.values()))  # type: ignore[assignment]
        else:
            result[name] = "; ".join(f"{kind}: {reason}" for kind, reason in reasons.items())
    return result
