"""What the benchmark runs on: the device, its name, its last-level cache and its free memory."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass

import torch

from .errors import BenchError

#: last-level cache assumed when the system does not say (bytes)
_DEFAULT_CACHE = 32 << 20


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    name: str  # e.g. "AMD EPYC (2 threads)" or "NVIDIA H200"
    slug: str  # file name stem of committed results: "cpu", "nvidia-h200"
    cache_bytes: int  # last-level cache (L3 on CPUs, L2 on GPUs)
    memory_bytes: int  # memory free for the benchmark's tensors now
    threads: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def pick_device(requested: str | None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1"), else CUDA when present, else the CPU."""
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise BenchError(f"unknown device {requested!r}: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--device cuda was asked for, but torch sees no CUDA device here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise BenchError(f"the benchmark runs on cpu or cuda devices, not {device.type!r}")
    return device


def describe(device: torch.device) -> DeviceInfo:
    threads = torch.get_num_threads()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, _ = torch.cuda.mem_get_info(device)
        cache = int(getattr(props, "L2_cache_size", 0)) or _DEFAULT_CACHE
        return DeviceInfo(device, props.name, _slug(props.name), cache, int(free), threads)
    name = f"{_cpu_model()} ({threads} thread{'' if threads == 1 else 's'})"
    return DeviceInfo(device, name, "cpu", _cpu_cache_bytes(), _available_ram(), threads)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _cpu_cache_bytes() -> int:
    """The largest cache the system reports (the L3 on most machines)."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if size and size > 0:
            return int(size)
    return _DEFAULT_CACHE


def _available_ram() -> int:
    try:  # MemAvailable counts reclaimable page cache too, unlike the free-pages count below
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
