"""The Triton kernels of the ``triton`` backend: one norm launch, one scale launch, one clamp launch.

Every kernel walks the shared plan's chunk table (see :mod:`fusedclip.plan`) with a persistent grid:
program ``k`` takes chunks ``k, k + G, k + 2G, ...``. A chunk belongs to one tensor, so the kernel
branches once per chunk on the tensor's dtype code and turns the tensor's int64 address into a
typed pointer. Chunk starts are int64, so a tensor may hold more than 2**31 elements; offsets
inside a chunk fit in int32.

Vectorised loads need the compiler to know that a pointer is 16-byte aligned. Addresses come from
a table, so the kernels check the alignment of each chunk at run time and take a hinted path
(``tl.multiple_of``) only when it holds; misaligned views take an unhinted path.

The norm kernel follows the kernel contract in :mod:`fusedclip.backends.kernel_base`:

* each program folds its chunks, in order, into one block of lane accumulators (sums of ``|x|^p``
  in float64, max/min of ``|x|`` propagating NaN, counts of non-zero elements) and reduces that
  block once, into its partial;
* per-tensor results (``per_tensor`` output, and p = 0 which counts tensors) need every tensor's own
  value: a tensor with one chunk is finished by the program that reduced it; for a longer tensor
  each chunk value goes to a workspace slot, and the program that takes the tensor's last ticket
  (an acq_rel atomic counter) reduces the slots in chunk order and resets the ticket;
* the program that takes the last grid ticket reduces the program partials in program order,
  computes total and coefficient on the device and resets the ticket, so the next launch needs no
  memset. No floating-point atomics: results are bitwise reproducible for a given grid size.
"""

import triton
import triton.language as tl

from ..codes import DtypeCode, NormKind


@triton.jit
def _probe():
    pass


#: True when triton was imported with TRITON_INTERPRET=1: the kernels then run on CPU tensors
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)
# The interpreter converts bfloat16 by truncation (and float64 <-> bfloat16 not at all), so under it
# the kernels convert bfloat16 with integer operations that round to nearest even like the GPU does.
_EMULATE_BF16 = tl.constexpr(INTERPRETED)

# NormKind codes (fusedclip.norm_type.NormKind)
SUM_POW = tl.constexpr(int(NormKind.SUM_POW))
MAX = tl.constexpr(int(NormKind.MAX))
MIN = tl.constexpr(int(NormKind.MIN))
COUNT = tl.constexpr(int(NormKind.COUNT))
F32 = tl.constexpr(int(DtypeCode.FLOAT32))
F16 = tl.constexpr(int(DtypeCode.FLOAT16))
BF16 = tl.constexpr(int(DtypeCode.BFLOAT16))
F64 = tl.constexpr(int(DtypeCode.FLOAT64))
# P_MODE of SUM_POW: the exponents with an exact fast path
P_GENERAL = tl.constexpr(0)
P_ONE = tl.constexpr(1)
P_TWO = tl.constexpr(2)

_INF = tl.constexpr(float("inf"))
_EPS = tl.constexpr(1e-6)  # torch's epsilon in max_norm / (total + 1e-6)
_SMALLEST_NORMAL = tl.constexpr(2.2250738585072014e-308)
_FLOAT_MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)  # 2^-126
_FLOAT_MAX = tl.constexpr(3.4028234663852886e38)
_TWO_POW_64 = tl.constexpr(18446744073709551616.0)


