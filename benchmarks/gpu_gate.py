"""The gate of the GPU proof: the compiled `cuda` backend and the `triton` backend must really run.

A CUDA build that failed under FUSEDCLIP_CUDA=auto leaves a CPU-only extension, and the GPU tests
then skip the `cuda` backend and pass. This script refuses that. It prints the facts a result needs
(versions, GPU, the extension's build and build record, ``available_backends("cuda")``), then clips
one mixed-dtype gradient set with every backend explicitly on the GPU, compares each with a float64
reference and with torch, lists the kernels each call launched, and exits 1 when `cuda` or
`triton` is unavailable or wrong, naming the reason.

    python benchmarks/gpu_gate.py              # on a CUDA machine (benchmarks/gpu_proof.sh runs it)
    python benchmarks/gpu_gate.py --rehearse   # the same checks with the CPU backends, on any machine
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip import _ext  # noqa: E402

#: the backends that must run on a GPU for the proof to count, and the rest that are checked too
REQUIRED = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
ALSO = {"cuda": ("torch",), "cpu": ("torch",)}


def available_on(device: str) -> dict[str, bool | str]:
    """``available_backends(device)`` (per device), or the older form without a device."""
    function = fusedclip.available_backends
    try:
        takes_device = len(inspect.signature(function).parameters) > 0
    except (TypeError, ValueError):
        takes_device = False
    return function(device) if takes_device else function()


def facts(device: str) -> None:
    print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as error:
        print(f"triton missing: {error}")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(
            f"device {props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB,"
            f" compute capability {props.major}.{props.minor}; driver supports CUDA {_ext.driver_cuda_version()}"
        )
    print(f"fusedclip._C: {getattr(_ext.C, '__file__', None)}")
    print(f"  build_info: {_ext.BUILD_INFO}")
    print(f"  build record: {_ext.BUILD_RECORD or '(none: built by an older setup.py, or not built)'}")
    print(f"available_backends({device!r}): {available_on(device)}")


def make_grads(device: str, seed: int = 0) -> list[torch.Tensor]:
    """Mixed dtypes and awkward sizes (odd, chunk-crossing), fresh random values."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [1, 17, 4099, 65536 + 3, 300_001, 255]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    grads = []
    for i, size in enumerate(sizes * 2):
        values = torch.randn(size, generator=generator, dtype=torch.float64) * (1 + i)
        grads.append(values.to(device, dtypes[i % len(dtypes)]))
    return grads


def kernel_names(fn, device: str) -> list[str]:
    """Names of the device kernels ``fn`` launched (CUDA only; [] elsewhere)."""
    if device != "cuda":
        return []
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def check_backend(name: str, device: str) -> str | None:
    """None when ``name`` clips correctly on ``device``, else what went wrong."""
    grads = make_grads(device)
    ideal = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    max_norm = 0.25 * ideal
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty_like(g), requires_grad=False)
        p.grad = g.clone()
        params.append(p)
    try:
        total = fusedclip.clip_grad_norm_(params, max_norm, backend=name)
        norm_again = fusedclip.get_total_norm([p.grad for p in params], backend=name)
        launched = kernel_names(lambda: fusedclip.clip_grad_norm_(params, math.inf, backend=name), device)
    except Exception as error:  # the reason is the point of the gate
        return f"{type(error).__name__}: {error}"
    if device == "cuda":
        torch.cuda.synchronize()
    total_error = abs(float(total) - ideal) / ideal
    coef = min(1.0, max_norm / (float(total) + 1e-6))  # the grads are scaled by the returned norm's coefficient
    worst = 0.0
    for g, p in zip(grads, params):
        expected = g.double() * coef
        tolerance = {torch.float64: 1e-10, torch.float32: 1e-6}.get(g.dtype, 1e-2)
        err = float((p.grad.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        worst = max(worst, err / tolerance)
    print(
        f"  {name:7s} total {float(total):.6g} (float64 {ideal:.6g}, relative error {total_error:.1e});"
        f" clipped grads within {worst:.2f} of tolerance; norm after clipping {float(norm_again):.6g}"
        f" (max_norm {max_norm:.6g}); kernels of an unclipped call: {launched or 'not profiled off the GPU'}"
    )
    # the torch backend on CPUs takes torch's own bf16 per-tensor norms (README: accuracy), within 2**-8
    allowed = 2.0**-8 if name == "torch" and device == "cpu" and any(g.dtype == torch.bfloat16 for g in grads) else 1e-5
    if total_error > allowed:
        return f"total norm off by {total_error:.1e} relative to float64"
    if worst > 1.0:
        return f"clipped grads off by {worst:.2f}x the tolerance"
    if not math.isclose(float(norm_again), max_norm, rel_tol=1e-2):
        return f"the norm after clipping is {float(norm_again)}, expected about {max_norm}"
    if device == "cuda" and name in ("cuda", "triton") and len(launched) != 2:
        return f"expected 2 kernel launches per clip_grad_norm_, saw {launched}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehearse", action="store_true", help="check the CPU backends instead (no GPU needed)")
    args = parser.parse_args(argv)
    device = "cpu" if args.rehearse else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"FAILED: torch sees no CUDA device; cuda backend: {_ext.cuda_unavailable_reason()}")
        return 1
    facts(device)
    available = available_on(device)
    failures = []
    for name in REQUIRED[device]:
        if available.get(name) is not True:
            failures.append(f"backend {name!r} is unavailable on {device}: {available.get(name)}")
    print(f"explicit clip_grad_norm_ per backend on {device}:")
    for name in REQUIRED[device] + ALSO[device]:
        problem = check_backend(name, device)
        if problem is not None:
            failures.append(f"backend {name!r}: {problem}")
    if failures:
        print("GATE FAILED:")
        for failure in failures:
            print(f"  {failure}")
        return 1
    print(f"gate passed: {', '.join(REQUIRED[device])} run on {device} and agree with float64")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
