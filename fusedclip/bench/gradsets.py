"""A gradient set on the device: a pristine copy and several working copies to rotate through.

Rotation keeps small sets from being measured out of cache: with ``copies`` working copies whose
total exceeds the last-level cache, each copy has been evicted by the time it is used again. A
clipped call scales its grads in place, so after each clipped call the copy is restored from the
pristine grads (outside the timed region): every call sees the same data, and every clipped call
really clips (a set already clipped once would have a norm at the threshold, and the next call's
coefficient would round to 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .suites import Shape

#: the grads are drawn so that their total norm is about this (realistic, and far from fp16's range)
TARGET_NORM = 100.0
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
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        elements = sum(math.prod(shape) for shape in shapes)
        sigma = TARGET_NORM / math.sqrt(max(elements, 1))
        self.pristine: list[Tensor] = []
        for shape, dtype in zip(shapes, dtypes):
            values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            self.pristine.append(values.mul_(sigma).to(dtype))
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
