"""The Triton kernels compile for real GPU targets, with 16-byte vector loads and no local memory,
even without a GPU.

CI has no GPU and runs the kernels through the interpreter, which never compiles them. This test
compiles every variant the backend launches ahead of time for sm_80 (Ampere) and sm_90 (Hopper) in
a fresh process without ``TRITON_INTERPRET``, with Triton's cache bypassed, and reads:

* the PTX: the aligned full-block loops must use vectorised loads and stores, and the norm kernel's
  ticket must be an acquire-release atomic;
* ptxas's resource report (``-v``) of the very ptxas call Triton makes for the cubin (its bundled
  ptxas and its flags, as at run time on a GPU; ``TRITON_DUMP_PTXAS_LOG``), parsed by the parser of
  tests/test_cuda_resources.py: no register spills and no stack frame (local memory) in any kernel,
  and the registers per thread, printed (``-s``) and recorded in benchmarks/TUNING.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from test_cuda_resources import _table, parse_ptxas  # noqa: E402

ARCHS = (80, 90)
VARIANTS = (
    "norm p=2",
    "norm p=2 per-tensor, grad_scale, max_norm tensor",
    "norm p=1",
    "norm p=3.5",
    "norm inf",
    "norm -inf",
    "norm 0",
    "scale",
    "clamp",
)
#: the register ceiling of a 256-thread block (Triton's .reqntid: 8 warps) and of any thread
MAX_REGISTERS = min(255, 65536 // 256)
#: spills ptxas reports for these variants with Triton's own ptxas call (Triton 3.9: ptxas 12.9 for
#: sm_80, 13.4 for sm_90a; bytes of spill stores + spill loads): a few 4-byte values stored once per
#: launch and reloaded once per chunk (in the chunk loop, not in the per-block element loops; for
#: sm_90 norm p=3.5 outside every loop). Up to these sizes the case is an xfail that prints the
#: numbers, so they stay visible until the kernels lose them; more spill, or any elsewhere, fails.
KNOWN_SPILLS = {
    (80, "norm p=1"): 16,
    (90, "norm p=3.5"): 8,
    (90, "scale"): 40,
}

_COMPILE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedclip.backends import triton_kernels as kernels
    from fusedclip.backends.triton_backend import CUDA_CONFIG as config

    assert not kernels.interpreted()
    target = None
    tables = dict(addresses_ptr="*i64", numels_ptr="*i64", codes_ptr="*i64", first_chunk_ptr="*i64",
                  chunk_tensor_ptr="*i64", chunk_start_ptr="*i64", num_chunks="i32", num_tensors="i32",
                  chunk_elements="i32")

    def compile_kernel(kernel, types, constexprs, warps):
        signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
        log = io.StringIO()  # Triton prints ptxas's -v report here (TRITON_DUMP_PTXAS_LOG=1)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                      options=dict(num_warps=warps))
        return {"ptx": compiled.asm["ptx"], "ptxas": log.getvalue(), "shared": compiled.metadata.shared}

    def norm(kind, p_mode, extras, norm_scale=False):
        types = dict(tables, partials_ptr="*fp64", chunk_values_ptr="*fp64", tensor_values_ptr="*fp64",
                     tensor_tickets_ptr="*i32", ticket_ptr="*i32", total_ptr="*bf16", coef_ptr="*fp64",
                     acc_ptr="*fp64", max_norm_ptr="*fp32", max_norm_bits="i64", grad_scale_ptr="*fp32",
                     p_hi_bits="i64", p_lo_bits="i64", inv_p_hi_bits="i64", inv_p_lo_bits="i64",
                     norm_scale_ptr="*fp64")
        constexprs = dict(KIND=kind, P_MODE=p_mode, HAS_COEF=True, MAX_NORM_FROM_PTR=extras,
                          HAS_GRAD_SCALE=extras, SEGMENTED=extras or kind == 3, ZERO_EMPTY_TENSORS=extras,
                          HAS_NORM_SCALE=norm_scale,
                          BLOCK=config.norm_block, FINISH_BLOCK=config.finish_block, STAGES=config.stages)
        return compile_kernel(kernels.norm_kernel, types, constexprs, config.norm_warps)

    def variants():
        return {
            "norm p=2": norm(0, 2, False),
            "norm p=2 per-tensor, grad_scale, max_norm tensor": norm(0, 2, True),
            "norm p=1": norm(0, 1, False),
            "norm p=3.5": norm(0, 0, False, norm_scale=True),
            "norm inf": norm(1, 0, False),
            "norm -inf": norm(2, 0, False),
            "norm 0": norm(3, 0, False),
            "scale": compile_kernel(kernels.scale_kernel, dict(tables, coef_ptr="*fp64"),
                                    dict(BLOCK=config.scale_block, STAGES=config.stages), config.scale_warps),
            "clamp": compile_kernel(kernels.clamp_kernel, dict(tables, limit_fp32_bits="i64", limit_fp16_bits="i64",
                                                               limit_bf16_bits="i64", limit_fp64_bits="i64"),
                                    dict(BLOCK=config.scale_block, STAGES=config.stages), config.scale_warps),
        }

    found = {}
    for arch in map(int, sys.argv[1:]):
        target = GPUTarget("cuda", arch, 32)
        found[arch] = variants()
    print(json.dumps(found))
    """
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[int, dict[str, dict[str, str]]]:
    """arch -> variant -> {"ptx": the PTX, "ptxas": ptxas's -v report of Triton's own cubin build,
    "shared": the bytes of shared memory Triton launches it with (dynamic, so not in ptxas's report)}."""
    from triton.backends import backends as triton_backends

    if "nvidia" not in triton_backends:
        pytest.skip("this triton has no NVIDIA backend")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    # a fresh cache and no cache hits: every kernel goes through ptxas, which reports its resources
    env.update(TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")), TRITON_ALWAYS_COMPILE="1",
               TRITON_DUMP_PTXAS_LOG="1")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", _COMPILE, *map(str, ARCHS)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return {int(arch): found for arch, found in json.loads(done.stdout.strip().splitlines()[-1]).items()}


