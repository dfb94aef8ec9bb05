"""The numbers Python and the kernels agree on: dtype codes and norm kinds.

The C++ and CUDA kernels read the same values from ``csrc/fusedclip.h`` (``enum DType``, ``enum
NormKind``), and the Triton kernels import them from here; ``tests/test_codes.py`` checks that the
header and this module agree.
"""

from __future__ import annotations

import enum

import torch


class DtypeCode(enum.IntEnum):
    """How the kernels' tables name a tensor's dtype (``csrc/fusedclip.h``: ``enum DType``)."""

    FLOAT32 = 0
    FLOAT16 = 1
    BFLOAT16 = 2
    FLOAT64 = 3


class NormKind(enum.IntEnum):
    """What a kernel accumulates for one norm order (``csrc/fusedclip.h``: ``enum NormKind``)."""

    SUM_POW = 0  # finite p != 0: sum of |x|^p
    MAX = 1  # p = inf: max |x|
    MIN = 2  # p = -inf: min |x|
    COUNT = 3  # p = 0: number of tensors with a non-zero element


#: the dtypes the kernels read, and their codes
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: DtypeCode.FLOAT32,
    torch.float16: DtypeCode.FLOAT16,
    torch.bfloat16: DtypeCode.BFLOAT16,
    torch.float64: DtypeCode.FLOAT64,
}
