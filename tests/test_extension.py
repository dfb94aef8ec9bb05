"""The compiled extension fusedclip._C: build contents, determinism, scale, import without it, GIL.

The parity suite (test_parity.py and friends) runs the ``cpu`` backend against torch through
conftest's BACKEND_CASES; this file checks what is particular to the extension.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from reference import assert_no_worse_than_torch, grads, make_params

import fusedclip
from fusedclip import _ext, engine, plan
from fusedclip.norm_type import parse_norm_type

ROOT = Path(__file__).resolve().parents[1]
BUILD_SKIPPED = os.environ.get("FUSEDCLIP_BUILD_EXT") == "0"

needs_ext = pytest.mark.skipif(_ext.C is None, reason=f"fusedclip._C is not built: {_ext.MISSING_REASON}")


@pytest.fixture
def threads():
    """Restore torch's thread count after a test changes it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _nvcc_on_this_machine() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(shutil.which("nvcc") or (home and (Path(home) / "bin" / "nvcc").exists()))


# ---- the build ------------------------------------------------------------------------------------


@pytest.mark.skipif(BUILD_SKIPPED, reason="FUSEDCLIP_BUILD_EXT=0: the extension is deliberately not built")
def test_the_extension_is_built():
    assert _ext.C is not None, _ext.MISSING_REASON
    assert fusedclip.available_backends()["cpu"] is True


@needs_ext
def test_build_info_describes_the_build():
    info = _ext.C.build_info()
    assert isinstance(info["has_cuda"], bool)
    assert "base" in info["cpu_isas_compiled"]
    assert info["cpu_isas_supported"][0] == "base"
    assert set(info["cpu_isas_supported"]) <= set(info["cpu_isas_compiled"])
    assert info["cpu_isa"] == info["cpu_isas_supported"][-1], "the best supported loops are chosen by default"
    if info["has_cuda"]:
        assert _ext.cuda_archs(), "a CUDA build names its architectures"


@needs_ext
@pytest.mark.skipif(not _nvcc_on_this_machine(), reason="no nvcc on this machine")
@pytest.mark.skipif(os.environ.get("FUSEDCLIP_CUDA", "auto").strip() == "0", reason="FUSEDCLIP_CUDA=0")
def test_cuda_kernels_are_compiled_where_nvcc_exists():
    """With nvcc present the build includes the CUDA kernels (CI compiles them even without a GPU)."""
    assert _ext.C.build_info()["has_cuda"], "nvcc is on this machine but fusedclip._C was built without CUDA"


def test_capability_rules_for_compiled_architectures(monkeypatch):
    monkeypatch.setattr(_ext, "BUILD_INFO", {"cuda_archs": "80;90+PTX"})
    assert _ext.runs_on_capability(8, 0) and _ext.runs_on_capability(8, 9)  # sm_80 machine code
    assert _ext.runs_on_capability(9, 0) and _ext.runs_on_capability(12, 0)  # compute_90 PTX
    assert not _ext.runs_on_capability(7, 5)
    monkeypatch.setattr(_ext, "BUILD_INFO", {"cuda_archs": "90"})
    assert not _ext.runs_on_capability(10, 0)  # no PTX: a newer major version cannot run sm_90 code


# ---- determinism ----------------------------------------------------------------------------------

SIZES = [3_000_001, 65_536, 1, 0, 131_071, 7, 2_500_000, 1_000, 65_537, 999_999]


def _mixed_grads(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    return [
        (torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** (i % 5 - 2)).to(dtypes[i % 4])
        for i, n in enumerate(SIZES)
    ]


def _clip_once(tensors, norm_type, max_norm):
    params = _params_with_grads([t.clone() for t in tensors])
    total = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend="cpu")
    return total, [p.grad for p in params]


def _params_with_grads(tensors):
    params = []
    for t in tensors:
        param = torch.nn.Parameter(torch.empty_like(t))
        param.grad = t
        params.append(param)
    return params


def _clip_with_two_threads_working(tensors, norm_type, max_norm, attempts=40):
    """Clip until both threads processed chunks of the norm pass (on a busy machine the second
    thread may wait for a CPU until the caller has done all the work alone)."""
    for _ in range(attempts):
        result = _clip_once(tensors, norm_type, max_norm)
        stats = _ext.C.testing.cpu_stats()
        assert stats["last_threads"] == 2
        if stats["norm_participants"] == 2:
            return result
        time.sleep(0.02)
    pytest.skip(f"the second thread never got to work in {attempts} calls (is the machine overloaded?)")


