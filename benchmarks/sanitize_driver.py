"""A small workload for sanitizers: every kernel path of a kernel backend, on awkward inputs.

benchmarks/sanitize_gpu.sh runs it for the ``cuda`` and ``triton`` backends under
compute-sanitizer's memcheck, racecheck, initcheck and synccheck; benchmarks/sanitize_cpu.sh runs
it for the ``cpu`` backend in the AddressSanitizer build. Each section calls the public API on awkward inputs: mixed dtypes in one call, every
norm type, sizes on both sides of chunk boundaries, empty and one-element tensors, thousands of
small tensors, views that start misaligned and end exactly at the end of their allocation (run with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that a read past a grad is a read past an allocation), strided
grads, max_norm on the device, grad scales (AMP), per-tensor norms, non-finite grads and a second
stream. Results are checked against a float64 reference, so a run that silently did nothing fails.

    python benchmarks/sanitize_driver.py                      # cuda and triton on the GPU
    python benchmarks/sanitize_driver.py --backends triton     # one backend
    python benchmarks/sanitize_driver.py --device cpu --backends cpu   # the logic, on a CPU

The checks assume a kernel backend (cuda, triton, cpu: float64 accumulation, one rounding); the
torch backend accumulates in float32 and is not what this driver is for.

Exit status: 0 when every check passed, 1 on a wrong result, 2 when a requested backend cannot run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedclip  # noqa: E402
from fusedclip import plan  # noqa: E402

CHUNK = plan.CHUNK_ELEMENTS
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
NORM_TYPES = [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0, 0.5]


# ---- inputs ------------------------------------------------------------------------------------------


def _values(n: int, dtype: torch.dtype, device: str, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def mixed_sizes(device: str, gen: torch.Generator, small: bool) -> list[torch.Tensor]:
    """Every dtype at sizes around chunk boundaries, each its own allocation."""
    sizes = [1, 7, 127, 1000, CHUNK - 1, CHUNK, CHUNK + 1] + ([] if small else [3 * CHUNK + 5, 1_000_003])
    return [_values(n, DTYPES[i % 4], device, gen, 10.0 ** (i % 3 - 1)) for i, n in enumerate(sizes)]


def misaligned_views(device: str, gen: torch.Generator, small: bool) -> list[torch.Tensor]:
    """Views starting 1-3 elements into a buffer and ending at its last element (odd lengths)."""
    views = []
    for i, dtype in enumerate(DTYPES):
        for offset in (1, 3):
            n = (CHUNK + 37 if small else 2 * CHUNK + 37) + i
            base = _values(n + offset, dtype, device, gen)
            views.append(base[offset:])  # ends exactly where the allocation ends
    return views


def strided_views(device: str, gen: torch.Generator) -> list[torch.Tensor]:
    """Grads that are not dense in memory (the plan stages them), and a transposed dense one."""
    a = _values(2 * 999, torch.float32, device, gen)[::2]
    b = _values(33 * 65, torch.bfloat16, device, gen).view(33, 65)[:, 1:]
    c = _values(40 * 31, torch.float16, device, gen).view(40, 31).t()
    return [a, b, c]


def many_small(device: str, gen: torch.Generator, small: bool) -> list[torch.Tensor]:
    count = 300 if small else 3000
    sizes = torch.randint(1, 300, (count,), generator=gen).tolist()
    return [_values(n, DTYPES[i % 4], device, gen) for i, n in enumerate(sizes)]


def one_dtype(dtype: torch.dtype, device: str, gen: torch.Generator) -> list[torch.Tensor]:
    """The total is written in the grads' own dtype (bfloat16, float16, float32)."""
    return [_values(n, dtype, device, gen, 0.1) for n in (3, CHUNK + 1, 999)]


def with_empty(device: str, gen: torch.Generator) -> list[torch.Tensor]:
    return [
        _values(0, torch.float32, device, gen),
        _values(5, torch.bfloat16, device, gen),
        _values(0, torch.float64, device, gen),
    ]


# ---- reference and checks ----------------------------------------------------------------------------


