"""Sanitizer builds catch what they are there to catch; the sanitizer workload checks what it runs.

The detection tests run only where the loaded extension was built with FUSEDCLIP_SANITIZE (see
benchmarks/sanitize_cpu.sh, which also sets FUSEDCLIP_SANITIZE_TEST=1 so that they cannot be
skipped there). In a normal run they are skipped: provoking an out-of-bounds access in an
uninstrumented build would be undefined behaviour, not a test.

Each detection case hands the compiled kernels a plan table (the packed int64 buffer of
fusedclip/plan.py) in a child process: a valid one, which must succeed, and a corrupt one, which
must kill the child with the sanitizer's report pointing into the extension. A corrupt table
stands for a bug in the plan or in a kernel's indexing, the errors these sanitizers exist to find.

The workload tests always run: benchmarks/sanitize_driver.py (what compute-sanitizer runs on a GPU)
must pass on the cpu backend and must fail when a kernel scales wrongly.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusedclip import _ext

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("FUSEDCLIP_SANITIZE_TEST") == "1"
_SPEC = os.environ.get("FUSEDCLIP_SANITIZE", "1")
#: the sanitizers sanitize_cpu.sh built with (empty outside it)
WANTED = set() if not REQUIRED else {"address", "undefined"} if _SPEC == "1" else set(re.split(r"[,\s]+", _SPEC))


def _instrumented_with(marker: bytes) -> bool:
    """True when the loaded extension's code calls into a sanitizer runtime (its symbol names)."""
    return _ext.C is not None and marker in Path(_ext.C.__file__).read_bytes()


HAS_ASAN = _instrumented_with(b"__asan_report_")
HAS_UBSAN = _instrumented_with(b"__ubsan_handle_")

needs_asan = pytest.mark.skipif(
    not HAS_ASAN and "address" not in WANTED, reason="fusedclip._C is not built with AddressSanitizer (sanitize_cpu.sh)"
)
needs_ubsan = pytest.mark.skipif(
    not HAS_UBSAN and "undefined" not in WANTED,
    reason="fusedclip._C is not built with UndefinedBehaviorSanitizer (sanitize_cpu.sh)",
)


@pytest.mark.skipif(not REQUIRED, reason="only under benchmarks/sanitize_cpu.sh (FUSEDCLIP_SANITIZE_TEST=1)")
def test_the_sanitized_extension_is_the_one_loaded():
    assert _ext.C is not None, _ext.MISSING_REASON
    if "address" in WANTED:
        assert HAS_ASAN, f"{_ext.C.__file__} has no AddressSanitizer instrumentation"
    if "undefined" in WANTED:
        assert HAS_UBSAN, f"{_ext.C.__file__} has no UndefinedBehaviorSanitizer instrumentation"


