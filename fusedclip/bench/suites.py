"""The gradient sets the benchmark measures, defined once, and the dtypes it measures them in.

Every set is the list of gradient shapes of a real model (or of a deliberately extreme case).
A set too large for the run's byte budget is scaled down to a *variant* that keeps every tensor's
real shape: transformer sets drop whole layers (and, when even one layer plus the embeddings does
not fit, the embeddings); the huge tensor halves its length. The variant's ``scale`` says what was
kept, and the report prints it next to every number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Variant:
    """A set's shapes at one scale ("full", or what was kept of it)."""

    shapes: tuple[Shape, ...]
    scale: str

    @cached_property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def elements(self) -> int:
        return sum(self.numels)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


@dataclass(frozen=True)
class Suite:
    """A named gradient set and the ways it may be scaled down, largest (the full set) first."""

    name: str
    title: str
    variants: Callable[[], list[Variant]]
    short: str = ""  # a few words for headlines ("GPT-2 small"); the name when empty

    @cached_property
    def _variants(self) -> list[Variant]:
        return self.variants()

    def full(self) -> Variant:
        return self._variants[0]

    def fit(self, budget_bytes: int | None, dtype: DtypeSpec) -> Variant:
        """The largest variant whose grads take at most ``budget_bytes`` in ``dtype`` (the smallest
        variant when none does; the whole set when there is no budget). Variants the dtype cannot
        apply to (one tensor cannot mix dtypes) are passed over while another one remains."""
        candidates = [v for v in self._variants if dtype.dtypes_for(v.shapes) is not None] or self._variants
        if budget_bytes is None:
            return candidates[0]
        for variant in candidates:
            if dtype.nbytes(variant) <= budget_bytes:
                return variant
        return candidates[-1]


# --------------------------------------------------------------------------------------------
# dtypes


@dataclass(frozen=True)
class DtypeSpec:
    """How a set's grads are typed: one dtype for all, or bf16 matrices with fp32 vectors."""

    name: str
    label: str
    single: torch.dtype | None  # None: the bf16 + fp32 mix

    def dtypes_for(self, shapes: Sequence[Shape]) -> list[torch.dtype] | None:
        """The dtype of each grad; None when the set cannot be typed this way (one tensor cannot mix)."""
        if self.single is not None:
            return [self.single] * len(shapes)
        if len(shapes) < 2:
            return None
        # Mixed precision keeps matrices in bf16 and vectors (norms, biases) in fp32; a set whose
        # tensors all have the same rank alternates instead, so that both dtypes are present.
        ranks = {len(shape) >= 2 for shape in shapes}
        if len(ranks) == 2:
            return [torch.bfloat16 if len(shape) >= 2 else torch.float32 for shape in shapes]
        return [torch.bfloat16 if i % 2 == 0 else torch.float32 for i in range(len(shapes))]

    def nbytes(self, variant: Variant) -> int:
        """Bytes of all grads of ``variant`` in this dtype (N of the byte model)."""
        dtypes = self.dtypes_for(variant.shapes)
        if dtypes is None:  # not applicable; size it as bf16 so fitting still works
            dtypes = [torch.bfloat16] * variant.tensors
        return sum(numel * dtype.itemsize for numel, dtype in zip(variant.numels, dtypes))


DTYPES: dict[str, DtypeSpec] = {
    spec.name: spec
    for spec in (
        DtypeSpec("fp32", "float32", torch.float32),
        DtypeSpec("bf16", "bfloat16", torch.bfloat16),
        DtypeSpec("fp16", "float16", torch.float16),
        DtypeSpec("mix", "bf16 matrices + fp32 vectors", None),
    )
}
#: other spellings accepted by --dtype
DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "bf16+fp32": "mix",
    "mixed": "mix",
}


# --------------------------------------------------------------------------------------------
# shape sets


