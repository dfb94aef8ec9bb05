"""The fp64 oracle and the comparison rule shared by the tests.

The rule (DESIGN section 4): torch's formula computed in extended precision (numpy's 80-bit
long double, so float64 results have an oracle finer than themselves) is the ideal; torch's own
distance from it is the allowance for fusedclip's result, plus one unit in the last place of the
result's dtype (fusedclip rounds once from a more accurate value, so it may land one ulp the other
way where torch happens to be exact). A result farther than that fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

CLIP_EPS = 1e-6

DTYPE_SETS: dict[str, tuple[torch.dtype, ...]] = {
    "fp32": (torch.float32,),
    "fp16": (torch.float16,),
    "bf16": (torch.bfloat16,),
    "fp64": (torch.float64,),
    "bf16+fp32": (torch.bfloat16, torch.float32),
    "all4": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}

SHAPES: tuple[tuple[int, ...], ...] = ((17,), (4, 9), (), (130,), (3, 5, 2), (0,), (1, 300))


def make_params(
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[torch.dtype],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    zero_tensor: bool = True,
    none_grad: bool = True,
) -> list[torch.nn.Parameter]:
    """Parameters with random grads of mixed magnitudes; dtypes cycle over the shapes.

    One grad is all zeros (so p = 0 and p = -inf see a zero tensor) and one parameter has no grad.
    """
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        param = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device=device, dtype=dtype))
        scale = 10.0 ** float(torch.randint(-2, 3, (), generator=gen))
        grad = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        if zero_tensor and i == 1:
            grad.zero_()
        param.grad = grad.to(device=device, dtype=dtype)
        params.append(param)
    if none_grad:
        params.insert(1, torch.nn.Parameter(torch.randn(3, generator=gen).to(device)))
    return params


def clone_params(params: Sequence[Tensor]) -> list[Tensor]:
    """Independent copies of parameters and of their grads."""
    clones = []
    for param in params:
        clone = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        clone.grad = None if param.grad is None else param.grad.clone()
        clones.append(clone)
    return clones


def grads(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _wide_abs(tensor: Tensor) -> np.ndarray:
    """|x| in 80-bit extended precision (|z| of complex values in float64 first)."""
    values = tensor.detach().cpu()
    values = values.to(torch.complex128).abs() if values.is_complex() else values.to(torch.float64).abs()
    return values.numpy().astype(np.longdouble).reshape(-1)


def _wide_norm(values: np.ndarray, p: float) -> np.longdouble:
    if p == math.inf:
        return values.max() if values.size else np.longdouble(0)
    if p == -math.inf:
        return values.min()
    if p == 0:
        return np.longdouble(np.count_nonzero(values))
    if values.size == 0:
        return np.longdouble(0)
    wide_p = np.longdouble(p)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return np.power(np.power(values, wide_p).sum(), np.longdouble(1) / wide_p)


def ideal_total_norm_wide(tensors: Sequence[Tensor], p: float) -> np.longdouble:
    """torch's "norm of per-tensor norms" in extended precision, so that even float64 results have
    an oracle more precise than themselves (zero-size tensors contribute the identity)."""
    per_tensor = [_wide_norm(_wide_abs(t), p) for t in tensors if t.numel() or not (p < 0)]
    if not per_tensor:
        return np.longdouble(0)
    return _wide_norm(np.array(per_tensor, dtype=np.longdouble), p)


def ideal_total_norm(tensors: Sequence[Tensor], p: float) -> Tensor:
    """The ideal total norm, rounded once to float64."""
    return torch.tensor(float(ideal_total_norm_wide(tensors, p)), dtype=torch.float64)


def ideal_coef_wide(total: np.longdouble, max_norm: float) -> np.longdouble:
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        coef = np.longdouble(max_norm) / (total + np.longdouble(CLIP_EPS))
    return coef if np.isnan(coef) or coef < 1 else np.longdouble(1)


def ideal_coef(total: Tensor, max_norm: float) -> Tensor:
    return torch.tensor(float(ideal_coef_wide(np.longdouble(float(total)), max_norm)), dtype=torch.float64)


def ideal_clipped(grad: Tensor, coef: np.longdouble) -> Tensor:
    """``grad * coef`` in extended precision, rounded once to float64."""
    values = grad.detach().cpu().to(torch.float64).numpy().astype(np.longdouble)
    with np.errstate(invalid="ignore", over="ignore"):
        return torch.from_numpy(np.asarray(values * coef, dtype=np.float64)).reshape(grad.shape)


def ulp(ideal: Tensor, dtype: torch.dtype) -> Tensor:
    """Spacing of ``dtype`` values around each element of ``ideal`` (float64)."""
    info = torch.finfo(dtype)
    magnitude = ideal.abs().clamp(min=info.tiny)
    magnitude = torch.where(torch.isfinite(magnitude), magnitude, torch.full_like(magnitude, info.max))
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def assert_no_worse_than_torch(
    actual: Tensor,
    theirs: Tensor,
    ideal: Tensor,
    *,
    what: str = "result",
    slack_ulps: float = 1.0,
    precision: torch.dtype | None = None,
    accumulation_ulps: float = 0.0,
) -> None:
    """Fail unless ``actual`` is as close to ``ideal`` as torch's ``theirs``, plus a slack.

    The slack is ``slack_ulps`` ulps of ``actual``'s dtype (rounding once may land one ulp the
    other way where torch happens to be exact) plus a relative error of ``accumulation_ulps`` times
    the machine epsilon of ``precision`` (the accumulation the design promises: float32, or float64
    for float64 grads, whose error grows with log2 of the element count). The accumulation term is
    relative, not in ulps of each value: a clipped grad inherits the total's relative error through
    the coefficient, and one ulp is between half and all of ``eps * |value|`` depending on where
    the value lies in its binade. Non-finite ideals must be matched exactly (NaN where the ideal is
    NaN, the same infinity).
    """
    assert actual.shape == ideal.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ideal.shape)}"
    a = actual.detach().cpu().to(torch.float64)
    t = theirs.detach().cpu().to(torch.float64)
    i = ideal.detach().cpu().to(torch.float64)
    nan_ideal = torch.isnan(i)
    bad_nan = nan_ideal != torch.isnan(a)
    inf_ideal = torch.isinf(i)
    bad_inf = inf_ideal & (a != i)
    finite = ~(nan_ideal | inf_ideal)
    err = (a - i).abs()
    err_torch = (t - i).abs()
    unit = ulp(i, actual.dtype)
    allowed = torch.maximum(err_torch, unit) + slack_ulps * unit
    if precision is not None and accumulation_ulps:
        allowed = allowed + accumulation_ulps * torch.finfo(precision).eps * i.abs()
    allowed = torch.where(torch.isnan(allowed), torch.zeros_like(allowed), allowed)
    too_far = finite & ~(err <= allowed)
    bad = bad_nan | bad_inf | too_far
    if bool(bad.any()):
        k = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values farther from the fp64 ideal than torch"
            f" (first at flat index {k}: ours {a.reshape(-1)[k].item()!r}, torch {t.reshape(-1)[k].item()!r},"
            f" ideal {i.reshape(-1)[k].item()!r}, allowed error {allowed.reshape(-1)[k].item():.3e})"
        )


def accumulation_precision(tensors: Sequence[Tensor]) -> torch.dtype:
    """The least precision the design promises for a set: float32, or float64 when all are float64."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def accumulation_ulps(tensors: Sequence[Tensor]) -> float:
    """Slack in ulps of the accumulation precision: log2(elements) for the summation order, plus 4
    for the roundings of the roots and powers (per-tensor norm, total, coefficient)."""
    count = sum(t.numel() for t in tensors)
    return 4.0 + math.log2(max(count, 1))