@needs_ext
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0, 0.0])
def test_one_and_two_threads_give_the_same_bits(threads, norm_type):
    tensors = _mixed_grads()
    threads(1)
    total_1, scaled_1 = _clip_once(tensors, norm_type, 0.01)
    stats = _ext.C.testing.cpu_stats()
    assert stats["last_threads"] == 1 and stats["norm_participants"] == stats["elementwise_participants"] == 1
    threads(2)
    total_2, scaled_2 = _clip_with_two_threads_working(tensors, norm_type, 0.01)
    assert torch.equal(total_1, total_2)
    for a, b in zip(scaled_1, scaled_2):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@needs_ext
def test_every_instruction_set_gives_the_same_bits():
    supported = _ext.C.build_info()["cpu_isas_supported"]
    if len(supported) < 2:
        pytest.skip(f"only {supported} loops run on this CPU")
    tensors = _mixed_grads(seed=1)
    best = _ext.C.cpu_isa()
    outcomes = []
    try:
        for isa in supported:
            assert _ext.C.testing.cpu_select_isa(isa)
            nonempty = [t for t in tensors if t.numel()]  # p = -inf has no identity for empty tensors
            norms = [fusedclip.get_total_norm(tensors, p, backend="cpu") for p in (2.0, 1.0, math.inf, 0.0, 3.0)]
            norms.append(fusedclip.get_total_norm(nonempty, -math.inf, backend="cpu"))
            clipped = _clip_once(tensors, 2.0, 0.01)[1]
            params = _params_with_grads([t.clone() for t in tensors])
            fusedclip.clip_grad_value_(params, 0.37, backend="cpu")
            outcomes.append((norms, clipped, [p.grad for p in params]))
    finally:
        _ext.C.testing.cpu_select_isa(best)
    first = outcomes[0]
    for other in outcomes[1:]:
        for a, b in zip(first[0], other[0]):
            assert torch.equal(a, b)
        for group in (1, 2):
            for a, b in zip(first[group], other[group]):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@needs_ext
def test_runs_repeat_bit_for_bit(chunk_elements):
    tensors = _mixed_grads(seed=2)
    call = engine.prepare(tensors, "cpu")
    first = engine.norm_and_coef(call, parse_norm_type(2.0), 1.0)
    for _ in range(3):
        again = engine.norm_and_coef(engine.prepare(tensors, "cpu"), parse_norm_type(2.0), 1.0)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# ---- float blocks and their float64 fallback ------------------------------------------------------
#
# Sums of |x| and x * x over float32/float16/bfloat16 data go in float blocks of 256 elements, with a
# float64 recomputation of any block float cannot sum accurately (see chunk_kernels_impl.h). These
# inputs put whole blocks, single blocks and block tails on either side of that line.

BLOCK = 256


def _block_cases(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    finfo = torch.finfo(dtype)

    def randn(n: int, scale: float) -> torch.Tensor:
        return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)

    cases = {
        "ordinary": randn(70_001, 1.0),  # two chunks, a tail after the last block of each
        "huge": randn(3 * BLOCK + 5, finfo.max / 64),  # squares and sums overflow float
        "tiny": randn(3 * BLOCK + 5, finfo.tiny * 8),  # squares underflow float
        "subnormal": randn(2 * BLOCK, finfo.tiny / 64),
        "zeros": torch.zeros(4 * BLOCK + 3, dtype=dtype),
    }
    mixed = randn(8 * BLOCK, 1.0)
    mixed[3] = finfo.max / 2  # one block whose float sum overflows, among ordinary ones
    mixed[BLOCK + 7] = finfo.tiny  # one tiny value among ordinary ones: float is accurate
    mixed[2 * BLOCK : 3 * BLOCK] = randn(BLOCK, finfo.tiny * 4)  # one all-tiny block
    mixed[4 * BLOCK : 5 * BLOCK] = 0.0  # one all-zero block
    cases["mixed"] = mixed
    with_inf = randn(2 * BLOCK, 1.0)
    with_inf[BLOCK + 1] = -math.inf
    cases["inf"] = with_inf
    with_nan = randn(2 * BLOCK, 1.0)
    with_nan[5] = math.nan
    cases["nan"] = with_nan
    return cases