def _layered(
    embeddings: list[Shape], layer: list[Shape], layers: int, tail: list[Shape], *, drop_embeddings_first: bool = False
) -> Callable[[], list[Variant]]:
    """Variants of a stack of identical layers, largest first: the whole set, then fewer layers
    with the embeddings, then fewer layers without them (for sets whose embeddings alone exceed the
    budget), then the first tensors of one layer (for sets whose layer alone exceeds it).
    ``drop_embeddings_first`` drops the embeddings before any layer instead, for sets whose point
    is their number of tensors."""

    def variants() -> list[Variant]:
        order = [(True, layers)]
        if drop_embeddings_first:
            order += [(False, kept) for kept in range(layers, 0, -1)]
        else:
            order += [(True, kept) for kept in range(layers - 1, 0, -1)]
            order += [(False, kept) for kept in range(layers, 0, -1)]
        found = []
        for with_embeddings, kept in order:
            shapes = layer * kept
            if with_embeddings:
                shapes = embeddings + shapes + tail
            scale = f"{kept}/{layers} layers" + ("" if with_embeddings else ", no embeddings")
            if with_embeddings and kept == layers:
                scale = "full"
            found.append(Variant(tuple(shapes), scale))
        for kept in range(len(layer) - 1, 0, -1):
            scale = f"first {kept}/{len(layer)} tensors of 1/{layers} layers, no embeddings"
            found.append(Variant(tuple(layer[:kept]), scale))
        return found

    return variants


def _gpt2(d: int, layers: int) -> Callable[[], list[Variant]]:
    vocab, context = 50257, 1024
    # Hugging Face GPT-2 layout: Conv1D weights are (in, out); the LM head is tied to wte.
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return _layered([(vocab, d), (context, d)], block, layers, [(d,), (d,)])


def _llama2_7b() -> Callable[[], list[Variant]]:
    d, ffn, vocab, layers = 4096, 11008, 32000, 32
    block = [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return _layered([(vocab, d)], block, layers, [(d,), (vocab, d)])


def _moe() -> Callable[[], list[Variant]]:
    # A fine-grained mixture of experts: many medium tensors (64 experts of 3 matrices per layer).
    d, expert_ffn, experts, vocab, layers = 512, 256, 64, 32000, 10
    block = [(d, d)] * 4 + [(experts, d)] + [(expert_ffn, d), (d, expert_ffn), (expert_ffn, d)] * experts + [(d,), (d,)]
    return _layered([(vocab, d)], block, layers, [(d,), (vocab, d)], drop_embeddings_first=True)


def _resnet50() -> Callable[[], list[Variant]]:
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(4 * planes, planes, 1, 1), (4 * planes,), (4 * planes,)]
            if block == 0:  # the projection shortcut
                shapes += [(4 * planes, inplanes, 1, 1), (4 * planes,), (4 * planes,)]
            inplanes = 4 * planes
    shapes += [(1000, 2048), (1000,)]
    return lambda: [Variant(tuple(shapes), "full")]


def _small_tensors(count: int = 10_000) -> Callable[[], list[Variant]]:
    # Bias- and norm-sized vectors of 64 .. 2048 elements in a fixed, irregular order.
    shapes = tuple((64 * (1 + (i * 7919) % 32),) for i in range(count))
    return lambda: [Variant(shapes, "full")]


def _huge(log2_elements: int = 31, log2_smallest: int = 20) -> Callable[[], list[Variant]]:
    # 2**31 elements: one tensor larger than a 32-bit index can address.
    def variants() -> list[Variant]:
        found = []
        for log2 in range(log2_elements, log2_smallest - 1, -1):
            shift = log2_elements - log2
            scale = "full" if shift == 0 else f"1/{1 << shift} (2^{log2} elements)"
            found.append(Variant(((1 << log2,),), scale))
        return found

    return variants


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("gpt2-small", "GPT-2 small (124M), Hugging Face layout, tied LM head", _gpt2(768, 12), "GPT-2 small"),
        Suite(
            "gpt2-medium", "GPT-2 medium (355M), Hugging Face layout, tied LM head", _gpt2(1024, 24), "GPT-2 medium"
        ),
        Suite("llama2-7b", "Llama-2-7B-shaped (6.7B): 32 layers, d=4096, FFN 11008", _llama2_7b(), "Llama-2-7B"),
        Suite("resnet50", "ResNet-50 (25.6M), torchvision layout", _resnet50(), "ResNet-50"),
        Suite(
            "moe", "MoE-like, ~2000 tensors: 10 layers x 64 experts (d=512, expert FFN 256)", _moe(), "an MoE-like set"
        ),
        Suite("small-10k", "10000 small vectors of 64..2048 elements", _small_tensors(), "10000 small tensors"),
        Suite("huge", "one huge tensor of 2^31 elements", _huge(), "one 2^31-element tensor"),
    )
}