@pytest.fixture(scope="module")
def ptx(compiled) -> dict[tuple[int, str], str]:
    return {(arch, name): variant["ptx"] for arch, found in compiled.items() for name, variant in found.items()}


@pytest.fixture(scope="module")
def usages(compiled) -> dict[tuple[int, str], object]:
    """(arch, variant) -> the kernel's Usage (tests/test_cuda_resources.py) from ptxas's report."""
    found = {}
    for arch, variants in compiled.items():
        for name, variant in variants.items():
            if "Compiling entry function" not in variant["ptxas"]:
                pytest.skip(f"this triton does not report ptxas's -v log (TRITON_DUMP_PTXAS_LOG): {name} sm_{arch}")
            kernels = [u for u in parse_ptxas(variant["ptxas"]) if u.entry]
            assert len(kernels) == 1, (arch, name, variant["ptxas"])
            kernels[0].name = name
            kernels[0].smem = variant["shared"]
            found[arch, name] = kernels[0]
    return found


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    assert sorted(compiled) == list(ARCHS)
    for arch, found in compiled.items():
        assert tuple(found) == VARIANTS, (arch, list(found))
        assert all(".entry" in variant["ptx"] for variant in found.values())


@pytest.mark.slow
def test_aligned_loops_use_16_byte_vector_accesses(ptx):
    for (arch, name), text in ptx.items():
        assert "ld.global.v4.b32" in text, f"sm_{arch} {name}: no 16-byte loads of float32/float16/bfloat16"
        assert "ld.global.v2.b64" in text, f"sm_{arch} {name}: no 16-byte loads of float64"
    for arch in ARCHS:
        for name in ("scale", "clamp"):
            text = ptx[arch, name]
            assert "st.global.v4.b32" in text and "st.global.v2.b64" in text, (arch, name)


@pytest.mark.slow
def test_norm_ticket_is_an_acquire_release_atomic_and_there_are_no_float_atomics(ptx):
    for (arch, name), text in ptx.items():
        atomics = [line.strip() for line in text.splitlines() if "atom." in line]
        if name.startswith("norm"):
            assert atomics and all(".acq_rel" in a and ".u32" in a for a in atomics), (arch, name, atomics)
        else:
            assert atomics == [], (arch, name, atomics)


@pytest.mark.slow
def test_registers_per_thread_are_reported_and_fit_the_block(usages, request):
    table = _table(list(usages.values()))
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nptxas -v of Triton's cubin builds (registers per thread):\n{table}")
    request.node.user_properties.append(("ptxas", table))
    assert set(usages) == {(arch, name) for arch in ARCHS for name in VARIANTS}
    over = {key: u.registers for key, u in usages.items() if u.registers is None or u.registers > MAX_REGISTERS}
    assert not over, over


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: f"sm_{arch}")
@pytest.mark.parametrize("name", VARIANTS)
def test_no_register_spills_and_no_local_memory(compiled, usages, arch, name):
    u = usages[arch, name]
    spilled = (u.spill_stores or 0) + (u.spill_loads or 0)
    lmem = sum(int(n) for n in re.findall(r"(\d+) bytes lmem", compiled[arch][name]["ptxas"]))
    report = (
        f"sm_{arch} {name}: {u.registers} registers, {u.stack} bytes stack frame, {u.spill_stores} bytes spill"
        f" stores, {u.spill_loads} bytes spill loads, {lmem} bytes lmem"
    )
    if u.stack is None:
        pytest.fail(f"no stack frame / spill line in ptxas's report: {report}")
    if (u.stack, spilled, lmem) == (0, 0, 0):
        return
    known = KNOWN_SPILLS.get((arch, name))
    if known is not None and spilled <= known and lmem == 0:
        pytest.xfail(f"known spill, to be removed from the kernel: {report}")
    pytest.fail(f"local-memory use in a Triton kernel: {report}")
