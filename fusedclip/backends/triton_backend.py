"""The ``triton`` backend: launchers for the kernels of :mod:`fusedclip.backends.triton_kernels`.

It runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1``
set before triton is imported; that is how CI tests these kernels without a GPU).

Per call it allocates only the outputs; the tables come from the shared plan, and the norm kernel's
workspace (program partials, per-chunk and per-tensor slots and the tickets that pick the last
program) is cached per plan and per stream in ``DevicePlan.scratch``. The kernels reset their
tickets themselves, so a cached workspace is reused without a memset launch, and two streams never
share one; a launch captured in a CUDA graph gets a workspace of its own, owned by the graph
(``DevicePlan.workspace``). The tables come ordered after their upload on the current stream
(``DevicePlan.kernel_tables``). Scalars (``max_norm``, ``p``) travel as float64 bit patterns: a
Python float argument would reach a Triton kernel as float32.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..norm_type import NormKind, NormSpec
from ..plan import DevicePlan, KernelTables
from .base import ACC_DTYPE, DeviceWork
from .kernel_base import KernelBackend, NormLaunch, device_scalar

try:
    from . import triton_kernels as _kernels

    _IMPORT_ERROR: str | None = None
except Exception as error:  # triton missing or broken: the backend reports why
    _kernels = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"triton cannot be imported ({type(error).__name__}: {error})"


if _kernels is not None and _kernels.interpreted():
    from .triton_interpreter import adapt_interpreter

    adapt_interpreter(_kernels)


# --------------------------------------------------------------------------------------------
# launch configuration: the one place with block sizes and grid shapes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes, warps, pipelining and grid shape of the kernels on one kind of device."""

    norm_block: int  # elements per loop step of the norm kernel
    norm_warps: int
    scale_block: int  # elements per loop step of the scale and clamp kernels
    scale_warps: int
    finish_block: int  # slots per step when reducing partials and per-tensor values
    programs_per_sm: int  # persistent grid: this many programs per streaming multiprocessor
    stages: int = 1  # software pipelining of the full-block loops (tl.range num_stages; 1 = none)
    max_programs: int | None = None  # a cap on the grid (the interpreter runs programs one by one)


#: CUDA defaults (a later issue tunes them per GPU; benchmarks/triton_gpu_bench.py --sweep compares
#: variants): 16 elements per thread and step. The sm_90 builds use about 110-115 registers per
#: thread (norm p=2, scale), so two 8-warp programs fit on an SM: the persistent grid has two per SM.
CUDA_CONFIG = LaunchConfig(
    norm_block=4096, norm_warps=8, scale_block=4096, scale_warps=8, finish_block=1024, programs_per_sm=2
)
#: Interpreter: small blocks and grids keep the CPU test suite fast; the logic is the same.
INTERPRETER_CONFIG = LaunchConfig(
    norm_block=128, norm_warps=1, scale_block=128, scale_warps=1, finish_block=64, programs_per_sm=1, max_programs=3
)
#: the configuration in use on CUDA devices (replaceable, e.g. by a tuning sweep)
cuda_config = CUDA_CONFIG


def launch_config(device: torch.device) -> LaunchConfig:
    return INTERPRETER_CONFIG if device.type == "cpu" else cuda_config


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grid_size(device: torch.device, num_chunks: int, config: LaunchConfig | None = None) -> int:
    """Programs in the persistent grid: a few per SM, never more than there are chunks, at least one."""
    config = config or launch_config(device)
    if device.type == "cuda":
        cap = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        cap *= config.programs_per_sm
    else:
        cap = config.programs_per_sm
    if config.max_programs is not None:
        cap = min(cap, config.max_programs)
    return max(1, min(num_chunks, cap))


# --------------------------------------------------------------------------------------------
# scalars as float64 bit patterns
# --------------------------------------------------------------------------------------------
def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _split(value: float) -> tuple[int, int]:
    """``value = hi + lo`` with at most 41 significant bits in ``hi`` (see ``_pow`` in the kernels)."""
    hi = _from_bits(_bits(value) & ~0xFFF)
    return _bits(hi), _bits(value - hi)


