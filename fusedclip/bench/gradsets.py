"""A gradient set on the device: a pristine copy and several working copies to rotate through.

Rotation keeps small sets from being measured out of cache: with ``copies`` working copies whose
total exceeds the last-level cache, each copy has been evicted by the time it is used again. A
clipped call scales its grads in place, so after each clipped call the copy is restored from the
pristine grads (outside the timed region): every call sees the same data, and every clipped call
really clips (a set already clipped once would have a norm at the threshold, and the next call's
coefficient would round to 1).

The clipped and unclipped cases use the same ``max_norm`` (so one torch.compile graph serves
both) and differ by the grads instead: the unclipped case has a total norm of ``BASE_NORM``, the
clipped case the same grads times ``CLIPPED_SCALE``, a power of two, so the scaling is exact in
every dtype and undone exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .measure import reference_norm
from .suites import Shape

#: total norm of the grads in the unclipped case (realistic, and far from fp16's limits)
BASE_NORM = 100.0
#: the clipped case's grads are the same grads times this (exact: a power of two)
CLIPPED_SCALE = 4.0
#: max_norm of both cases: above BASE_NORM, below BASE_NORM * CLIPPED_SCALE (coefficient ~0.5)
MAX_NORM = 200.0
#: working copies kept at most (fusedclip's plan cache holds 16 layouts; stay well inside it)
MAX_COPIES = 8


def copies_needed(grad_bytes: int, cache_bytes: int, memory_bytes: int) -> int:
    """Working copies so that together they span twice the cache, within memory (pristine included)."""
    if grad_bytes <= 0:
        return 1
    wanted = max(1, math.ceil(2 * cache_bytes / grad_bytes))
    fits = max(1, memory_bytes // grad_bytes - 1)  # the pristine copy takes one slot
    return max(1, min(wanted, fits, MAX_COPIES))


class GradSet:
    """``copies`` lists of parameters carrying identical random grads, and the pristine grads."""

    def __init__(
        self,
        shapes: Sequence[Shape],
        dtypes: Sequence[torch.dtype],
        device: torch.device,
        copies: int,
        seed: int = 0,
    ) -> None:
        if len(shapes) != len(dtypes):
            raise ValueError("one dtype per shape is needed")
        self.device = device
        self.scale = 1.0
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        numels = [math.prod(shape) for shape in shapes]
        # One draw for the whole set (fast for 10000 small tensors), normalised to BASE_NORM; the
        # pristine grads are pieces of it in their own dtypes.
        values = torch.randn(sum(numels), generator=generator, device=device, dtype=torch.float32)
        norm = reference_norm([values])  # in fp64 chunks: no fp64 copy of a huge set
        if norm > 0:
            values.mul_(BASE_NORM / norm)
        self.pristine: list[Tensor] = [
            piece.view(shape).to(dtype, copy=True) for piece, shape, dtype in zip(values.split(numels), shapes, dtypes)
        ]
        del values
        self.params: list[list[Tensor]] = [self._parameters() for _ in range(copies)]

    def _parameters(self) -> list[Tensor]:
        params = []
        for grad in self.pristine:
            # The parameter's values are never read: a zero-stride tensor of the right shape costs
            # one element instead of a second copy of the set.
            param = torch.nn.Parameter(
                torch.empty_strided(grad.shape, (0,) * grad.dim(), dtype=grad.dtype, device=grad.device),
                requires_grad=False,
            )
            param.grad = grad.clone()
            params.append(param)
        return params

    @property
    def copies(self) -> int:
        return len(self.params)

    def grads(self, copy: int) -> list[Tensor]:
        return [param.grad for param in self.params[copy]]

    def restore(self, copy: int) -> None:
        """Put the pristine values back into a working copy, in place (same storage)."""
        torch._foreach_copy_(self.grads(copy), self.pristine)

    def set_scale(self, scale: float) -> None:
        """Make the pristine grads (and every working copy) the base grads times ``scale``, a power
        of two, so that the change is exact and exactly undone."""
        if scale <= 0 or math.log2(scale) != int(math.log2(scale)):
            raise ValueError(f"scale must be a power of two, got {scale}")
        if scale == self.scale:
            return
        torch._foreach_mul_(self.pristine, scale / self.scale)
        self.scale = scale
        for copy in range(self.copies):
            self.restore(copy)
