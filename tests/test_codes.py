"""fusedclip/codes.py: Python, the C++/CUDA header and the Triton kernels use the same codes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fusedclip import codes, norm_type, plan

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "fusedclip.h"
TRITON_KERNELS = Path(__file__).resolve().parents[1] / "fusedclip" / "backends" / "triton_kernels.py"


def header_enum(name: str, text: str | None = None) -> dict[str, int]:
    """``enum <name> : int { kA = 0, kB = 1 }`` of the header as {"kA": 0, "kB": 1}."""
    text = HEADER.read_text() if text is None else text
    match = re.search(r"enum\s+" + name + r"\s*:\s*int\s*\{([^}]*)\}", text)
    assert match, f"enum {name} not found in {HEADER}"
    entries = [entry.split("=") for entry in match.group(1).split(",") if entry.strip()]
    return {key.strip(): int(value) for key, value in entries}


def _c_name(python_name: str) -> str:
    """FLOAT32 -> kFloat32, SUM_POW -> kSumPow, BFLOAT16 -> kBFloat16."""
    special = {"BFLOAT16": "kBFloat16"}
    return special.get(python_name, "k" + "".join(part.capitalize() for part in python_name.split("_")))


@pytest.mark.parametrize(("python_enum", "header_name"), [(codes.DtypeCode, "DType"), (codes.NormKind, "NormKind")])
def test_the_header_and_python_agree(python_enum, header_name):
    assert header_enum(header_name) == {_c_name(member.name): int(member) for member in python_enum}


def test_the_agreement_check_catches_a_drifted_header():
    """The planted bug: the header with two codes swapped."""
    drifted = HEADER.read_text().replace("kFloat16 = 1, kBFloat16 = 2", "kFloat16 = 2, kBFloat16 = 1")
    assert drifted != HEADER.read_text()
    assert header_enum("DType", drifted) != {_c_name(m.name): int(m) for m in codes.DtypeCode}


def test_every_module_uses_the_one_table():
    assert plan.DTYPE_CODES is codes.DTYPE_CODES
    assert norm_type.NormKind is codes.NormKind
    assert {dtype: int(code) for dtype, code in codes.DTYPE_CODES.items()} == {
        torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
    }  # fmt: skip
    itemsizes = [dtype.itemsize for dtype, _ in sorted(codes.DTYPE_CODES.items(), key=lambda item: item[1])]
    assert plan._ITEMSIZE_OF_CODE.tolist() == itemsizes


def test_the_triton_kernels_name_codes_instead_of_writing_numbers():
    source = TRITON_KERNELS.read_text()
    assert not re.findall(r"\bcode\s*==\s*\d", source), "a dtype code written as a number"
    assert not re.findall(r"\bKIND\s*==\s*\d", source), "a norm kind written as a number"
    kernels = pytest.importorskip("fusedclip.backends.triton_kernels", reason="triton is not installed")
    for member in codes.NormKind:
        assert getattr(kernels, member.name).value == int(member)
    for name, member in (("F32", codes.DtypeCode.FLOAT32), ("F16", codes.DtypeCode.FLOAT16),
                         ("BF16", codes.DtypeCode.BFLOAT16), ("F64", codes.DtypeCode.FLOAT64)):  # fmt: skip
        assert getattr(kernels, name).value == int(member)
