"""Which CUDA toolkit the build picks, and the reasons the `cuda` backend gives when it cannot run.

The extension links the CUDA runtime of the toolkit it was built with, statically; that runtime
needs a driver of its major version's series (CUDA 13: 580 or newer). setup.py therefore picks a
toolkit of torch's CUDA major version when one is installed (a pure function, tested here), and
fusedclip._ext says exactly what is wrong when the cuda backend cannot run: no extension, built
without CUDA (and why), torch without CUDA, no device, a driver too old for the linked runtime, or
an architecture the build does not cover.
"""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest

from fusedclip import _ext

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_py() -> dict:
    return runpy.run_path(str(ROOT / "setup.py"), run_name="fusedclip_setup")  # helpers only, setup() not run


def test_importing_setup_py_does_not_build(setup_py):
    assert callable(setup_py["choose_cuda_toolkit"]) and callable(setup_py["get_extensions"])


def test_toolkit_of_torchs_major_version_is_preferred(setup_py):
    choose = setup_py["choose_cuda_toolkit"]
    found = ("/usr/local/cuda/bin/nvcc", "13.0")
    others = [("/usr/local/cuda-12.1/bin/nvcc", "12.1"), ("/usr/local/cuda-12.8/bin/nvcc", "12.8")]
    assert choose(found, others, "12.4", False) == (("/usr/local/cuda-12.8/bin/nvcc", "12.8"), None)
    assert choose(found, others, "13.0", False) == (found, None)
    assert choose(found, [], None, False) == (found, None), "torch unknown (build isolation): use what was found"
    assert choose(None, others, "12.1", False) == (("/usr/local/cuda-12.8/bin/nvcc", "12.8"), None)
    assert choose(None, [], "12.4", False) == (None, None)


def test_mismatched_toolkit_is_used_with_a_warning_naming_the_driver(setup_py):
    chosen, warning = setup_py["choose_cuda_toolkit"](("/usr/local/cuda/bin/nvcc", "13.0"), [], "12.4", False)
    assert chosen == ("/usr/local/cuda/bin/nvcc", "13.0")
    assert "580 series" in warning and "CUDA 12.4" in warning and "CUDA_HOME" in warning


def test_cuda_home_is_obeyed_even_when_it_does_not_match(setup_py):
    explicit = ("/opt/cuda-13/bin/nvcc", "13.0")
    chosen, warning = setup_py["choose_cuda_toolkit"](explicit, [("/usr/local/cuda-12.4/bin/nvcc", "12.4")], "12.4", True)
    assert chosen == explicit and warning is not None


def test_torch_cuda_version_is_read_from_version_py(setup_py):
    parse = setup_py["_cuda_in_torch_version_py"]
    assert parse("__version__ = '2.6.0+cu124'\ncuda: Optional[str] = '12.4'\nhip = None\n") == "12.4"
    assert parse("cuda = '13.0.1'\n") == "13.0"
    assert parse("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n") is None
    import torch

    assert setup_py["_torch_cuda_version"]() == (".".join(torch.version.cuda.split(".")[:2]) if torch.version.cuda else None)


def test_nvcc_version_is_parsed(setup_py, tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    fake.chmod(0o755)
    assert setup_py["_nvcc_version"](fake) == "12.8"
    assert setup_py["_nvcc_version"](tmp_path / "missing") is None


def test_driver_too_old_is_named_with_both_versions_and_the_fix():
    reason = _ext.explain_cuda_runtime_failure(
        "CUDA driver version is insufficient for CUDA runtime version", "13.0", "12.4", "12.4", "2.6.0+cu124"
    )
    assert reason.startswith("the driver is too old for fusedclip._C")
    for part in ("CUDA 13.0 runtime", "580 series", "supports CUDA 12.4", "CUDA 12.x toolkit", "triton and torch"):
        assert part in reason, (part, reason)


def test_driver_too_old_is_recognised_from_the_versions_alone():
    reason = _ext.explain_cuda_runtime_failure("unknown error", "13.0", "12.2", "12.1", "2.5.0+cu121")
    assert reason.startswith("the driver is too old")


def test_other_runtime_failures_are_reported_as_they_are():
    reason = _ext.explain_cuda_runtime_failure("no CUDA-capable device is detected", "13.0", "13.0", "13.0", "2.11")
    assert "sees no device although torch does" in reason and "no CUDA-capable device is detected" in reason


def test_arch_reason_names_the_capability_and_the_fix(monkeypatch):
    monkeypatch.setattr(_ext, "BUILD_INFO", {"cuda_archs": "80"})
    assert _ext.arch_reason(8, 6) is None
    reason = _ext.arch_reason(9, 0)
    assert "compute capability 9.0" in reason and "FUSEDCLIP_CUDA_ARCHS including 90" in reason


def test_build_without_cuda_says_why(monkeypatch):
    monkeypatch.setattr(_ext, "BUILD_INFO", {"has_cuda": False})
    monkeypatch.setattr(_ext, "BUILD_RECORD", {"cuda_skipped": "nvcc 13.0 failed at build time: exit 1"})
    if _ext.C is None:
        pytest.skip(f"fusedclip._C is not built: {_ext.MISSING_REASON}")
    reason = _ext.cuda_build_reason()
    assert "built without CUDA kernels (nvcc 13.0 failed at build time: exit 1)" in reason
    assert "FUSEDCLIP_CUDA=1" in reason


def test_cpu_only_torch_is_named():
    import torch

    if torch.version.cuda is not None or _ext.cuda_build_reason() is not None:
        pytest.skip("this check is for a CUDA build of the extension under a CPU-only torch")
    assert "CPU-only build" in _ext.cuda_unavailable_reason()


def test_build_record_must_belong_to_the_loaded_extension(tmp_path, monkeypatch):
    so = tmp_path / "_C.fake.so"
    so.write_bytes(b"x" * 10)
    stat = os.stat(so)

    class Fake:
        __file__ = str(so)

    monkeypatch.setattr(_ext, "C", Fake)
    record = {"cuda": True, "cuda_toolkit": "13.0", "extension_size": 10, "extension_mtime": stat.st_mtime}
    (tmp_path / "_C_build.json").write_text(json.dumps(record))
    assert _ext._read_build_record()["cuda_toolkit"] == "13.0"
    record["extension_size"] = 11  # another build's record
    (tmp_path / "_C_build.json").write_text(json.dumps(record))
    assert _ext._read_build_record() == {}