# --------------------------------------------------------------------------------------------
# conversions and scalar helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _to_f32(x):
    """Any grad dtype but float64 -> float32 (exact)."""
    if x.dtype == tl.bfloat16 and _EMULATE_BF16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _from_f32(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE, rounding to nearest even."""
    if DTYPE == tl.bfloat16 and _EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _f64(bits):
    """A float64 passed as its int64 bit pattern (Python floats would reach the kernel as fp32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _nanmax(a, b):
    """max(a, b) that returns NaN when either is NaN."""
    return tl.where((b > a) | (b != b), b, a)


@triton.jit
def _nanmin(a, b):
    return tl.where((b < a) | (b != b), b, a)


@triton.jit
def _pow(x, y_hi, y_lo):
    """``x ** y`` in float64 for ``x >= 0`` (or inf/NaN) and a finite ``y = y_hi + y_lo != 0``.

    Written with exp2/log2 so that the interpreter (which has no libdevice) runs the same algorithm
    as the GPU. With ``x = m * 2**e`` (``1 <= m < 2``): ``x**y = 2**(e*y) * m**y``; ``e*y`` is split
    exactly into an integer and a fraction (``y_hi`` has at most 41 significant bits, so ``e*y_hi``
    is exact), which keeps the error at a few ulps for any magnitude of ``x``. For large ``|y|``
    (norm orders like 1e4 .. 1e308) ``y*log2(m)`` is itself large: its integer part moves to the
    exponent too, so ``exp2`` only ever sees a fraction; ``e*y_hi`` beyond float64's range (only for
    ``|y| > 1e305`` or so) means a result of 0 or inf, by the sign of ``e*y``.
    """
    tiny = x < _SMALLEST_NORMAL
    xs = tl.where(tiny, x * _TWO_POW_64, x)  # subnormals become normal
    bits = xs.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023 - tl.where(tiny, 64, 0)
    m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)
    ef = e.to(tl.float64)
    whole = ef * y_hi  # exact (or +-inf, see above)
    overflowed = tl.abs(whole) == _INF
    whole = tl.where(overflowed, 0.0, whole)
    n = tl.floor(whole)
    rest = ef * y_lo + (y_hi + y_lo) * tl.log2(m)
    rest_whole = tl.floor(rest)
    frac = (whole - n) + (rest - rest_whole)
    n = tl.minimum(tl.maximum(n + rest_whole, -2200.0), 2200.0)
    n = tl.where(overflowed, tl.where(ef * y_hi > 0, 2200.0, -2200.0), n)
    n1 = tl.floor(n * 0.5)
    result = tl.exp2(frac) * tl.exp2(n1) * tl.exp2(n - n1)
    positive = (y_hi + y_lo) > 0
    result = tl.where(x == 0, tl.where(positive, 0.0, _INF), result)
    result = tl.where(x == _INF, tl.where(positive, _INF, 0.0), result)
    return tl.where(x != x, x, result)


@triton.jit
def _scaled_root(acc, KIND: tl.constexpr, P_MODE: tl.constexpr, inv_p_hi, inv_p_lo, m):
    """``m`` times :func:`_root`; for tiny ``|p|`` the root alone can leave float64's range (3**1000)
    while the norm does not: there it is taken through logarithms (an error of ``|ln(norm)|`` ulps)."""
    root = _root(acc, KIND, P_MODE, inv_p_hi, inv_p_lo)
    if KIND == SUM_POW:
        lost = ((root == 0.0) | (root == _INF)) & (acc > 0.0) & (acc < _INF)
        safe_acc = tl.where(lost, acc, 1.0)
        via_logs = tl.exp2(tl.log2(safe_acc) * (inv_p_hi + inv_p_lo) + tl.log2(m))
        return tl.where(lost, via_logs, root * m)
    else:
        return root * m


@triton.jit
def _root(acc, KIND: tl.constexpr, P_MODE: tl.constexpr, inv_p_hi, inv_p_lo):
    """The norm from its accumulator (sum of |x|^p -> its 1/p power; others unchanged)."""
    if KIND == SUM_POW:
        if P_MODE == P_TWO:
            return tl.sqrt(acc)
        elif P_MODE == P_ONE:
            return acc
        else:
            return _pow(acc, inv_p_hi, inv_p_lo)
    else:
        return acc


@triton.jit
def _combine(a, b, KIND: tl.constexpr):
    """Combine two accumulators (scalars or blocks) of the same kind."""
    if KIND == MAX:
        return _nanmax(a, b)
    elif KIND == MIN:
        return _nanmin(a, b)
    else:
        return a + b


@triton.jit
def _reduce_block(acc, KIND: tl.constexpr):
    """A block of accumulators -> one float64 scalar (fixed tree order: deterministic)."""
    if KIND == MAX:
        nan_seen = tl.max((acc != acc).to(tl.int32), axis=0)
        top = tl.max(tl.where(acc != acc, 0.0, acc), axis=0)
        return tl.where(nan_seen > 0, _INF - _INF, top).to(tl.float64)
    elif KIND == MIN:
        nan_seen = tl.max((acc != acc).to(tl.int32), axis=0)
        bottom = tl.min(tl.where(acc != acc, _INF, acc), axis=0)
        return tl.where(nan_seen > 0, _INF - _INF, bottom).to(tl.float64)
    else:
        return tl.sum(acc, axis=0).to(tl.float64)


@triton.jit
def _identity_like(zeros, KIND: tl.constexpr):
    """The identity of ``KIND`` in the dtype of ``zeros`` (+inf for min, else zero)."""
    if KIND == MIN:
        return zeros + _INF
    else:
        return zeros


@triton.jit
def _widen(x):
    """Elements as float64 (exact). Half types go through float32: the interpreter converts
    bfloat16 only to float32."""
    if x.dtype == tl.float64:
        return x
    else:
        return _to_f32(x).to(tl.float64)


@triton.jit
def _term(x, KIND: tl.constexpr, P_MODE: tl.constexpr, p_hi, p_lo, m):
    """Each element's contribution to the accumulator (general p: ``(|x| / m)^p``, ``m`` the norm
    scale M' of the call, 1.0 without one)."""
    w = _widen(x)
    if KIND == COUNT:
        return (w != 0).to(tl.int32)  # NaN != 0: counted, as in torch
    else:
        if KIND == SUM_POW:
            if P_MODE == P_TWO:
                return w * w
            elif P_MODE == P_ONE:
                return tl.abs(w)
            else:
                return _pow(tl.abs(w) / m, p_hi, p_lo)
        else:
            return tl.abs(w)


# --------------------------------------------------------------------------------------------
# one chunk
# --------------------------------------------------------------------------------------------
@triton.jit
def _block_identity(KIND: tl.constexpr, BLOCK: tl.constexpr):
    """A block of accumulators holding the identity: int32 counts, float64 otherwise."""
    if KIND == COUNT:
        return tl.zeros([BLOCK], dtype=tl.int32)
    else:
        return _identity_like(tl.zeros([BLOCK], dtype=tl.float64), KIND)


@triton.jit
def _accumulate_span(ptr, start, n, acc, chunk_acc, p_hi, p_lo, m,
                     KIND: tl.constexpr, P_MODE: tl.constexpr, ALIGNED: tl.constexpr, PER_CHUNK: tl.constexpr,
                     BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """The ``n`` elements at ``ptr + start`` folded, lane by lane, into ``acc`` (the program's
    running accumulators) and, when PER_CHUNK, into ``chunk_acc`` too. Folding into ``acc`` the
    same way in both modes keeps the total bitwise the same with or without per-tensor outputs."""
    base = ptr + start
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    offs = tl.arange(0, BLOCK)
    n_full = (n // BLOCK) * BLOCK
    for i in tl.range(0, n_full, BLOCK, num_stages=STAGES):  # full blocks: no mask, so loads vectorise
        term = _term(tl.load(base + i + offs), KIND, P_MODE, p_hi, p_lo, m)
        acc = _combine(acc, term, KIND)
        if PER_CHUNK:
            chunk_acc = _combine(chunk_acc, term, KIND)
    in_tail = n_full + offs < n
    term = _term(tl.load(base + n_full + offs, mask=in_tail, other=0.0), KIND, P_MODE, p_hi, p_lo, m)
    term = tl.where(in_tail, term, _identity_like(tl.zeros_like(term), KIND))
    acc = _combine(acc, term, KIND)
    if PER_CHUNK:
        chunk_acc = _combine(chunk_acc, term, KIND)
    return acc, chunk_acc


@triton.jit
def _accumulate_typed(ptr, start, n, aligned, acc, chunk_acc, p_hi, p_lo, m, KIND: tl.constexpr,
                      P_MODE: tl.constexpr, PER_CHUNK: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    if aligned:
        acc, chunk_acc = _accumulate_span(ptr, start, n, acc, chunk_acc, p_hi, p_lo, m,
                                          KIND, P_MODE, True, PER_CHUNK, BLOCK, STAGES)
    else:
        acc, chunk_acc = _accumulate_span(ptr, start, n, acc, chunk_acc, p_hi, p_lo, m,
                                          KIND, P_MODE, False, PER_CHUNK, BLOCK, STAGES)
    return acc, chunk_acc


@triton.jit
def _accumulate_chunk(address, code, start, n, aligned, acc, chunk_acc, p_hi, p_lo, m, KIND: tl.constexpr,
                      P_MODE: tl.constexpr, PER_CHUNK: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """One chunk folded in: its int64 address becomes a pointer of the chunk's dtype."""
    if code == F32:
        acc, chunk_acc = _accumulate_typed(address.to(tl.pointer_type(tl.float32)), start, n, aligned, acc,
                                           chunk_acc, p_hi, p_lo, m, KIND, P_MODE, PER_CHUNK, BLOCK, STAGES)
    elif code == F16:
        acc, chunk_acc = _accumulate_typed(address.to(tl.pointer_type(tl.float16)), start, n, aligned, acc,
                                           chunk_acc, p_hi, p_lo, m, KIND, P_MODE, PER_CHUNK, BLOCK, STAGES)
    elif code == BF16:
        acc, chunk_acc = _accumulate_typed(address.to(tl.pointer_type(tl.bfloat16)), start, n, aligned, acc,
                                           chunk_acc, p_hi, p_lo, m, KIND, P_MODE, PER_CHUNK, BLOCK, STAGES)
    else:
        acc, chunk_acc = _accumulate_typed(address.to(tl.pointer_type(tl.float64)), start, n, aligned, acc,
                                           chunk_acc, p_hi, p_lo, m, KIND, P_MODE, PER_CHUNK, BLOCK, STAGES)
    return acc, chunk_acc


@triton.jit
def _load_chunk(c, addresses_ptr, numels_ptr, codes_ptr, chunk_tensor_ptr, chunk_start_ptr, chunk_elements):
    """(tensor index, address, start, element count, dtype code, 16-byte aligned?) of chunk ``c``."""
    t = tl.load(chunk_tensor_ptr + c)
    start = tl.load(chunk_start_ptr + c)
    address = tl.load(addresses_ptr + t)
    numel = tl.load(numels_ptr + t)
    code = tl.load(codes_ptr + t)
    n = tl.minimum(numel - start, chunk_elements).to(tl.int32)
    itemsize = tl.where(code == F32, 4, tl.where(code == F64, 8, 2)).to(tl.int64)
    aligned = ((address + start * itemsize) % 16) == 0
    return t, address, start, n, code, aligned


@triton.jit
def _reduce_values(ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Fixed-order reduction of ``n`` float64 accumulators written by other programs."""
    offs = tl.arange(0, BLOCK)
    acc = _identity_like(tl.zeros([BLOCK], dtype=tl.float64), KIND)
    identity = _identity_like(tl.zeros([BLOCK], dtype=tl.float64), KIND)
    for i in range(0, n, BLOCK):
        inside = i + offs < n
        # .cg: read through L2, where other programs' released stores are visible
        x = tl.load(ptr + i + offs, mask=inside, other=0.0, cache_modifier=".cg")
        acc = _combine(acc, tl.where(inside, x, identity), KIND)
    return _reduce_block(acc, KIND)


# --------------------------------------------------------------------------------------------
# the norm kernel
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["num_chunks", "num_tensors", "chunk_elements", "max_norm_bits",
                               "p_hi_bits", "p_lo_bits", "inv_p_hi_bits", "inv_p_lo_bits"])
def norm_kernel(
    addresses_ptr, numels_ptr, codes_ptr, first_chunk_ptr, chunk_tensor_ptr, chunk_start_ptr,
    num_chunks, num_tensors, chunk_elements,
    partials_ptr,  # float64 [G]: one accumulator per program
    chunk_values_ptr,  # float64 [C]: chunk accumulators of multi-chunk tensors (SEGMENTED)
    tensor_values_ptr,  # float64 [T]: each tensor's norm (SEGMENTED: per_tensor output or workspace)
    tensor_tickets_ptr,  # int32 [T]: finished chunks per tensor, reset by its last program
    ticket_ptr,  # int32 [1]: finished programs, reset by the last one
    total_ptr,  # 0-d, output dtype
    coef_ptr,  # 0-d float64 (HAS_COEF)
    acc_ptr,  # 0-d float64: the raw accumulator
    max_norm_ptr,  # 0-d tensor read when MAX_NORM_FROM_PTR
    max_norm_bits: tl.int64,
    grad_scale_ptr,  # 0-d tensor read when HAS_GRAD_SCALE
    norm_scale_ptr,  # 0-d float64 norm scale M of a general p, read when HAS_NORM_SCALE
    p_hi_bits: tl.int64, p_lo_bits: tl.int64, inv_p_hi_bits: tl.int64, inv_p_lo_bits: tl.int64,
    KIND: tl.constexpr, P_MODE: tl.constexpr,
    HAS_COEF: tl.constexpr, MAX_NORM_FROM_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_NORM_SCALE: tl.constexpr,
    SEGMENTED: tl.constexpr, ZERO_EMPTY_TENSORS: tl.constexpr,
    BLOCK: tl.constexpr, FINISH_BLOCK: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    p_hi = _f64(p_hi_bits)
    p_lo = _f64(p_lo_bits)
    inv_p_hi = _f64(inv_p_hi_bits)
    inv_p_lo = _f64(inv_p_lo_bits)
    # general p: sums of (|x| / M')^p with M' = M when 0 < M < inf, else 1 (see backends.base); every
    # norm formed from such a sum is M' times its 1/p power
    m = tl.sum(tl.full([1], 1.0, dtype=tl.float64), axis=0)
    if HAS_NORM_SCALE:
        loaded = tl.load(norm_scale_ptr).to(tl.float64)
        m = tl.where((loaded > 0.0) & (loaded < _INF), loaded, m)

    # One block of lane accumulators across all the program's chunks, reduced once at the end.
    acc = _block_identity(KIND, BLOCK)
    for c in range(pid, num_chunks, programs):
        t, address, start, n, code, aligned = _load_chunk(
            c, addresses_ptr, numels_ptr, codes_ptr, chunk_tensor_ptr, chunk_start_ptr, chunk_elements)
        if SEGMENTED:  # each chunk's own value too, for its tensor's result
            acc, chunk_acc = _accumulate_chunk(address, code, start, n, aligned, acc, _block_identity(KIND, BLOCK),
                                               p_hi, p_lo, m, KIND, P_MODE, True, BLOCK, STAGES)
            value = _reduce_block(chunk_acc, KIND)
            first = tl.load(first_chunk_ptr + t)
            count = tl.load(first_chunk_ptr + t + 1) - first
            if count == 1:
                tl.store(tensor_values_ptr + t, _scaled_root(value, KIND, P_MODE, inv_p_hi, inv_p_lo, m))
            else:
                tl.store(chunk_values_ptr + c, value)
                tl.debug_barrier()  # every thread's store happens before the release below
                done = tl.atomic_add(tensor_tickets_ptr + t, 1, sem="acq_rel")
                tl.debug_barrier()
                if done == count - 1:  # the tensor's last chunk: reduce its chunks in order
                    tensor_acc = _reduce_values(chunk_values_ptr + first, count, KIND, FINISH_BLOCK)
                    tl.store(tensor_values_ptr + t, _scaled_root(tensor_acc, KIND, P_MODE, inv_p_hi, inv_p_lo, m))
                    tl.store(tensor_tickets_ptr + t, 0)
        else:
            acc, _ = _accumulate_chunk(address, code, start, n, aligned, acc, acc,
                                       p_hi, p_lo, m, KIND, P_MODE, False, BLOCK, STAGES)
    part = _reduce_block(acc, KIND)

    tl.store(partials_ptr + pid, part)
    tl.debug_barrier()
    finished = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    tl.debug_barrier()
    if finished == programs - 1:
        _finish(partials_ptr, programs, numels_ptr, tensor_values_ptr, num_tensors,
                total_ptr, coef_ptr, acc_ptr, max_norm_ptr, max_norm_bits, grad_scale_ptr, inv_p_hi, inv_p_lo, m,
                KIND, P_MODE, HAS_COEF, MAX_NORM_FROM_PTR, HAS_GRAD_SCALE, SEGMENTED, ZERO_EMPTY_TENSORS,
                FINISH_BLOCK)
        tl.store(ticket_ptr, 0)


@triton.jit
def _store_rounded(ptr, x):
    """Store float64 ``x`` rounded once (to nearest even) to the pointer's dtype."""
    if ptr.dtype.element_ty == tl.bfloat16:
        # Round to odd into float32, then to nearest bfloat16: the same as one rounding of x (float32
        # keeps more than twice bfloat16's bits). The interpreter cannot convert float64 to bfloat16.
        narrow = x.to(tl.float32)
        back = narrow.to(tl.float64)
        inexact = back != x
        bits = narrow.to(tl.int32, bitcast=True)
        bits = tl.where(inexact & (tl.abs(back) > tl.abs(x)), bits - 1, bits)  # toward zero
        bits = tl.where(inexact, bits | 1, bits)
        tl.store(ptr, _from_f32(bits.to(tl.float32, bitcast=True), tl.bfloat16))
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty))


@triton.jit
def _finish(partials_ptr, programs, numels_ptr, tensor_values_ptr, num_tensors,
            total_ptr, coef_ptr, acc_ptr, max_norm_ptr, max_norm_bits, grad_scale_ptr, inv_p_hi, inv_p_lo, m,
            KIND: tl.constexpr, P_MODE: tl.constexpr, HAS_COEF: tl.constexpr, MAX_NORM_FROM_PTR: tl.constexpr,
            HAS_GRAD_SCALE: tl.constexpr, SEGMENTED: tl.constexpr, ZERO_EMPTY_TENSORS: tl.constexpr,
            FINISH_BLOCK: tl.constexpr):
    """Run by the last program: accumulator, total norm and clip coefficient, on the device."""
    acc = _reduce_values(partials_ptr, programs, KIND, FINISH_BLOCK)
    if SEGMENTED:
        offs = tl.arange(0, FINISH_BLOCK)
        nonzero_tensors = tl.zeros([FINISH_BLOCK], dtype=tl.int32)
        for i in range(0, num_tensors, FINISH_BLOCK):
            inside = i + offs < num_tensors
            numel = tl.load(numels_ptr + i + offs, mask=inside, other=0)
            if ZERO_EMPTY_TENSORS:  # zero-size tensors have no chunk: their norm is 0
                tl.store(tensor_values_ptr + i + offs, tl.zeros([FINISH_BLOCK], dtype=tl.float64),
                         mask=inside & (numel == 0))
            if KIND == COUNT:
                norm = tl.load(tensor_values_ptr + i + offs, mask=inside & (numel > 0), other=0.0,
                               cache_modifier=".cg")
                nonzero_tensors += (norm != 0).to(tl.int32)
        if KIND == COUNT:
            acc = tl.sum(nonzero_tensors, axis=0).to(tl.float64)
    total = _scaled_root(acc, KIND, P_MODE, inv_p_hi, inv_p_lo, m)
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float64)
        if KIND != COUNT:
            total = total * tl.abs(scale)
    tl.store(acc_ptr, acc)
    _store_rounded(total_ptr, total)
    if HAS_COEF:
        if MAX_NORM_FROM_PTR:
            max_norm = tl.load(max_norm_ptr).to(tl.float64)
        else:
            max_norm = _f64(max_norm_bits)
        eps = tl.full([1], _EPS, dtype=tl.float64)
        ratio = max_norm / (total + tl.sum(eps, axis=0))
        coef = tl.where(ratio > 1.0, 1.0, ratio)  # NaN stays NaN
        if HAS_GRAD_SCALE:
            coef = coef * scale
        tl.store(coef_ptr, coef.to(tl.float64))


# --------------------------------------------------------------------------------------------
# the scale and clamp kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _scaled(x, factor):
    """``round(x * factor)``: in float32 (``factor`` float32), or float64 for float64 grads."""
    if x.dtype == tl.float64:
        return x * factor
    else:
        return _from_f32(_to_f32(x) * factor, x.dtype)


@triton.jit
def _round_odd_f32(d):
    """float64 -> float32 rounded to odd (truncated, last bit set when inexact): rounding the result
    once more to bfloat16 or float16 (at least 2 bits fewer) equals rounding ``d`` once."""
    narrow = d.to(tl.float32)
    back = narrow.to(tl.float64)
    inexact = back != d
    bits = narrow.to(tl.int32, bitcast=True)
    bits = tl.where(inexact & (tl.abs(back) > tl.abs(d)), bits - 1, bits)  # toward zero
    bits = tl.where(inexact, bits | 1, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _scaled_wide(x, c, c_hi, c_lo):
    """``round(x * c)`` for a float32/float16/bfloat16 ``x`` and a float64 ``c`` outside float32's
    normal range (``float32(c)`` would lose bits or overflow), rounded once to ``x``'s dtype.

    As ``product_round_odd`` in ``csrc/fusedclip.h``: ``c = c_hi + c_lo`` (24 + 29 significant
    bits), so ``a = x * c_hi`` and ``b = x * c_lo`` are exact and ``x * c = a + b``; ``s = a + b``
    rounded and its exact error ``t = b - (s - a)`` (Fast2Sum) give the product rounded to odd at
    float64 precision, which then rounds once more, correctly, to the grad's dtype (exact unless
    ``|x * c| < 2^-900``, where every result is a zero anyway).
    """
    w = _widen(x)
    a = w * c_hi
    b = w * c_lo
    s = a + b
    t = b - (s - a)
    bits = s.to(tl.int64, bitcast=True)
    bits = tl.where((t < 0.0) != (s < 0.0), bits - 1, bits) | 1  # truncate toward zero, set the sticky bit
    odd = tl.where(t == 0.0, s, bits.to(tl.float64, bitcast=True))
    odd = tl.where((s == 0.0) | (s - s != 0.0), w * c, odd)  # zero (keeps its sign), inf, NaN, overflow
    if x.dtype == tl.float32:
        return odd.to(tl.float32)
    else:
        return _from_f32(_round_odd_f32(odd), x.dtype)


@triton.jit
def _clamped(x, limit):
    """``x > v ? v : (x < -v ? -v : x)``, compared in ``limit``'s dtype (float32, or float64 for float64)."""
    if x.dtype == tl.float64:
        return tl.where(x > limit, limit, tl.where(x < -limit, -limit, x))
    else:
        w = _to_f32(x)
        return _from_f32(tl.where(w > limit, limit, tl.where(w < -limit, -limit, w)), x.dtype)


@triton.jit
def _transformed(x, value, c_hi, c_lo, CLAMP: tl.constexpr, WIDE: tl.constexpr):
    if CLAMP:
        return _clamped(x, value)
    elif WIDE:
        return _scaled_wide(x, value, c_hi, c_lo)
    else:
        return _scaled(x, value)


@triton.jit
def _elementwise_span(
    ptr, start, n, value, c_hi, c_lo, CLAMP: tl.constexpr, WIDE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, STAGES: tl.constexpr
):
    """One in-place pass over ``n`` elements from ``start``: ``_clamped(x, value)`` when CLAMP, else
    ``_scaled(x, value)`` (``_scaled_wide`` when WIDE) (whole blocks, then a masked tail)."""
    base = ptr + start
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    offs = tl.arange(0, BLOCK)
    n_full = (n // BLOCK) * BLOCK
    for i in tl.range(0, n_full, BLOCK, num_stages=STAGES):
        x = tl.load(base + i + offs)
        tl.store(base + i + offs, _transformed(x, value, c_hi, c_lo, CLAMP, WIDE))
    in_tail = n_full + offs < n
    x = tl.load(base + n_full + offs, mask=in_tail, other=0.0)
    tl.store(base + n_full + offs, _transformed(x, value, c_hi, c_lo, CLAMP, WIDE), mask=in_tail)


@triton.jit
def _scale_chunk(ptr, start, n, aligned, factor, c_hi, c_lo, WIDE: tl.constexpr, BLOCK: tl.constexpr,
                 STAGES: tl.constexpr):
    if aligned:
        _elementwise_span(ptr, start, n, factor, c_hi, c_lo, False, WIDE, True, BLOCK, STAGES)
    else:
        _elementwise_span(ptr, start, n, factor, c_hi, c_lo, False, WIDE, False, BLOCK, STAGES)


@triton.jit
def _scale_chunks(addresses_ptr, numels_ptr, codes_ptr, chunk_tensor_ptr, chunk_start_ptr, num_chunks,
                  chunk_elements, coef, WIDE: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """The program's chunks scaled by ``coef``: as float32 (float64 for float64 grads), or, when WIDE,
    by the exact product rounded once (``_scaled_wide``)."""
    coef32 = coef.to(tl.float32)
    c_hi = (coef.to(tl.int64, bitcast=True) & -536870912).to(tl.float64, bitcast=True)  # low 29 bits cleared
    c_lo = coef - c_hi  # exact
    for c in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
        t, address, start, n, code, aligned = _load_chunk(
            c, addresses_ptr, numels_ptr, codes_ptr, chunk_tensor_ptr, chunk_start_ptr, chunk_elements)
        if WIDE:
            if code == F32:
                _scale_chunk(address.to(tl.pointer_type(tl.float32)), start, n, aligned, coef, c_hi, c_lo, True,
                             BLOCK, STAGES)
            elif code == F16:
                _scale_chunk(address.to(tl.pointer_type(tl.float16)), start, n, aligned, coef, c_hi, c_lo, True,
                             BLOCK, STAGES)
            elif code == BF16:
                _scale_chunk(address.to(tl.pointer_type(tl.bfloat16)), start, n, aligned, coef, c_hi, c_lo, True,
                             BLOCK, STAGES)
            else:
                _scale_chunk(address.to(tl.pointer_type(tl.float64)), start, n, aligned, coef, c_hi, c_lo, False,
                             BLOCK, STAGES)
        else:
            if code == F32:
                _scale_chunk(address.to(tl.pointer_type(tl.float32)), start, n, aligned, coef32, c_hi, c_lo, False,
                             BLOCK, STAGES)
            elif code == F16:
                _scale_chunk(address.to(tl.pointer_type(tl.float16)), start, n, aligned, coef32, c_hi, c_lo, False,
                             BLOCK, STAGES)
            elif code == BF16:
                _scale_chunk(address.to(tl.pointer_type(tl.bfloat16)), start, n, aligned, coef32, c_hi, c_lo, False,
                             BLOCK, STAGES)
            else:
                _scale_chunk(address.to(tl.pointer_type(tl.float64)), start, n, aligned, coef, c_hi, c_lo, False,
                             BLOCK, STAGES)


@triton.jit(do_not_specialize=["num_chunks", "chunk_elements"])
def scale_kernel(
    addresses_ptr, numels_ptr, codes_ptr, chunk_tensor_ptr, chunk_start_ptr, num_chunks, chunk_elements,
    coef_ptr,  # 0-d float32/float64 on the device
    BLOCK: tl.constexpr, STAGES: tl.constexpr,
):
    """``x = round(x * coef)`` in float32 (float64 for float64 grads); no grad byte moves when coef == 1.

    A coefficient above 1 is applied: with a grad scale folded in (AMP's inverse scale) it can be. A
    finite non-zero coefficient outside float32's normal range (below 2^-126 or above FLT_MAX, where
    ``float32(coef)`` would lose bits or overflow) is applied as the exact product rounded once
    (``_scaled_wide``); the coefficient is one scalar, so every program takes the same branch.
    """
    coef = tl.load(coef_ptr).to(tl.float64)
    if coef != 1.0:  # NaN too: it must reach the grads, as in torch
        magnitude = tl.abs(coef)
        if (magnitude > 0.0) & ((magnitude < _FLOAT_MIN_NORMAL) | ((magnitude > _FLOAT_MAX) & (magnitude < _INF))):
            _scale_chunks(addresses_ptr, numels_ptr, codes_ptr, chunk_tensor_ptr, chunk_start_ptr, num_chunks,
                          chunk_elements, coef, True, BLOCK, STAGES)
        else:
            _scale_chunks(addresses_ptr, numels_ptr, codes_ptr, chunk_tensor_ptr, chunk_start_ptr, num_chunks,
                          chunk_elements, coef, False, BLOCK, STAGES)


@triton.jit
def _clamp_chunk(ptr, start, n, aligned, limit_bits, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    # the limit, already rounded to the grad dtype on the host, converts exactly
    limit = _f64(limit_bits)
    if ptr.dtype.element_ty != tl.float64:
        limit = limit.to(tl.float32)
    if aligned:
        _elementwise_span(ptr, start, n, limit, limit, limit, True, False, True, BLOCK, STAGES)
    else:
        _elementwise_span(ptr, start, n, limit, limit, limit, True, False, False, BLOCK, STAGES)


@triton.jit(do_not_specialize=["num_chunks", "chunk_elements", "limit_fp32_bits", "limit_fp16_bits",
                               "limit_bf16_bits", "limit_fp64_bits"])
def clamp_kernel(
    addresses_ptr, numels_ptr, codes_ptr, chunk_tensor_ptr, chunk_start_ptr, num_chunks, chunk_elements,
    limit_fp32_bits: tl.int64, limit_fp16_bits: tl.int64, limit_bf16_bits: tl.int64, limit_fp64_bits: tl.int64,
    BLOCK: tl.constexpr, STAGES: tl.constexpr,
):
    """``x > v ? v : (x < -v ? -v : x)`` in one pass (NaN stays NaN); ``v`` per dtype as torch rounds it."""
    for c in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
        t, address, start, n, code, aligned = _load_chunk(
            c, addresses_ptr, numels_ptr, codes_ptr, chunk_tensor_ptr, chunk_start_ptr, chunk_elements)
        if code == F32:
            _clamp_chunk(address.to(tl.pointer_type(tl.float32)), start, n, aligned, limit_fp32_bits, BLOCK, STAGES)
        elif code == F16:
            _clamp_chunk(address.to(tl.pointer_type(tl.float16)), start, n, aligned, limit_fp16_bits, BLOCK, STAGES)
        elif code == BF16:
            _clamp_chunk(address.to(tl.pointer_type(tl.bfloat16)), start, n, aligned, limit_bf16_bits, BLOCK, STAGES)
        else:
            _clamp_chunk(address.to(tl.pointer_type(tl.float64)), start, n, aligned, limit_fp64_bits, BLOCK, STAGES)


def interpreted() -> bool:
    """True when these kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return INTERPRETED
