#!/usr/bin/env bash
# Run the CPU tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of fusedclip._C.
#
#   benchmarks/sanitize_cpu.sh                  # build (incrementally) and run the default CPU selection
#   benchmarks/sanitize_cpu.sh tests/test_layouts.py -k views    # any pytest arguments instead
#
# The sanitized extension is built in a scratch copy of the working tree (build/sanitize/tree, or
# $FUSEDCLIP_SANITIZE_DIR/tree), never in place: a .so linked against libasan cannot be imported by
# a plain python, so leaving it in the tree would break the normal test run. Objects are kept
# between runs (ninja rebuilds what changed). Exit status: pytest's; a sanitizer report aborts the
# test process, so any report fails the run. The full output is also in <scratch>/pytest.log.
#
# Environment:
#   FUSEDCLIP_SANITIZE   sanitizers to build with: address, undefined or both (the default). (thread is
#                        not offered: GCC 12's libtsan preloaded into python crashes it at start-up.)
#   FUSEDCLIP_CUDA       default 0 here: the CUDA host code cannot run without a GPU, and nvcc is slow.
#                        With CUDA, ASAN_OPTIONS gains protect_shadow_gap=0 (the CUDA driver maps
#                        memory where ASan would reserve its shadow gap); untested without a GPU.
#   CXX                  the compiler (default c++; tested with gcc 12): its libasan/libubsan are preloaded
#   ASAN_OPTIONS, UBSAN_OPTIONS   replace the defaults below
#
# Why these runtime settings:
#   * Python and torch are not instrumented, so the sanitizer runtime must be loaded before them
#     (LD_PRELOAD); dlopen-ing an ASan-linked extension into a plain python otherwise aborts with
#     "ASan runtime does not come first in initial library list". With the runtime preloaded,
#     torch's allocations (posix_memalign in c10) go through ASan's allocator and get redzones, so
#     a kernel reading or writing past the end of a grad is reported even though torch itself is
#     not instrumented.
#   * detect_leaks=0: CPython and torch keep interned objects and caches until exit by design.
#   * abort_on_error=1, halt_on_error=1 (ASan and UBSan): the first report kills the process, so
#     pytest cannot swallow it; the build also uses -fno-sanitize-recover=undefined.
#   * detect_stack_use_after_return=1, check_initialization_order=1, strict_init_order=1: cheap at
#     this size and they cover the extension's static state (ISA registry, thread pool).
#
# How detection was verified: tests/test_sanitizers.py runs in this build only (it is skipped in a
# normal run and required here through FUSEDCLIP_SANITIZE_TEST=1). It hands the compiled kernels a
# plan table that claims one element more than a real torch tensor holds and asserts that a child
# process dies with an ASan heap-buffer-overflow report, and a chunk start whose byte offset
# overflows int64 and asserts a UBSan "signed integer overflow" report; each with a control run of
# a valid table that must succeed.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${FUSEDCLIP_SANITIZE_DIR:-$ROOT/build/sanitize}"
export FUSEDCLIP_SANITIZE="${FUSEDCLIP_SANITIZE:-address,undefined}"
[ "$FUSEDCLIP_SANITIZE" = 1 ] && FUSEDCLIP_SANITIZE=address,undefined
case "$FUSEDCLIP_SANITIZE" in
address | undefined | address,undefined | undefined,address) ;;
*)
    echo "FUSEDCLIP_SANITIZE=$FUSEDCLIP_SANITIZE: this script runs address, undefined or both" >&2
    exit 2
    ;;
esac
export FUSEDCLIP_CUDA="${FUSEDCLIP_CUDA:-0}"
CXX="${CXX:-c++}"

# ---- a scratch copy of the working tree (tracked and untracked, not ignored; mtimes kept) ----------
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
TREE="$WORK/tree"
rm -rf "$TREE"
mkdir -p "$TREE" "$WORK/obj"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # --ignore-failed-read: files deleted but not yet committed are still listed by git
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar -cf - --null --no-recursion --ignore-failed-read -T - 2>/dev/null) | tar -xf - -C "$TREE"
else
    (cd "$ROOT" && tar -cf - --exclude=./build --exclude='*.so' --exclude=__pycache__ .) | tar -xf - -C "$TREE"
fi

# ---- the sanitized build -----------------------------------------------------------------------------
echo "+ FUSEDCLIP_SANITIZE=$FUSEDCLIP_SANITIZE FUSEDCLIP_CUDA=$FUSEDCLIP_CUDA python setup.py build_ext --inplace"
(cd "$TREE" && python setup.py build_ext --inplace --build-temp "$WORK/obj" >"$WORK/build.log" 2>&1) || {
    cat "$WORK/build.log" >&2
    exit 1
}
grep -E "^fusedclip: building" "$WORK/build.log" || true

# ---- the runtimes ----------------------------------------------------------------------------------------
preload=()
case ",$FUSEDCLIP_SANITIZE," in
*,address,*) preload+=("$("$CXX" -print-file-name=libasan.so)") ;;
esac
case ",$FUSEDCLIP_SANITIZE," in
*,undefined,*) preload+=("$("$CXX" -print-file-name=libubsan.so)") ;;
esac
for lib in "${preload[@]}"; do
    if [ ! -e "$lib" ]; then
        echo "sanitizer runtime not found: $lib (install the compiler's libasan/libubsan)" >&2
        exit 1
    fi
done
LD_PRELOAD="$(IFS=:; echo "${preload[*]}")${LD_PRELOAD:+:$LD_PRELOAD}"
export LD_PRELOAD
asan_defaults=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1
asan_defaults+=:check_initialization_order=1:strict_init_order=1
[ "$FUSEDCLIP_CUDA" != 0 ] && asan_defaults+=:protect_shadow_gap=0
export ASAN_OPTIONS="${ASAN_OPTIONS:-$asan_defaults}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:abort_on_error=1}"
export FUSEDCLIP_SANITIZE_TEST=1  # tests/test_sanitizers.py must run, not skip
export PYTHONDONTWRITEBYTECODE=1

# ---- the tests ---------------------------------------------------------------------------------------------
# Everything that runs the compiled CPU kernels, or the code around them: Triton (interpreter) and GPU
# tests do not touch fusedclip._C's CPU code and would only run slower here. Then the sanitizer
# workload (misaligned views ending at their allocation's end, thousands of tensors, every norm type).
run_driver=0
if [ "$#" -eq 0 ]; then
    set -- -q -p no:cacheprovider -m "not gpu and not interpreter" \
        --ignore=tests/test_triton.py --ignore=tests/test_triton_compile.py --ignore=tests/test_gpu_contract.py
    run_driver=1
fi
echo "+ LD_PRELOAD=$LD_PRELOAD"
echo "+ ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS"
echo "+ (cd $TREE && python -m pytest $*)"
cd "$TREE"
set +e
python -m pytest "$@" 2>&1 | tee "$WORK/pytest.log"
status=${PIPESTATUS[0]}
if [ "$run_driver" -eq 1 ]; then
    echo "+ python benchmarks/sanitize_driver.py --device cpu --backends cpu"
    python benchmarks/sanitize_driver.py --device cpu --backends cpu 2>&1 | tee -a "$WORK/pytest.log"
    driver_status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] && status=$driver_status
fi
if grep -qE "ERROR: AddressSanitizer|runtime error:" "$WORK/pytest.log"; then
    # (the detection tests provoke reports in child processes whose output pytest does not print)
    echo "sanitizer report(s) in $WORK/pytest.log" >&2
    [ "$status" -eq 0 ] && status=1
fi
exit "$status"