def _exact_sum(tensor: torch.Tensor, p: float) -> float:
    """sum |x|^p correctly rounded to float64 (squares of these dtypes are exact in float64)."""
    values = tensor.double().abs()
    return math.fsum((values * values if p == 2 else values).tolist())


def _accumulators(tensor: torch.Tensor, p: float) -> float:
    backend, work = engine.prepare([tensor], "cpu").works[0]
    return float(backend.accumulate(work, parse_norm_type(p)))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_float_blocks_are_accurate_for_any_input_and_identical_across_isas(dtype, p):
    supported = _ext.C.build_info()["cpu_isas_supported"]
    best = _ext.C.cpu_isa()
    results: dict[str, dict[str, float]] = {}
    try:
        for isa in supported:
            assert _ext.C.testing.cpu_select_isa(isa)
            results[isa] = {name: _accumulators(t, p) for name, t in _block_cases(dtype).items()}
    finally:
        _ext.C.testing.cpu_select_isa(best)
    first = results[supported[0]]
    for isa in supported[1:]:
        for name, value in results[isa].items():
            assert value == first[name] or (math.isnan(value) and math.isnan(first[name])), (isa, name)
    for name, tensor in _block_cases(dtype).items():
        ours, exact = first[name], _exact_sum(tensor, p)
        if math.isnan(exact) or math.isinf(exact):
            assert math.isnan(ours) == math.isnan(exact) and (math.isnan(ours) or ours == exact), name
            continue
        # float blocks: within the rounding of 8 adds, a product and a 32-lane tree per block; a
        # block recomputed in float64 (or summed in float64 as a tail): far closer
        allowed = 16 * 2.0**-24 * exact
        assert abs(ours - exact) <= allowed, f"{dtype} {name}: {ours!r} vs exact {exact!r}"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_float_cannot_sum_are_recomputed_in_float64(dtype):
    """Blocks whose float sum overflows or underflows are exact to float64 rounding, not inf or 0."""
    cases = _block_cases(dtype)
    for name in ("huge", "tiny", "subnormal"):
        for p in (2.0, 1.0):
            if p == 1.0 and name != "huge":
                continue  # sums of |x| of small values lose nothing in float
            ours, exact = _accumulators(cases[name], p), _exact_sum(cases[name], p)
            assert 0 < exact < math.inf
            assert abs(ours - exact) <= 1e-13 * exact, f"{name} p={p}: {ours!r} vs exact {exact!r}"


@needs_ext
def test_the_callers_flush_to_zero_setting_does_not_change_results(threads):
    """The kernels run with the default floating-point environment on every thread."""
    threads(2)
    tiny = torch.finfo(torch.float32).tiny
    gen = torch.Generator().manual_seed(3)
    grads_in = [
        torch.randn(300_001, generator=gen) * tiny * 4,  # subnormal squares and subnormal products
        (torch.randn(5_000, generator=gen) * tiny / 8).to(torch.float32),
        (torch.randn(70_000, generator=gen) * 1e-30).to(torch.bfloat16),
    ]
    outcomes = []
    for flush in (False, True):
        if not torch.set_flush_denormal(flush):
            pytest.skip("this CPU cannot flush denormals")
        try:
            tensors = [g.clone() for g in grads_in]
            norms = [fusedclip.get_total_norm(tensors, q, backend="cpu") for q in (2.0, 1.0)]
            engine.scale_(engine.prepare(tensors, "cpu"), torch.tensor(1 / 3, dtype=torch.float64))
            outcomes.append((norms, tensors))
        finally:
            torch.set_flush_denormal(False)
    (norms_a, grads_a), (norms_b, grads_b) = outcomes
    assert all(torch.equal(a, b) for a, b in zip(norms_a, norms_b))
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(grads_a, grads_b))
    assert bool((grads_a[1] != 0).any()), "subnormal results must survive the scale"


# ---- passes over the data -------------------------------------------------------------------------