def rounds_per_tensor_norms_like_torch(tensors: Sequence[Tensor], p: float, backend: str | None) -> bool:
    """The one documented exception to float32 accumulation: the ``torch`` backend on CPUs takes
    torch's own bf16 per-tensor norms (rounded to bf16) for p = 1, 2."""
    return (
        backend == "torch"
        and p in (1.0, 2.0)
        and any(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    )


def check_clip_against_torch(
    ours_params: Sequence[Tensor],
    torch_params: Sequence[Tensor],
    original_grads: Sequence[Tensor],
    ours_total: Tensor,
    torch_total: Tensor,
    max_norm: float,
    p: float,
    backend: str | None = None,
) -> None:
    """Full check of one clip_grad_norm_ call: norm dtype/device/value and every element of every grad.

    ``backend`` names the backend that produced ``ours`` where its accuracy differs (see
    :func:`rounds_per_tensor_norms_like_torch`)."""
    assert ours_total.dtype == torch_total.dtype, f"norm dtype {ours_total.dtype} != torch's {torch_total.dtype}"
    assert ours_total.device == torch_total.device
    assert ours_total.dim() == 0
    ideal_wide = ideal_total_norm_wide(original_grads, p)
    ideal = torch.tensor(float(ideal_wide), dtype=torch.float64)
    precision, accumulation = accumulation_precision(original_grads), accumulation_ulps(original_grads)
    if rounds_per_tensor_norms_like_torch(original_grads, p, backend):
        precision, accumulation = torch.bfloat16, 1.0  # each bf16 per-tensor norm within half a bf16 ulp
    assert_no_worse_than_torch(
        ours_total,
        torch_total,
        ideal.to(torch.float64),
        what="total norm",
        precision=precision,
        accumulation_ulps=accumulation,
    )
    coef = ideal_coef_wide(ideal_wide, max_norm)
    ours_grads, torch_grads = grads(ours_params), grads(torch_params)
    assert len(ours_grads) == len(torch_grads) == len(original_grads)
    for k, (mine, theirs, before) in enumerate(zip(ours_grads, torch_grads, original_grads)):
        assert mine.dtype == before.dtype and mine.shape == before.shape
        ideal_grad = ideal_clipped(before, coef)
        assert_no_worse_than_torch(
            mine, theirs, ideal_grad, what=f"grad {k} ({before.dtype})", precision=precision, accumulation_ulps=accumulation
        )


def finite_p(p: float) -> bool:
    return math.isfinite(p)