_P_MODES = {2.0: 2, 1.0: 1}


def _exponents(norm: NormSpec) -> tuple[int, int, int, int, int]:
    """P_MODE and the split bit patterns of ``p`` and ``1/p`` (zeros where unused)."""
    if norm.kind is not NormKind.SUM_POW:
        return 0, 0, 0, 0, 0
    mode = _P_MODES.get(norm.p, 0)
    if mode:
        return mode, 0, 0, 0, 0
    return (0, *_split(norm.p), *_split(1.0 / norm.p))


@functools.lru_cache(maxsize=64)
def _clip_limits(clip_value: float) -> tuple[int, int, int, int]:
    """``clip_value`` rounded to float32, float16, bfloat16 and float64 as torch rounds a scalar bound."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    return tuple(_bits(float(torch.scalar_tensor(clip_value, dtype=dtype, device="cpu"))) for dtype in dtypes)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# workspaces
# --------------------------------------------------------------------------------------------
@dataclass
class Workspace:
    """The norm kernel's scratch memory for one plan on one stream."""

    tickets: Tensor  # int32 [1 + T], zero between launches: [0] the grid's, [1:] one per tensor
    values: Tensor  # float64 [G + C + T]: program partials, chunk values, per-tensor values
    programs: int
    num_chunks: int

    @property
    def grid_ticket(self) -> Tensor:
        return self.tickets[:1]

    @property
    def tensor_tickets(self) -> Tensor:
        return self.tickets[1:]

    @property
    def partials(self) -> Tensor:
        return self.values[: self.programs]

    @property
    def chunk_values(self) -> Tensor:
        return self.values[self.programs : self.programs + self.num_chunks]

    @property
    def tensor_values(self) -> Tensor:
        return self.values[self.programs + self.num_chunks :]