@needs_ext
def test_one_norm_pass_and_one_scale_pass_per_call_and_none_when_unclipped():
    params = make_params([(1000,), (33,), (5, 7)], [torch.float32, torch.bfloat16], zero_tensor=False)
    before = _ext.C.testing.cpu_stats()
    fusedclip.clip_grad_norm_(params, 1e-3, backend="cpu")
    after_clipped = _ext.C.testing.cpu_stats()
    assert after_clipped["norm_passes"] - before["norm_passes"] == 1
    assert after_clipped["scale_passes"] - before["scale_passes"] == 1
    fusedclip.clip_grad_norm_(params, 1e9, backend="cpu")
    after_unclipped = _ext.C.testing.cpu_stats()
    assert after_unclipped["norm_passes"] - after_clipped["norm_passes"] == 1
    assert after_unclipped["scale_passes"] == after_clipped["scale_passes"], "an unclipped call must not scale"
    fusedclip.clip_grad_value_(params, 0.5, backend="cpu")
    assert _ext.C.testing.cpu_stats()["clamp_passes"] - after_unclipped["clamp_passes"] == 1


# ---- scale: many tensors, huge tensors ----------------------------------------------------------------


@needs_ext
def test_a_hundred_thousand_small_tensors_in_one_call():
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(1, 24, (100_000,), generator=gen).tolist()
    flat = torch.randn(sum(sizes), generator=gen)
    params = _params_with_grads([piece.clone() for piece in torch.split(flat, sizes)])  # separate allocations
    theirs = _params_with_grads([piece.clone() for piece in torch.split(flat, sizes)])
    ideal = torch.linalg.vector_norm(flat.double())
    max_norm = float(ideal) / 5
    ours_total = fusedclip.clip_grad_norm_(params, max_norm, backend="cpu")
    torch_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert_no_worse_than_torch(ours_total, torch_total, ideal, what="total norm of 1e5 tensors")
    coef = max_norm / (float(ideal) + 1e-6)
    assert_no_worse_than_torch(
        torch.cat(grads(params)), torch.cat(grads(theirs)), flat.double() * coef, what="1e5 scaled tensors"
    )


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


BIG = 2**31 + 3000  # elements: the last chunks start beyond 2**31


@needs_ext
@pytest.mark.slow
@pytest.mark.skipif(_available_memory_bytes() < 6 * 2**30, reason="needs about 6 GiB of free memory")
def test_a_bf16_tensor_with_more_than_2_to_the_31_elements(threads):
    """Values chosen so that every result is exact: 0.5 everywhere, then 3 and -3 past 2**31."""
    threads(2)
    grad = torch.full((BIG,), 0.5, dtype=torch.bfloat16)
    grad[-2] = 3.0
    grad[-1] = -3.0
    tensors = [torch.ones(5, dtype=torch.bfloat16), grad]  # a second tensor, so indices mix
    call = engine.prepare(tensors, "cpu")
    backend, work = call.works[0]
    expected_sum = 5 * 1.0 + (BIG - 2) * 0.25 + 2 * 9.0  # exact in float64
    assert float(backend.accumulate(work, parse_norm_type(2.0))) == expected_sum
    assert float(backend.accumulate(work, parse_norm_type(1.0))) == 5 + (BIG - 2) * 0.5 + 6
    assert float(backend.accumulate(work, parse_norm_type(math.inf))) == 3.0
    total = fusedclip.get_total_norm(tensors, backend="cpu")
    assert total.dtype == torch.bfloat16
    assert float(total) == float(torch.tensor(math.sqrt(expected_sum), dtype=torch.float32).to(torch.bfloat16))

    backend.scale_(work, torch.tensor(0.5, dtype=torch.float64))  # exact: halves every value
    assert float(backend.accumulate(work, parse_norm_type(2.0))) == expected_sum / 4
    assert float(grad[-2]) == 1.5 and float(grad[-1]) == -1.5
    bits = grad.view(torch.int16)
    quarter = int(torch.tensor(0.25, dtype=torch.bfloat16).view(torch.int16))
    step = 2**28
    for start in range(0, BIG - 2, step):  # every element, in slices (no 4 GB temporary)
        assert bool((bits[start : min(start + step, BIG - 2)] == quarter).all()), f"wrong value in [{start}, +{step})"

    engine.clamp_(engine.prepare(tensors, "cpu"), 0.125)
    assert float(grad[-2]) == 0.125 and float(grad[-1]) == -0.125
    assert float(backend.accumulate(work, parse_norm_type(1.0))) == 5 * 0.125 + BIG * 0.125


# ---- the package without the extension ----------------------------------------------------------------

