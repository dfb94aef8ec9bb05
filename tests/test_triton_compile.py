"""The Triton kernels compile for a real GPU target, with 16-byte vector loads, even without a GPU.

CI has no GPU and runs the kernels through the interpreter, which never compiles them. This test
compiles them ahead of time for sm_90 (Hopper) in a fresh process without ``TRITON_INTERPRET`` and
reads the PTX: the aligned full-block loops must use vectorised loads and stores, and the norm
kernel's ticket must be an acquire-release atomic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

_COMPILE = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedclip.backends import triton_kernels as kernels
    from fusedclip.backends.triton_backend import CUDA_CONFIG as config

    assert not kernels.interpreted()
    target = GPUTarget("cuda", 90, 32)
    tables = dict(addresses_ptr="*i64", numels_ptr="*i64", codes_ptr="*i64", first_chunk_ptr="*i64",
                  chunk_tensor_ptr="*i64", chunk_start_ptr="*i64", num_chunks="i32", num_tensors="i32",
                  chunk_elements="i32")

    def compile_kernel(kernel, types, constexprs, warps):
        signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                  options=dict(num_warps=warps))
        return compiled.asm["ptx"]

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

    variants = {
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
    print(json.dumps(variants))
    """
)


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    from triton.backends import backends as triton_backends

    if "nvidia" not in triton_backends:
        pytest.skip("this triton has no NVIDIA backend")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, cwd=root,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(ptx):
    assert len(ptx) == 9 and all(".entry" in text for text in ptx.values())


@pytest.mark.slow
def test_aligned_loops_use_16_byte_vector_accesses(ptx):
    for name, text in ptx.items():
        assert "ld.global.v4.b32" in text, f"{name}: no 16-byte loads of float32/float16/bfloat16"
        assert "ld.global.v2.b64" in text, f"{name}: no 16-byte loads of float64"
    for name in ("scale", "clamp"):
        assert "st.global.v4.b32" in ptx[name] and "st.global.v2.b64" in ptx[name], name


@pytest.mark.slow
def test_norm_ticket_is_an_acquire_release_atomic_and_there_are_no_float_atomics(ptx):
    for name, text in ptx.items():
        atomics = [line.strip() for line in text.splitlines() if "atom." in line]
        if name.startswith("norm"):
            assert atomics and all(".acq_rel" in a and ".u32" in a for a in atomics), (name, atomics)
        else:
            assert atomics == [], (name, atomics)
