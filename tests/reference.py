"""The fp64 oracle and the comparison rule shared by the tests.

The rule (DESIGN section 4): the float64 computation of torch's formula is the ideal; torch's own
distance from it is the allowance for fusedclip's result, plus one unit in the last place of the
result's dtype (fusedclip rounds once from a more accurate value, so it may land one ulp the other
way where torch happens to be exact). A result farther than that fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def _exact_square_terms(x: Tensor) -> list[float]:
    """Float64 values whose exact sum is the exact sum of ``x * x`` (Dekker's product, no FMA needed)."""
    split = x * 134217729.0  # 2**27 + 1
    high = split - (split - x)
    low = x - high
    square = x * x
    error = ((high * high - square) + 2.0 * high * low) + low * low
    return square.tolist() + error.tolist()


def _accurate_sum_norm(wide: Sequence[Tensor], p: float) -> Tensor | None:
    """The 1- or 2-norm of real float64 tensors with the sum rounded once (``math.fsum`` of exact terms).

    For float64 grads, float64 arithmetic is not more accurate than the data: a plain float64
    "ideal" would be off by an ulp or two and would reward whoever sums in the same order.
    """
    terms: list[float] = []
    for t in wide:
        flat = t.reshape(-1)
        terms += flat.abs().tolist() if p == 1.0 else _exact_square_terms(flat)
    try:
        total = math.fsum(terms)
    except (OverflowError, ValueError):  # squares beyond float64: use the plain computation
        return None
    if not math.isfinite(total):
        return None
    return torch.tensor(total if p == 1.0 else math.sqrt(total), dtype=torch.float64)


def ideal_total_norm(tensors: Sequence[Tensor], p: float) -> Tensor:
    """torch's "norm of per-tensor norms" in float64 (zero-size tensors contribute the identity).

    For p = 1 and 2 over real finite values the sum is exact before its one rounding.
    """
    wide = [t.detach().cpu().to(torch.complex128 if t.is_complex() else torch.float64) for t in tensors]
    wide = [t for t in wide if t.numel() or not (p < 0)]
    if not wide:
        return torch.tensor(0.0, dtype=torch.float64)
    if p in (1.0, 2.0) and not any(t.is_complex() for t in wide) and all(bool(torch.isfinite(t).all()) for t in wide):
        accurate = _accurate_sum_norm(wide, p)
        if accurate is not None:
            return accurate
    per_tensor = [torch.linalg.vector_norm(t, p) if t.numel() else torch.tensor(0.0, dtype=torch.float64) for t in wide]
    return torch.linalg.vector_norm(torch.stack(per_tensor), p)


def ideal_coef(total: Tensor, max_norm: float) -> Tensor:
    return torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)


def ulp(ideal: Tensor, dtype: torch.dtype) -> Tensor:
    """Spacing of ``dtype`` values around each element of ``ideal`` (float64)."""
    info = torch.finfo(dtype)
    magnitude = ideal.abs().clamp(min=info.tiny)
    magnitude = torch.where(torch.isfinite(magnitude), magnitude, torch.full_like(magnitude, info.max))
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def assert_no_worse_than_torch(
    actual: Tensor, theirs: Tensor, ideal: Tensor, *, what: str = "result", slack_ulps: float = 1.0
) -> None:
    """Fail unless ``actual`` is as close to ``ideal`` as torch's ``theirs`` (+ ``slack_ulps`` ulp).

    Non-finite ideals must be matched exactly (NaN where the ideal is NaN, the same infinity).
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
    allowed = torch.maximum(err_torch, ulp(i, actual.dtype)) + slack_ulps * ulp(i, actual.dtype)
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


def total_slack(dtype: torch.dtype) -> float:
    """Summation-order slack for a total norm: fp64 totals are not exact in the fp64 oracle either."""
    return 4.0 if dtype == torch.float64 else 1.0


def check_clip_against_torch(
    ours_params: Sequence[Tensor],
    torch_params: Sequence[Tensor],
    original_grads: Sequence[Tensor],
    ours_total: Tensor,
    torch_total: Tensor,
    max_norm: float,
    p: float,
) -> None:
    """Full check of one clip_grad_norm_ call: norm dtype/device/value and every element of every grad."""
    assert ours_total.dtype == torch_total.dtype, f"norm dtype {ours_total.dtype} != torch's {torch_total.dtype}"
    assert ours_total.device == torch_total.device
    assert ours_total.dim() == 0
    ideal = ideal_total_norm(original_grads, p)
    assert_no_worse_than_torch(
        ours_total, torch_total, ideal.to(torch.float64), what="total norm", slack_ulps=total_slack(ours_total.dtype)
    )
    coef = ideal_coef(ideal, max_norm)
    ours_grads, torch_grads = grads(ours_params), grads(torch_params)
    assert len(ours_grads) == len(torch_grads) == len(original_grads)
    for k, (mine, theirs, before) in enumerate(zip(ours_grads, torch_grads, original_grads)):
        assert mine.dtype == before.dtype and mine.shape == before.shape
        ideal_grad = before.detach().cpu().to(torch.float64) * coef
        assert_no_worse_than_torch(mine, theirs, ideal_grad, what=f"grad {k} ({before.dtype})")


def finite_p(p: float) -> bool:
    return math.isfinite(p)