# The child: one float32 tensor of 1000 elements, described by a hand-made plan table; argv picks
# the kernel and how the table lies about the tensor.
CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from fusedclip import _ext

    kernel, lie = sys.argv[1], sys.argv[2]
    grad = torch.randn(1000)                 # its own heap allocation (4000 bytes)
    numel, start = 1000, 0
    if lie == "one_past_the_end":
        numel = 1001                         # one element beyond the allocation
    elif lie == "offset_overflows":
        numel, start = 2**62 + 5, 2**62      # start * 4 bytes overflows int64
    # addresses[1], numels[1], dtype_codes[1] (float32), first_chunk[2], chunk_tensor[1], chunk_start[1]
    packed = torch.tensor([grad.data_ptr(), numel, 0, 0, 1, 0, start], dtype=torch.int64)
    chunk_elements = 4096
    tables = _ext.C.Tables(packed=packed.data_ptr(), num_tensors=1, num_chunks=1, chunk_elements=chunk_elements,
                           total_elements=numel)
    if kernel == "norm":
        total = torch.empty((), dtype=torch.float64)
        acc = torch.empty((), dtype=torch.float64)
        _ext.C.cpu_norm(tables, _ext.C.NormArgs(kind=0, p=2.0, total_out=total.data_ptr(), total_dtype=3,
                                                acc_out=acc.data_ptr()), 1)
        assert torch.allclose(total, torch.linalg.vector_norm(grad.double())), (float(total), lie)
    else:
        coef = torch.tensor(0.5, dtype=torch.float64)
        expected = grad * 0.5
        _ext.C.cpu_scale(tables, 1, coef.data_ptr(), 3)
        assert torch.equal(grad, expected)
    print("survived")
    """
)


def _run_child(kernel: str, lie: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", CHILD, kernel, lie],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def _assert_killed_by_report(result: subprocess.CompletedProcess, report: str) -> None:
    assert result.returncode != 0 and "survived" not in result.stdout, (
        f"the corrupt table was not caught (exit {result.returncode}):\n{result.stdout}\n{result.stderr[-3000:]}"
    )
    assert report in result.stderr, f"expected {report!r} in the child's stderr:\n{result.stderr[-3000:]}"
    # symbolized frames name the sources (csrc/...), unsymbolized ones the module file
    points_into_extension = "csrc/" in result.stderr or Path(_ext.C.__file__).name in result.stderr
    assert points_into_extension, f"the report does not point into fusedclip._C:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("kernel", ["norm", "scale"])
@needs_asan
def test_a_valid_table_runs_clean(kernel):
    result = _run_child(kernel, "valid")
    assert result.returncode == 0 and "survived" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("kernel", ["norm", "scale"])
@needs_asan
def test_address_sanitizer_reports_an_access_past_a_grad(kernel):
    result = _run_child(kernel, "one_past_the_end")
    _assert_killed_by_report(result, "AddressSanitizer: heap-buffer-overflow")
    # the element just past the 4000-byte allocation (the scale kernel reads it before writing)
    just_past = re.search(r"located 0 bytes (to the right of|after) 4000-byte region", result.stderr)
    assert "READ of size" in result.stderr and just_past, result.stderr[-3000:]


@needs_ubsan
def test_undefined_behaviour_sanitizer_reports_an_overflowing_offset():
    result = _run_child("norm", "offset_overflows")
    _assert_killed_by_report(result, "runtime error:")
    assert "overflow" in result.stderr, result.stderr[-3000:]


# ---- the sanitizer workload (benchmarks/sanitize_driver.py) -------------------------------------------
# On a GPU it runs under compute-sanitizer; here its checks run on the cpu backend, so that a driver
# that cannot pass (or cannot fail) is found without a GPU.


def _load_driver():
    spec = importlib.util.spec_from_file_location("sanitize_driver", ROOT / "benchmarks" / "sanitize_driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_ext = pytest.mark.skipif(_ext.C is None, reason=f"fusedclip._C is not built: {_ext.MISSING_REASON}")


@needs_ext
def test_the_sanitizer_workload_passes_on_the_cpu_backend(capsys):
    assert _load_driver().main(["--device", "cpu", "--backends", "cpu", "--small"]) == 0
    assert "cpu: every section passed" in capsys.readouterr().out


@needs_ext
def test_the_sanitizer_workload_catches_a_wrongly_scaled_grad(monkeypatch):
    from fusedclip.backends.cpu_backend import CpuBackend

    scale = CpuBackend.launch_scale

    def off_by_a_thousandth(self, work, tables, coef):
        scale(self, work, tables, coef * 1.001)

    monkeypatch.setattr(CpuBackend, "launch_scale", off_by_a_thousandth)
    with pytest.raises(AssertionError, match="scaled wrongly"):
        _load_driver().main(["--device", "cpu", "--backends", "cpu", "--small"])


def test_the_sanitizer_workload_refuses_a_backend_that_cannot_run(capsys):
    assert _load_driver().main(["--device", "cpu", "--backends", "no-such-backend"]) == 2
    assert "cannot run no-such-backend" in capsys.readouterr().err