def reference_norm(grads: list[torch.Tensor], p: float) -> float:
    """torch's definition (p-norm of the per-tensor p-norms), computed in float64."""
    per = [
        torch.linalg.vector_norm(g.double().reshape(-1), p)
        if g.numel()
        else torch.zeros((), dtype=torch.float64, device=g.device)
        for g in grads
    ]
    return float(torch.linalg.vector_norm(torch.stack(per), p))


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def check_close(
    name: str, got: float, want: float, dtype: torch.dtype, terms: int = 1, inputs: tuple = ()
) -> None:
    """Within two units of rounding of the result's dtype (the kernels round the total once), plus
    what summing ``terms`` float64 values in another order may cost, plus the float32 block sums the
    CPU kernels take of float32/float16/bfloat16 data (``inputs``: the grads' dtypes), which the
    contract allows (accumulation in at least float32): a few float32 roundings of each block sum."""
    rounded = float(torch.tensor(want, dtype=torch.float64).to(dtype))  # may overflow float16 to inf
    blocks = 16 * _eps(torch.float32) if any(d != torch.float64 for d in inputs) else 0.0
    if math.isnan(want) or math.isinf(rounded):
        ok = (math.isnan(got) and math.isnan(want)) or got == rounded
    else:
        ok = abs(got - want) <= (2 * _eps(dtype) + terms * _eps(torch.float64) + blocks) * abs(want) + 1e-300
    if not ok:
        raise AssertionError(f"{name}: got {got!r}, expected {want!r} ({dtype})")


def check_scaled(name: str, before: list[torch.Tensor], after: list[torch.Tensor], coef: float) -> None:
    """Every element: the float64 product rounded to the grad's dtype, give or take one rounding."""
    for i, (b, a) in enumerate(zip(before, after)):
        expected = (b.double() * coef).to(b.dtype)
        info = torch.finfo(b.dtype)
        try:  # atol: one step between subnormals (fp16 grads times a small coefficient reach them)
            torch.testing.assert_close(
                a, expected, rtol=2 * info.eps, atol=info.smallest_normal * info.eps, equal_nan=True
            )
        except AssertionError as error:
            raise AssertionError(
                f"{name}: grad {i} ({b.dtype}, {b.numel()} elements) scaled wrongly: {error}"
            ) from None


def _dtypes(grads: list[torch.Tensor]) -> tuple:
    return tuple(g.dtype for g in grads)


def _terms(grads: list[torch.Tensor]) -> int:
    return sum(g.numel() for g in grads) + len(grads)


def _params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        param = torch.nn.Parameter(torch.empty_like(g))
        param.grad = g  # the grad itself, not a copy: views stay views
        params.append(param)
    return params


# ---- sections ------------------------------------------------------------------------------------------


def host(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies: the checks run there, so that the sanitizer's time goes to the kernels under test
    (copies are not kernel launches) and torch's own kernels add no noise to its reports."""
    return [g.detach().to("cpu", copy=True) for g in grads]


def run_sets(backend: str, sets: dict[str, list[torch.Tensor]]) -> None:
    for set_name, grads in sets.items():
        device = grads[0].device
        params = _params(grads)
        nonempty = [g for g in grads if g.numel()]
        snapshot = host(grads)
        for p in NORM_TYPES:
            tensors = nonempty if p == -math.inf else grads  # -inf has no identity for empty tensors
            want = reference_norm([g for g in snapshot if g.numel() or p != -math.inf], p)
            got = fusedclip.get_total_norm(tensors, p, backend=backend)
            check_close(
                f"{set_name} get_total_norm p={p}", float(got), want, got.dtype, _terms(tensors), _dtypes(tensors)
            )

        # clip_grad_norm_ that clips (every element checked), then one that does not
        want = reference_norm(snapshot, 2.0)
        max_norm = want / 7
        total = fusedclip.clip_grad_norm_(params, max_norm, backend=backend)
        check_close(f"{set_name} clip_grad_norm_ total", float(total), want, total.dtype, _terms(grads), _dtypes(grads))
        # the coefficient from the returned total: checked above, and exact for float64 results
        after = host(grads)
        check_scaled(f"{set_name} clip_grad_norm_", snapshot, after, min(max_norm / (float(total) + 1e-6), 1.0))
        snapshot = after
        fusedclip.clip_grad_norm_(params, 1e30, 1.0, backend=backend)
        for a, b in zip(snapshot, host(grads)):
            assert torch.equal(a, b), f"{set_name}: an unclipped call changed a grad"

        # max_norm as a device tensor, norm inf
        want_inf = reference_norm(snapshot, math.inf)
        device_max = torch.tensor(want_inf / 3, device=device)
        total = fusedclip.clip_grad_norm_(params, device_max, math.inf, backend=backend)
        check_close(f"{set_name} max_norm tensor total", float(total), want_inf, total.dtype)
        after = host(grads)
        check_scaled(
            f"{set_name} max_norm tensor", snapshot, after, min(float(device_max) / (float(total) + 1e-6), 1.0)
        )
        snapshot = after

        # the split API: get_total_norm then clip_grads_with_norm_
        total = fusedclip.get_total_norm(grads, 2.0, backend=backend)
        fusedclip.clip_grads_with_norm_(params, 0.5, total, backend=backend)
        after = host(grads)
        check_scaled(f"{set_name} clip_grads_with_norm_", snapshot, after, min(0.5 / (float(total) + 1e-6), 1.0))
        snapshot = after

        # per-tensor norms from the same pass
        total, per_tensor = fusedclip.get_norms(grads, 2.0, backend=backend)
        per_tensor = per_tensor.cpu()
        for i, g in enumerate(snapshot):
            want_i = float(torch.linalg.vector_norm(g.double().reshape(-1))) if g.numel() else 0.0
            check_close(
                f"{set_name} get_norms[{i}]", float(per_tensor[i]), want_i, per_tensor.dtype, g.numel(), (g.dtype,)
            )

        # clamp
        fusedclip.clip_grad_value_(params, 0.01, backend=backend)
        for i, (b, a) in enumerate(zip(snapshot, host(grads))):
            assert torch.equal(a, b.clamp(-0.01, 0.01)), f"{set_name}: clip_grad_value_ grad {i}"
        print(f"  {backend:6s} {set_name}: ok ({len(grads)} tensors)", flush=True)


def run_non_finite(backend: str, device: str, gen: torch.Generator) -> None:
    for bad in (math.inf, math.nan):
        grads = [_values(1000, dtype, device, gen) for dtype in DTYPES]
        grads[1][17] = bad
        params = _params(grads)
        total = fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
        assert math.isnan(float(total)) if math.isnan(bad) else math.isinf(float(total)), (bad, float(total))
        if math.isnan(bad):
            assert all(bool(torch.isnan(g).all()) for g in host(grads)), "NaN grads make every grad NaN"
    print(f"  {backend:6s} non-finite: ok", flush=True)


def run_amp(backend: str, device: str, gen: torch.Generator) -> None:
    """unscale_and_clip_: the norm pass with a grad scale folded in (kernels read it from the device)."""
    if device != "cuda":
        return
    model = torch.nn.Linear(64, 33, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    x = torch.randn(8, 64, generator=gen).to(device)
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    unscaled = [p.grad.double() / 1024.0 for p in model.parameters()]
    want = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u) for u in unscaled])))
    total = fusedclip.unscale_and_clip_(scaler, optimizer, want / 4, backend=backend)
    check_close("amp total", float(total), want, torch.float32)
    scaler.step(optimizer)
    scaler.update()
    print(f"  {backend:6s} amp: ok", flush=True)