def _stream_key(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def workspace(plan: DevicePlan, tables: KernelTables, programs: int) -> Workspace:
    """The workspace of ``plan`` for a launch on the current stream (created zeroed): cached per
    stream for eager launches, fresh and owned by the graph for a launch being captured
    (``DevicePlan.workspace`` states the rule)."""
    device = plan.device

    def make() -> Workspace:
        t, c = tables.num_tensors, tables.num_chunks
        return Workspace(
            tickets=torch.zeros(1 + t, dtype=torch.int32, device=device),
            values=torch.empty(programs + c + t, dtype=ACC_DTYPE, device=device),
            programs=programs,
            num_chunks=c,
        )

    return plan.workspace("triton-workspace", (_stream_key(device), programs), make, capturing=_capturing(device))


#: Triton's interpreter patches ``triton.language`` process-wide for the length of a launch (and
#: restores it after), so two threads interpreting kernels at once break each other: one at a time.
_INTERPRETER_LOCK = threading.Lock()


@contextlib.contextmanager
def _launch_context(device: torch.device) -> Iterator[None]:
    """Triton launches on the current CUDA device. Interpreted launches run one at a time, and
    NumPy must not warn about the infinities and NaNs the kernels handle on purpose."""
    if device.type == "cuda":
        if device.index is None or device.index == torch.cuda.current_device():
            yield
        else:
            with torch.cuda.device(device):
                yield
    else:
        import numpy

        with _INTERPRETER_LOCK, numpy.errstate(all="ignore"):
            yield


# --------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------
class TritonBackend(KernelBackend):
    """Fused Triton kernels: one launch for the norm (and coefficient), one for the scaling."""

    name = "triton"

    def unavailable_reason(self) -> str | None:
        return _IMPORT_ERROR

    def device_reason(self, device: torch.device) -> str | None:
        if _kernels is None:
            return _IMPORT_ERROR
        interpreted = _kernels.interpreted()
        if device.type == "cuda":
            if interpreted:
                return (
                    "triton was imported with TRITON_INTERPRET=1, whose kernels run on CPU tensors only;"
                    " unset it to run on CUDA"
                )
            if not torch.cuda.is_available():
                return "CUDA is not available"
            return None
        if device.type == "cpu":
            if interpreted:
                return None
            return (
                "Triton kernels run on CUDA tensors; CPU tensors only through Triton's interpreter"
                " (set TRITON_INTERPRET=1 before importing triton)"
            )
        return f"Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not on {device.type}"

    # -- launches -----------------------------------------------------------------------------
    def launch_norm(self, work: DeviceWork, tables: KernelTables, launch: NormLaunch) -> None:
        device = work.device
        config = launch_config(device)
        programs = grid_size(device, tables.num_chunks, config)
        space = workspace(work.plan, tables, programs)
        norm, acc = launch.norm, launch.acc
        has_coef = launch.coef is not None
        # acc stands in for the pointers a launch does not use (the kernel reads none of them)
        coef = launch.coef if has_coef else acc
        from_ptr = launch.max_norm is not None
        max_norm_ptr = launch.max_norm if from_ptr else acc
        max_norm_bits = 0 if from_ptr else _bits(launch.max_norm_value)
        segmented = launch.per_tensor is not None or norm.kind is NormKind.COUNT
        tensor_values = launch.per_tensor if launch.per_tensor is not None else space.tensor_values
        scale_ptr = acc if launch.grad_scale is None else launch.grad_scale
        norm_scale_ptr = acc if launch.norm_scale is None else launch.norm_scale
        p_mode, p_hi, p_lo, inv_hi, inv_lo = _exponents(norm)

        with _launch_context(device):
            _kernels.norm_kernel[(programs,)](
                tables.addresses, tables.numels, tables.dtype_codes, tables.first_chunk,
                tables.chunk_tensor, tables.chunk_start,
                tables.num_chunks, tables.num_tensors, tables.chunk_elements,
                space.partials, space.chunk_values, tensor_values, space.tensor_tickets, space.grid_ticket,
                launch.total, coef, acc,
                max_norm_ptr, max_norm_bits, scale_ptr, norm_scale_ptr,
                p_hi, p_lo, inv_hi, inv_lo,
                KIND=int(norm.kind), P_MODE=p_mode,
                HAS_COEF=has_coef, MAX_NORM_FROM_PTR=from_ptr, HAS_GRAD_SCALE=launch.grad_scale is not None,
                HAS_NORM_SCALE=launch.norm_scale is not None,
                SEGMENTED=segmented, ZERO_EMPTY_TENSORS=launch.per_tensor is not None,
                BLOCK=config.norm_block, FINISH_BLOCK=config.finish_block, STAGES=config.stages,
                num_warps=config.norm_warps,
            )  # fmt: skip

    def launch_scale(self, work: DeviceWork, tables: KernelTables, coef: Tensor) -> None:
        device = work.device
        config = launch_config(device)
        coef = device_scalar(coef, device)
        with _launch_context(device):
            _kernels.scale_kernel[(grid_size(device, tables.num_chunks, config),)](
                tables.addresses, tables.numels, tables.dtype_codes, tables.chunk_tensor, tables.chunk_start,
                tables.num_chunks, tables.chunk_elements, coef,
                BLOCK=config.scale_block, STAGES=config.stages, num_warps=config.scale_warps,
            )  # fmt: skip

    def launch_clamp(self, work: DeviceWork, tables: KernelTables, clip_value: float) -> None:
        device = work.device
        config = launch_config(device)
        with _launch_context(device):
            _kernels.clamp_kernel[(grid_size(device, tables.num_chunks, config),)](
                tables.addresses, tables.numels, tables.dtype_codes, tables.chunk_tensor, tables.chunk_start,
                tables.num_chunks, tables.chunk_elements, *_clip_limits(clip_value),
                BLOCK=config.scale_block, STAGES=config.stages, num_warps=config.scale_warps,
            )  # fmt: skip
