"""Shared test setup: Triton's interpreter on machines without a GPU, markers, backend cases, seeds.

Every parity test runs once per (device, backend) pair. CPU cases run everywhere (the ``triton``
backend through ``TRITON_INTERPRET=1``, the ``cuda`` backend's kernels.cu through the CUDA-on-CPU
shim of tests/cuda_shim, which needs g++); CUDA cases carry the ``gpu`` marker and are skipped, and
reported as skipped, where no CUDA device exists. A backend that cannot run here is skipped with
the reason ``available_backends()`` gives.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Must happen before anything imports triton: the interpreter is chosen when kernels are defined.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip import backends, plan  # noqa: E402

HAS_CUDA = _HAS_CUDA
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels through TRITON_INTERPRET=1 on the CPU")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line(
        "markers", "emulated: runs csrc/cuda/kernels.cu on the CPU through the CUDA-on-CPU shim (tests/cuda_shim)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def _case(device: str, backend: str) -> object:
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    elif backend == "triton":
        marks.append(pytest.mark.interpreter)
    elif backend == "cuda":
        marks.append(pytest.mark.emulated)
    return pytest.param((device, backend), id=f"{device}-{backend}", marks=marks)


#: every (device, backend) pair the parity suite covers
BACKEND_CASES = [
    _case("cpu", "torch"),
    _case("cpu", "cpu"),
    _case("cpu", "triton"),
    _case("cpu", "cuda"),  # kernels.cu through the CUDA-on-CPU shim (the emulated_cuda fixture)
    _case("cuda", "torch"),
    _case("cuda", "cuda"),
    _case("cuda", "triton"),
]


def require_backend(device: str, name: str) -> None:
    """Skip (with the reason) when ``name`` cannot run on ``device`` tensors here."""
    reason = backends._reason(name, torch.device(device), None)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable on {device}: {reason}")


@pytest.fixture(params=BACKEND_CASES)
def device_backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    device, name = request.param
    if (device, name) == ("cpu", "cuda"):
        request.getfixturevalue("emulated_cuda")
    require_backend(device, name)
    return device, name


@pytest.fixture(scope="session")
def cuda_shim_library():
    """kernels.cu built against the CUDA-on-CPU shim (cached in tests/.cuda_shim_build), loaded once."""
    import cuda_shim

    if cuda_shim.compiler() is None:
        pytest.skip("the CUDA-on-CPU shim needs a C++ compiler (g++, or CXX)")
    return cuda_shim.load()


@pytest.fixture
def emulated_cuda(cuda_shim_library):
    """The ``cuda`` backend runs kernels.cu on CPU tensors through the shim for this test."""
    from cuda_shim.emulation import Emulation

    emulation = Emulation(cuda_shim_library)
    with emulation.installed():
        yield emulation


@pytest.fixture(params=[plan.CHUNK_ELEMENTS, 64], ids=["chunk-default", "chunk-64"])
def chunk_elements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Run with the default chunk size and with a tiny one, so small tensors span many chunks."""
    monkeypatch.setattr(plan.PLANS, "chunk_elements", request.param)
    plan.PLANS.clear()
    yield request.param
    plan.PLANS.clear()


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


#: the Tensor methods that read a value on the host (on a GPU each would wait for the device)
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__array__")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Counts every read of a tensor's value on the host (on the CPU these are where a GPU would sync).
    CPU tensors then stand in for a device: the paths that read CPU values only because that is free
    there (``base.host_reads_are_free``) take their device path."""
    from fusedclip.backends import base

    monkeypatch.setattr(base, "CPU_READS_ARE_FREE", False)
    count: dict = {"n": 0, "names": []}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, __original=original, __name=name, **kwargs):
            count["n"] += 1
            count["names"].append(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return count


@contextlib.contextmanager
def syncs_raise(active: bool = True) -> Iterator[None]:
    """Inside the block every host synchronisation with the GPU raises (``torch.cuda``'s sync debug
    mode "error"); the previous mode is restored after it. ``active=False``: an ordinary block (for
    warm-up steps that may upload plan tables)."""
    if not active:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


__all__ = ["BACKEND_CASES", "HAS_CUDA", "INTERPRETER", "fusedclip", "require_backend", "syncs_raise"]
