"""Backend choice: explicit argument, environment variable, automatic fallback."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import HAS_CUDA

import fusedclip
from fusedclip import backends, engine


def test_available_backends_lists_every_slot_with_true_or_a_reason():
    available = fusedclip.available_backends()
    assert list(available) == ["cuda", "triton", "cpu", "torch"]
    assert available["torch"] is True
    for name, value in available.items():
        assert value is True or (isinstance(value, str) and value), name


def _chosen(grads, backend=None):
    return engine.prepare(grads, backends.requested_backend(backend)).backend_names


def test_explicit_torch_backend_is_used():
    assert _chosen([torch.randn(3)], "torch") == ["torch"]


def test_environment_variable_chooses_when_no_argument(monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "torch")
    assert _chosen([torch.randn(3)]) == ["torch"]
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "auto")
    assert _chosen([torch.randn(3)]) == [_auto_cpu()]


def _auto_cpu():
    return "cpu" if fusedclip.available_backends()["cpu"] is True else "torch"


def test_automatic_choice_on_cpu_never_raises():
    assert _chosen([torch.randn(3)]) == [_auto_cpu()]
    # complex grads are not for the kernels: automatic choice falls back to torch
    assert _chosen([torch.randn(3, dtype=torch.complex64)]) == ["torch"]


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_explicit_unavailable_backend_raises_with_the_reason():
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on these cpu gradients"):
        fusedclip.clip_grad_norm_([param], 1.0, backend="cuda")
    assert torch.equal(param.grad, torch.ones(2))


def test_explicit_kernel_backend_refuses_complex_grads():
    real = torch.nn.Parameter(torch.ones(3))
    real.grad = torch.full((3,), 5.0)  # listed first: a refusal after scaling it would show
    param = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    param.grad = torch.ones(2, dtype=torch.complex64)
    params = [real, param]
    before = [(p.detach().clone(), p.grad.clone()) for p in params]
    for name in ("cpu", "triton"):
        if backends._reason(name, torch.device("cpu"), None) is None:
            with pytest.raises(RuntimeError, match="complex64"):
                fusedclip.clip_grad_norm_(params, 1.0, backend=name)
            for p, (data, grad) in zip(params, before):  # no grad modified, bit for bit
                assert torch.equal(p.detach().view(torch.uint8), data.view(torch.uint8))
                assert torch.equal(p.grad.view(torch.uint8), grad.view(torch.uint8))


def test_complex_grads_follow_torch_through_automatic_choice():
    params = [torch.nn.Parameter(torch.zeros(6, dtype=torch.complex64)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(6, dtype=torch.complex64)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for t, p in zip(theirs, params):
        t.grad = p.grad.clone()
    for norm_type in (2.0, 1.0, 3.0, float("inf")):
        ours = fusedclip.clip_grad_norm_(params, 0.5, norm_type)
        ref = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
        torch.testing.assert_close(ours, ref)
        for a, b in zip(params, theirs):
            torch.testing.assert_close(a.grad, b.grad)


def test_get_backend_unknown_name():
    with pytest.raises(ValueError, match="choose one of cuda, triton, cpu, torch"):
        backends.get_backend("tpu")


# -- available_backends(device) -------------------------------------------------------------------


def _grads_on(device: str) -> list[torch.nn.Parameter]:
    param = torch.nn.Parameter(torch.zeros(5, device=device))
    param.grad = torch.arange(5.0, device=device)
    return [param]


def test_available_backends_per_device_says_what_an_explicit_backend_does_on_cpu():
    available = fusedclip.available_backends("cpu")
    assert list(available) == list(backends.BACKEND_NAMES)
    assert available == fusedclip.available_backends(torch.device("cpu"))
    for name, value in available.items():
        params = _grads_on("cpu")
        if value is True:
            fusedclip.clip_grad_norm_(params, 1.0, backend=name)  # runs
        else:
            assert isinstance(value, str) and value
            with pytest.raises(RuntimeError) as raised:
                fusedclip.clip_grad_norm_(params, 1.0, backend=name)
            assert value in str(raised.value)
            assert torch.equal(params[0].grad, torch.arange(5.0))


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_available_backends_on_a_cuda_device_without_one_gives_a_reason_for_every_backend():
    for device in ("cuda", "cuda:1", torch.device("cuda", 0), 0):
        available = fusedclip.available_backends(device)
        assert all(isinstance(v, str) and "CUDA" in v for v in available.values()), available


def test_available_backends_without_a_device_means_some_device_of_this_process():
    devices = ["cpu"] + (["cuda"] if HAS_CUDA else [])
    per_device = [fusedclip.available_backends(d) for d in devices]
    overall = fusedclip.available_backends()
    assert list(overall) == list(backends.BACKEND_NAMES)
    for name, value in overall.items():
        assert (value is True) == any(found[name] is True for found in per_device), name
    if not HAS_CUDA:
        assert overall == per_device[0]


def test_available_backends_rejects_what_is_not_a_device():
    with pytest.raises(ValueError, match="not a device"):
        fusedclip.available_backends("tpu-ish")
    with pytest.raises(TypeError, match="device must be"):
        fusedclip.available_backends(1.5)


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_triton_is_not_reported_available_on_a_cpu_machine_without_the_interpreter():
    """Without TRITON_INTERPRET, Triton cannot run CPU tensors: no form of available_backends says it can."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch, fusedclip
        for found in (fusedclip.available_backends(), fusedclip.available_backends("cpu")):
            assert isinstance(found["triton"], str), found
        param = torch.nn.Parameter(torch.zeros(2)); param.grad = torch.ones(2)
        try:
            fusedclip.clip_grad_norm_([param], 1.0, backend="triton")
        except RuntimeError as error:
            assert fusedclip.available_backends("cpu")["triton"] in str(error)
        else:
            raise AssertionError("backend='triton' ran on CPU tensors without the interpreter")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_a_backend_module_that_fails_to_import_is_unavailable_with_the_reason(monkeypatch):
    """A missing optional dependency: the backend is unavailable, and says why."""
    monkeypatch.setitem(backends._REGISTRY, "torch", ("fusedclip_no_such_module", "TorchBackend"))
    monkeypatch.setattr(backends, "_instances", {})
    reason = fusedclip.available_backends("cpu")["torch"]
    assert isinstance(reason, str) and "fusedclip_no_such_module" in reason


def test_a_bug_in_a_backend_module_surfaces(monkeypatch):
    """Anything but an import failure is a bug: it propagates instead of reading as unavailable."""
    import types

    broken = types.ModuleType("fusedclip_broken_backend")

    def explode():
        raise ZeroDivisionError("a bug in the backend")

    broken.TorchBackend = explode
    monkeypatch.setitem(sys.modules, "fusedclip_broken_backend", broken)
    monkeypatch.setitem(backends._REGISTRY, "torch", ("fusedclip_broken_backend", "TorchBackend"))
    monkeypatch.setattr(backends, "_instances", {})
    with pytest.raises(ZeroDivisionError, match="a bug in the backend"):
        fusedclip.available_backends("cpu")
