"""The ``cuda`` backend on CPU tensors, with ``csrc/cuda/kernels.cu`` run by the CUDA-on-CPU shim.

As ``TRITON_INTERPRET=1`` lets the triton backend's real code run its kernels on CPU tensors, this
lets fusedclip/backends/cuda_backend.py's real code run the real CUDA kernels on CPU tensors:

* ``ShimLibrary`` loads a shim build (tests/cuda_shim/builder.py) with ctypes and offers the
  ``cuda_*`` functions of ``fusedclip._C`` with the same signatures and the same checks;
* ``install`` makes ``cuda_backend`` call them (its ``_ext`` module is replaced by one whose ``C``
  is the library), answers its few ``torch.cuda`` questions (current device and stream, the
  device context) for CPU tensors, and registers ``EmulatedCudaBackend`` -- ``CudaBackend`` with
  its availability checks opened to CPU tensors -- as the ``cuda`` backend.

Emulated devices differ only in their SM count and blocks per SM; each configuration gets its own
device index (the kernels cache both per index) and its own stream handle (the backend caches its
workspace per stream), so tests can switch between them freely.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from fusedclip import backends, plan
from fusedclip.backends import cuda_backend
from fusedclip.backends.cuda_backend import CudaBackend

#: the emulated GPU of the test suite: small, so launches are quick, but several blocks run at once
DEFAULT_SMS = 2
DEFAULT_BLOCKS_PER_SM = 2
#: fake cudaStream_t handles: STREAM_BASE + device index
STREAM_BASE = 0x5EED_0000
_ERROR_SIZE = 4096
STAT_NAMES = ("launches", "blocks", "switches", "syncs", "warp_ops", "yields", "failures")

_I64 = ctypes.c_int64
_F64 = ctypes.c_double


@dataclass(frozen=True, kw_only=True)
class ShimTables:
    """fusedclip._C.Tables: the same named fields (checked by the ``cuda_*`` functions below)."""

    packed: int
    num_tensors: int
    num_chunks: int
    chunk_elements: int
    total_elements: int = 0


@dataclass(frozen=True, kw_only=True)
class ShimNormArgs:
    """fusedclip._C.NormArgs: the same named fields and defaults."""

    kind: int
    p: float
    total_out: int
    total_dtype: int
    acc_out: int
    coef_out: int = 0
    max_norm: float = 0.0
    max_norm_ptr: int = 0
    max_norm_dtype: int = -1
    scale_ptr: int = 0
    scale_dtype: int = -1
    per_tensor_out: int = 0
    norm_scale_ptr: int = 0


class ShimLibrary:
    """A shim build loaded with ctypes, with fusedclip._C's ``cuda_*`` functions and argument types."""

    Tables = ShimTables
    NormArgs = ShimNormArgs

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        lib = ctypes.CDLL(str(self.path))  # ctypes releases the GIL during calls, as _C does
        err = [ctypes.c_char_p, ctypes.c_int]
        lib.cuda_shim_norm_units.argtypes = [_I64, _I64, _I64, ctypes.POINTER(_I64), *err]
        lib.cuda_shim_norm.argtypes = [_I64] * 7 + [_F64, _I64, _I64, _I64, _I64, _F64] + [_I64] * 8 + err
        lib.cuda_shim_scale.argtypes = [_I64] * 8 + err
        lib.cuda_shim_clamp.argtypes = [_I64] * 6 + [_F64, *err]
        lib.cuda_shim_device_count.argtypes = [ctypes.POINTER(ctypes.c_int), *err]
        lib.cuda_shim_configure_device.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.cuda_shim_set_workers.argtypes = [ctypes.c_int]
        lib.cuda_shim_set_seed.argtypes = [ctypes.c_uint64]
        lib.cuda_shim_set_yield_percent.argtypes = [ctypes.c_int]
        lib.cuda_shim_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
        lib.cuda_shim_convert.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, _I64]
        for name in ("norm_units", "norm", "scale", "clamp", "device_count", "configure_device", "stats"):
            getattr(lib, f"cuda_shim_{name}").restype = ctypes.c_int
        for name in ("set_workers", "set_seed", "set_yield_percent", "install_fault_reporter", "convert"):
            getattr(lib, f"cuda_shim_{name}").restype = None
        self.lib = lib
        self._lock = threading.Lock()
        self._devices: dict[tuple[int, int], int] = {}
        self.default_device = self.device_for(DEFAULT_SMS, DEFAULT_BLOCKS_PER_SM)

    # -- emulated devices and scheduling ---------------------------------------------------------
    def device_for(self, sms: int, blocks_per_sm: int = DEFAULT_BLOCKS_PER_SM) -> int:
        """The device index of an emulated GPU with ``sms`` SMs holding ``blocks_per_sm`` blocks each."""
        with self._lock:
            key = (int(sms), int(blocks_per_sm))
            if key not in self._devices:
                index = len(self._devices)
                if self.lib.cuda_shim_configure_device(index, *key) != 0:
                    raise ValueError(f"cannot configure emulated device {index} with {key} (at most 64 devices)")
                self._devices[key] = index
            return self._devices[key]

    def set_workers(self, workers: int) -> None:
        """OS threads each launch runs its blocks on."""
        self.lib.cuda_shim_set_workers(workers)

    def set_seed(self, seed: int) -> None:
        self.lib.cuda_shim_set_seed(seed)

    def set_yield_percent(self, percent: int) -> None:
        self.lib.cuda_shim_set_yield_percent(percent)

    def stats(self) -> dict[str, int]:
        """Counters since the library was loaded: launches, blocks run, fiber switches, ..."""
        out = (ctypes.c_uint64 * 16)()
        count = self.lib.cuda_shim_stats(out, 16)
        return dict(zip(STAT_NAMES, (int(v) for v in out[:count])))

    def install_fault_reporter(self) -> None:
        self.lib.cuda_shim_install_fault_reporter()

    def convert(self, kind: int, values: torch.Tensor) -> torch.Tensor:
        """The shim's 16-bit conversions (see entry.cpp) over a contiguous CPU tensor."""
        out_dtype = torch.float32 if kind in (0, 1) else torch.int16
        values = values.contiguous()
        out = torch.empty(values.shape, dtype=out_dtype)
        self.lib.cuda_shim_convert(kind, values.data_ptr(), out.data_ptr(), values.numel())
        return out

    # -- fusedclip._C's cuda_* functions ---------------------------------------------------------
    @staticmethod
    def _check(code: int, error: ctypes.Array) -> None:
        if code != 0:
            raise RuntimeError("fusedclip CUDA kernel: " + error.value.decode(errors="replace"))

    @staticmethod
    def _plan(tables: ShimTables) -> tuple[int, int, int, int]:
        """The table arguments of the shim's entry points, after fusedclip._C's checks."""
        if tables.packed == 0:
            raise ValueError("fusedclip._C: null table address")
        if tables.num_tensors < 0 or tables.num_chunks < 0 or tables.chunk_elements <= 0:
            raise ValueError("fusedclip._C: negative table sizes or non-positive chunk size")
        return tables.packed, tables.num_tensors, tables.num_chunks, tables.chunk_elements

    def cuda_device_count(self) -> tuple[int, str | None]:
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        count = ctypes.c_int(0)
        code = self.lib.cuda_shim_device_count(ctypes.byref(count), error, _ERROR_SIZE)
        return count.value, (error.value.decode() if code else None)

    def cuda_norm_units(self, device: int, num_chunks: int, chunk_elements: int) -> int:
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        units = _I64(0)
        code = self.lib.cuda_shim_norm_units(device, num_chunks, chunk_elements, ctypes.byref(units), error, len(error))
        self._check(code, error)
        return units.value

    def cuda_norm(self, tables: ShimTables, device: int, stream: int, a: ShimNormArgs, partials: int,
                  counters: int) -> None:  # fmt: skip
        plan = self._plan(tables)
        if not 0 <= a.kind <= 3:
            raise ValueError("fusedclip._C: unknown norm kind")
        for code, what, used in ((a.total_dtype, "total_dtype", True), (a.max_norm_dtype, "max_norm_dtype", a.max_norm_ptr),
                                 (a.scale_dtype, "scale_dtype", a.scale_ptr)):  # fmt: skip
            if used and not 0 <= code <= 3:
                raise ValueError(f"fusedclip._C: {what} must be a dtype code 0-3")
        if 0 in (a.total_out, a.acc_out):
            raise ValueError("fusedclip._C: null output address")
        if 0 in (partials, counters):
            raise ValueError("fusedclip._C: null workspace address")
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        code = self.lib.cuda_shim_norm(
            *plan, device, stream, a.kind, a.p, a.total_out, a.total_dtype, a.acc_out, a.coef_out, a.max_norm,
            a.max_norm_ptr, a.max_norm_dtype, a.scale_ptr, a.scale_dtype, a.per_tensor_out, partials, counters,
            a.norm_scale_ptr, error, _ERROR_SIZE,
        )  # fmt: skip
        self._check(code, error)

    def cuda_scale(self, tables: ShimTables, device: int, stream: int, coef_ptr: int, coef_dtype: int) -> None:
        plan = self._plan(tables)
        if not 0 <= coef_dtype <= 3:
            raise ValueError("fusedclip._C: coef_dtype must be a dtype code 0-3")
        if coef_ptr == 0:
            raise ValueError("fusedclip._C: null coefficient address")
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        code = self.lib.cuda_shim_scale(*plan, device, stream, coef_ptr, coef_dtype, error, _ERROR_SIZE)
        self._check(code, error)

    def cuda_clamp(self, tables: ShimTables, device: int, stream: int, clip_value: float) -> None:
        plan = self._plan(tables)
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        code = self.lib.cuda_shim_clamp(*plan, device, stream, clip_value, error, _ERROR_SIZE)
        self._check(code, error)