HIDDEN_EXTENSION = textwrap.dedent(
    """
    import sys

    class HideExtension:
        def find_spec(self, name, path=None, target=None):
            if name == "fusedclip._C":
                raise ImportError("fusedclip._C hidden for this test")
            return None

    sys.meta_path.insert(0, HideExtension())
    import torch
    import fusedclip

    available = fusedclip.available_backends()
    assert "fusedclip._C" in available["cpu"], available
    assert "fusedclip._C" in available["cuda"], available
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    total = fusedclip.clip_grad_norm_([param], 1.0)
    assert float(total) == 5.0 and torch.allclose(param.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]))
    try:
        fusedclip.clip_grad_norm_([param], 1.0, backend="cpu")
    except RuntimeError as error:
        assert "fusedclip._C" in str(error), error
    else:
        raise AssertionError("backend='cpu' must raise without the extension")
    print("ok")
    """
)


def test_the_package_works_with_the_extension_hidden():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("FUSEDCLIP_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", HIDDEN_EXTENSION], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


# ---- threads -------------------------------------------------------------------------------------------


@needs_ext
def test_the_gil_is_released_while_a_kernel_runs(threads):
    """Another Python thread keeps running during a long norm (p = 3 takes a pow per element)."""
    threads(1)
    tensors = [torch.randn(4_000_000)]
    call = engine.prepare(tensors, "cpu")
    norm = parse_norm_type(3.0)
    engine.norm_and_coef(call, norm, None)  # tables built outside the timed window
    window: dict[str, float] = {}

    def kernel() -> None:
        window["start"] = time.perf_counter()
        engine.norm_and_coef(call, norm, None)
        window["end"] = time.perf_counter()

    worker = threading.Thread(target=kernel)
    ticks: list[float] = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    during = [t for t in ticks if window["start"] < t < window["end"]]
    assert len(during) > 100, (
        f"only {len(during)} ticks of the other thread during a {window['end'] - window['start']:.3f} s kernel:"
        " the GIL was held"
    )


