"""One shim build of kernels.cu through a small, demanding set of checks, in a child process.

    python -m cuda_shim.mutant_check LIBRARY [--no-guard-pages] [--small]

(run with tests/ and the repository on PYTHONPATH). Prints ``PASS`` and exits 0 when every check
holds; prints ``FAIL: ...`` and exits 1 at the first wrong result or launch error. A memory fault
makes the shim's reporter print ``cuda_shim: memory fault`` and exit 86; a sanitizer's report
ends the process its own way. tests/test_cuda_mutations.py runs this for the unmodified kernels
(must pass) and for every planted bug (must fail), and ``--small`` for AddressSanitizer builds.

The checks are the parity suite's (tests/reference.py: every element of every grad, the total
against the fp64 ideal with torch's error as the allowance), on layouts chosen to reach every
path: tensors ending at a guard page (reads past the end fault), views at 1-3 element offsets
(vector heads), odd sizes (tails), 40 tensors (a partly filled warp in the final fold), tensors of
more than eight units (folded by a whole warp), several SM counts and blocks per SM, and calls
repeated with fresh data on one workspace (its counters must reset).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import traceback

import torch


def _guarded(numel: int, dtype: torch.dtype, keep: list) -> torch.Tensor:
    """A tensor whose last element ends where an inaccessible page begins."""
    page = mmap.PAGESIZE
    size = numel * torch.empty((), dtype=dtype).element_size()
    pages = (size + page - 1) // page + 1
    memory = mmap.mmap(-1, pages * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(base + (pages - 1) * page, page, 0) != 0:  # PROT_NONE
        raise OSError("mprotect failed")
    keep.append(memory)
    return torch.frombuffer(memory, dtype=dtype, count=numel, offset=(pages - 1) * page - size)


def _layout(seed: int, guard: bool, keep: list) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    params = []
    sizes = [int(s) for s in torch.randint(1, 90, (38,), generator=gen)] + [1000, 1500]
    for i, numel in enumerate(sizes):
        dtype = dtypes[i % 4]
        values = (torch.randn(numel, generator=gen, dtype=torch.float64) * 2).to(dtype)
        if guard and i % 3 == 0:
            grad = _guarded(numel, dtype, keep)
            grad.copy_(values)
        else:
            offset = 1 + i % 3  # element offsets 1-3: vector heads of every length
            grad = torch.empty(numel + offset, dtype=dtype)[offset:]
            grad.copy_(values)
        param = torch.nn.Parameter(torch.zeros(numel, dtype=dtype))
        param.grad = grad
        params.append(param)
    return params


def _refresh(params: list[torch.nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad.copy_(torch.randn(p.grad.shape, generator=gen, dtype=torch.float64) * (1 + seed % 5))


def run(library_path: str, guard_pages: bool, small: bool) -> None:
    import fusedclip
    from fusedclip import plan
    from reference import check_clip_against_torch, clone_params, grads, ideal_total_norm

    from cuda_shim.emulation import Emulation, ShimLibrary

    library = ShimLibrary(library_path)
    library.install_fault_reporter()
    emulation = Emulation(library)
    keep: list = []

    def clip_and_check(params, norm_type: float, clipped: bool = True) -> None:
        theirs = clone_params(params)
        before = [g.clone() for g in grads(params)]
        ideal = float(ideal_total_norm(before, norm_type))
        max_norm = ideal * (0.4 if clipped else 2.0)
        torch_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
        ours = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend="cuda")
        check_clip_against_torch(params, theirs, before, ours, torch_total, max_norm, norm_type)

    with emulation.installed():
        plan.PLANS.chunk_elements = 64  # 1000 elements: 16 chunks, more than the warp-fold threshold of 8
        seed = 0
        configs = ((2, 2), (3, 1)) if small else ((2, 2), (3, 1), (1, 1), (6, 3))
        for sms, blocks_per_sm in configs:
            with emulation.sms(sms, blocks_per_sm):
                params = _layout(sms, guard_pages, keep)
                for norm_type in (2.0,) if small else (2.0, float("inf"), 1.0):
                    for _ in range(2 if small else 3):  # fresh data on the same plan and workspace
                        seed += 1
                        _refresh(params, seed)
                        clip_and_check(params, norm_type)
                # the clamp kernel
                _refresh(params, seed + 1000)
                theirs = clone_params(params)
                fusedclip.clip_grad_value_(params, 0.5, backend="cuda")
                torch.nn.utils.clip_grad_value_(theirs, 0.5)
                for k, (a, b) in enumerate(zip(grads(params), grads(theirs))):
                    assert torch.equal(a, b), f"clip_grad_value_: grad {k} differs from torch's"


def main(argv: list[str]) -> int:
    library_path = argv[0]
    try:
        run(library_path, guard_pages="--no-guard-pages" not in argv, small="--small" in argv)
    except Exception as error:  # a wrong result (AssertionError) or a launch error (RuntimeError)
        traceback.print_exc()
        print(f"FAIL: {type(error).__name__}: {error}", flush=True)
        return 1
    print("PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