# ---- the backend and what it is given instead of torch.cuda ------------------------------------------


class _Stream:
    __slots__ = ("cuda_stream",)

    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle


class _CudaFacade:
    """What cuda_backend asks torch.cuda, answered for the emulated device in use."""

    def __init__(self, emulation: Emulation) -> None:
        self._emulation = emulation

    def current_device(self) -> int:
        return self._emulation.device

    def current_stream(self, device: int | None = None) -> _Stream:
        return _Stream(STREAM_BASE + (self._emulation.device if device is None else int(device)))

    def device(self, index: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def is_available(self) -> bool:
        return True

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return (9, 0)

    def __getattr__(self, name: str):  # anything else: torch.cuda's own
        return getattr(torch.cuda, name)


class _TorchFacade:
    """torch, with ``cuda`` answered by a _CudaFacade (only inside cuda_backend)."""

    def __init__(self, cuda: _CudaFacade) -> None:
        self.cuda = cuda

    def __getattr__(self, name: str):
        return getattr(torch, name)


class EmulatedCudaBackend(CudaBackend):
    """The real ``cuda`` backend, accepting CPU tensors: its launches run kernels.cu in the shim."""

    def unavailable_reason(self) -> str | None:
        return None

    def device_reason(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"the emulated cuda backend runs on CPU tensors, not {device.type} tensors"
        return None


class Emulation:
    """A loaded shim library and the emulated device that launches use now."""

    def __init__(self, library: ShimLibrary) -> None:
        self.library = library
        self.device = library.default_device

    @contextlib.contextmanager
    def sms(self, sms: int, blocks_per_sm: int = DEFAULT_BLOCKS_PER_SM) -> Iterator[int]:
        """Launch on an emulated GPU with ``sms`` SMs (and ``blocks_per_sm``) inside the block."""
        previous = self.device
        self.device = self.library.device_for(sms, blocks_per_sm)
        try:
            yield self.device
        finally:
            self.device = previous

    def install(self) -> Callable[[], None]:
        """Route the ``cuda`` backend to the shim for CPU tensors; returns the undo function."""
        ext = SimpleNamespace(C=self.library, cuda_build_reason=lambda: None, runs_on_capability=lambda *_: True)
        saved = (cuda_backend._ext, cuda_backend.torch, backends._instances.get("cuda"))
        cuda_backend._ext = ext
        cuda_backend.torch = _TorchFacade(_CudaFacade(self))
        backends._instances["cuda"] = EmulatedCudaBackend()
        plan.PLANS.clear()  # no workspace of an earlier emulation or build survives in a cached plan

        def undo() -> None:
            cuda_backend._ext, cuda_backend.torch, instance = saved
            if instance is None:
                backends._instances.pop("cuda", None)
            else:
                backends._instances["cuda"] = instance
            plan.PLANS.clear()

        return undo

    @contextlib.contextmanager
    def installed(self) -> Iterator[Emulation]:
        undo = self.install()
        try:
            yield self
        finally:
            undo()