FORK_CHILD = textwrap.dedent(
    """
    import os, sys, torch, fusedclip
    from fusedclip import _ext
    torch.set_num_threads(2)
    tensors = [torch.randn(2_000_000), torch.randn(1_000_000)]
    expected = fusedclip.get_total_norm(tensors, backend="cpu")  # the threads start here
    pid = os.fork()
    if pid == 0:  # the child has no worker threads: it must use a fresh pool, not wait forever
        ok = torch.equal(fusedclip.get_total_norm(tensors, backend="cpu"), expected)
        ok = ok and _ext.C.cpu_parallel_runtime() == "pool"  # libgomp is not fork-safe
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def _child_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("FUSEDCLIP_CPU_THREADS", None)
    env.update(extra)
    return env


@needs_ext
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("runtime", ["openmp", "pool"])
def test_the_threads_survive_fork(runtime):
    env = _child_env(**({"FUSEDCLIP_CPU_THREADS": "pool"} if runtime == "pool" else {}))
    result = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


RUNTIME_CHILD = textwrap.dedent(
    """
    import sys, torch, fusedclip
    from fusedclip import _ext
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(n, generator=gen).to(dtype) for n, dtype in
             [(3_000_000, torch.float32), (1_500_001, torch.bfloat16), (700_003, torch.float16), (200_000, torch.float64)]]
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty_like(g)); p.grad = g; params.append(p)
    total = fusedclip.clip_grad_norm_(params, 1.0, backend="cpu")
    out = {"runtime": _ext.C.cpu_parallel_runtime(), "total": total, "grads": grads}
    torch.save(out, sys.argv[1])
    """
)


@needs_ext
def test_the_passes_run_on_torchs_openmp_threads_with_the_pools_bits(tmp_path):
    """With torch's OpenMP runtime loaded, the passes borrow its threads (no second team fighting
    torch's spinning threads for the cores); the results are bit for bit the pool's."""
    results = {}
    for runtime in ("openmp", "pool"):
        env = _child_env(**({"FUSEDCLIP_CPU_THREADS": "pool"} if runtime == "pool" else {}))
        path = tmp_path / f"{runtime}.pt"
        done = subprocess.run([sys.executable, "-c", RUNTIME_CHILD, str(path)], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        results[runtime] = torch.load(path)
    assert results["pool"]["runtime"] == "pool"
    maps = Path("/proc/self/maps")
    loaded = [line.split()[-1] for line in maps.read_text().splitlines() if "omp" in line] if maps.exists() else []
    if any(os.path.basename(path).startswith(("libgomp", "libiomp")) for path in loaded):
        assert results["openmp"]["runtime"] in loaded  # the runtime this process (torch) already has
    assert torch.equal(results["openmp"]["total"], results["pool"]["total"])
    for a, b in zip(results["openmp"]["grads"], results["pool"]["grads"]):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_plan_key_objects_compare_by_content():
    a = plan._cache_key([torch.zeros(3)])
    assert a == a and hash(a) == hash(a)
    tensor = torch.zeros(3)
    assert plan._cache_key([tensor]) == plan._cache_key([tensor])
    assert plan._cache_key([tensor]) != plan._cache_key([tensor[:2]])


# -- the launch arguments: named fields, checked when they are made -------------------------------
def _norm_fields(**changes):
    total = torch.empty((), dtype=torch.float64)
    acc = torch.empty((), dtype=torch.float64)
    fields = dict(kind=0, p=2.0, total_out=total.data_ptr(), total_dtype=3, acc_out=acc.data_ptr())
    fields.update(changes)
    return fields, (total, acc)


@needs_ext
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(kind=7), "unknown norm kind"),
        (dict(kind=-1), "unknown norm kind"),
        (dict(total_dtype=4), "total_dtype must be a dtype code"),
        (dict(total_out=0), "null output address"),
        (dict(acc_out=0), "null output address"),
        (dict(max_norm_ptr=64), "max_norm_dtype must be a dtype code"),
        (dict(scale_ptr=64, scale_dtype=9), "scale_dtype must be a dtype code"),
    ],
)
def test_norm_args_refuse_what_would_corrupt_memory(changes, message):
    fields, _keep = _norm_fields(**changes)
    with pytest.raises(ValueError, match=message):
        _ext.C.NormArgs(**fields)


@needs_ext
def test_launch_arguments_take_names_only():
    """A misspelt, missing or positional field raises instead of landing in the wrong slot."""
    fields, _keep = _norm_fields()
    args = _ext.C.NormArgs(**fields)
    assert (args.kind, args.p, args.total_dtype, args.coef_out, args.max_norm_dtype) == (0, 2.0, 3, 0, -1)
    with pytest.raises(TypeError):
        _ext.C.NormArgs(**{**fields, "acc": fields["acc_out"]})
    with pytest.raises(TypeError):
        _ext.C.NormArgs(*fields.values())
    missing = dict(fields)
    del missing["total_dtype"]
    with pytest.raises(TypeError):
        _ext.C.NormArgs(**missing)
    with pytest.raises(TypeError):
        _ext.C.Tables(64, 1, 1, 16)
    with pytest.raises(AttributeError):
        args.kind = 2  # read-only: checked once, when made


@needs_ext
@pytest.mark.parametrize(
    "changes",
    [dict(packed=0), dict(num_tensors=-1), dict(num_chunks=-1), dict(chunk_elements=0), dict(num_chunks=0, total_elements=5)],
)
def test_tables_refuse_impossible_sizes(changes):
    fields = dict(packed=64, num_tensors=1, num_chunks=1, chunk_elements=16, total_elements=5, **{})
    fields.update(changes)
    with pytest.raises(ValueError, match="fusedclip._C"):
        _ext.C.Tables(**fields)


@needs_ext
def test_the_cpu_kernels_run_from_named_arguments():
    """One norm and one scale launched by hand from a plan's tables, against torch."""
    grads = [torch.randn(300, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    expected_total = torch.linalg.vector_norm(torch.cat(grads).double())
    expected_grads = [g * 0.5 for g in grads]
    device_plan = plan.build_plan(grads, True).devices[0]
    tables = device_plan.kernel_tables(grads)
    described = _ext.C.Tables(
        packed=tables.packed.data_ptr(), num_tensors=3, num_chunks=tables.num_chunks,
        chunk_elements=tables.chunk_elements, total_elements=900,
    )  # fmt: skip
    fields, (total, acc) = _norm_fields()
    _ext.C.cpu_norm(described, _ext.C.NormArgs(**fields), 1)
    assert float(total) == pytest.approx(float(expected_total), rel=1e-6)  # float32 blocks
    coef = torch.tensor(0.5, dtype=torch.float64)
    _ext.C.cpu_scale(described, 1, coef.data_ptr(), 3)
    for got, want in zip(grads, expected_grads):
        assert torch.equal(got, want)