def run_side_stream(backend: str, device: str, gen: torch.Generator) -> None:
    """The same plan on a second stream (its own workspace)."""
    if device != "cuda":
        return
    grads = mixed_sizes(device, gen, small=True)
    want = reference_norm(host(grads), 2.0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = fusedclip.get_total_norm(grads, backend=backend)
        got_again = fusedclip.get_total_norm(grads, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    default = fusedclip.get_total_norm(grads, backend=backend)
    check_close("side stream", float(got), want, got.dtype)
    assert torch.equal(got, got_again) and torch.equal(got, default), "the same bits on every stream and call"
    print(f"  {backend:6s} side stream: ok", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="device of the grads (default cuda)")
    parser.add_argument("--backends", default="cuda,triton", help="comma-separated backends (default cuda,triton)")
    parser.add_argument("--small", action="store_true", help="smaller sets (e.g. for the Triton interpreter)")
    args = parser.parse_args(argv)

    backends = [name for name in args.backends.split(",") if name]
    available = fusedclip.available_backends()
    missing = {name: available.get(name, "unknown backend") for name in backends if available.get(name) is not True}
    if args.device == "cuda" and not torch.cuda.is_available():
        missing["cuda device"] = "torch sees no CUDA device"
    if missing:
        for name, reason in missing.items():
            print(f"cannot run {name}: {reason}", file=sys.stderr)
        return 2

    caching = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1"
    if args.device == "cuda" and caching:
        print("note: PYTORCH_NO_CUDA_MEMORY_CACHING=1 is not set; reads past a grad may land in cached memory unseen")

    for backend in backends:
        gen = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        sets = {
            "mixed sizes": mixed_sizes(args.device, gen, args.small),
            "misaligned views": misaligned_views(args.device, gen, args.small),
            "strided views": strided_views(args.device, gen),
            "many small": many_small(args.device, gen, args.small),
            "with empty": with_empty(args.device, gen),
            "bfloat16 only": one_dtype(torch.bfloat16, args.device, gen),
            "float16 only": one_dtype(torch.float16, args.device, gen),
            "float32 only": one_dtype(torch.float32, args.device, gen),
        }
        run_sets(backend, sets)
        run_non_finite(backend, args.device, gen)
        run_amp(backend, args.device, gen)
        run_side_stream(backend, args.device, gen)
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"{backend}: every section passed in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as error:
        print(f"WRONG RESULT: {error}", file=sys.stderr)
        sys.exit(1)
