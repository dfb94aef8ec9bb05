#!/usr/bin/env bash
# compute-sanitizer over the CUDA and Triton kernels (needs a CUDA GPU and the CUDA toolkit).
#
#   benchmarks/sanitize_gpu.sh [LOG_DIR]
#
# LOG_DIR defaults to $OUT/sanitize-gpu when OUT is set, else build/sanitize-gpu. Runs
# benchmarks/sanitize_driver.py (every kernel path of the `cuda` and `triton` backends on
# awkward inputs, results checked against float64) once without the sanitizer, then under each of
# memcheck, racecheck, initcheck and synccheck, one log per tool. Exit status 0 only when the
# plain run passed and every tool reported 0 errors (and racecheck 0 hazards); the verdicts are
# in LOG_DIR/summary.txt.
#
# Environment:
#   TOOLS              tools to run (default "memcheck racecheck initcheck synccheck")
#   BACKENDS           backends for the driver (default cuda,triton)
#   DRIVER_ARGS        more driver arguments, e.g. "--small" (see the driver's --help)
#   COMPUTE_SANITIZER  the binary (default: on PATH, else $CUDA_HOME/bin, /usr/local/cuda*/bin)
#   PYTHON             the interpreter (default: python3, else python; the lent GPU machines have python3 only)
#   FUSEDCLIP_CUDA_ARCHS  used when the extension has to be built (default: this GPU's architecture)
#
# Settings, and why:
#   * PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is its own cudaMalloc, so a kernel reading or
#     writing past a grad touches memory outside any allocation, which memcheck reports; with
#     torch's caching allocator it would land in the cached block unseen. memcheck --padding adds
#     a guard after every allocation, so an access past one allocation cannot land in the next.
#   * The plain run goes first: it proves the results right and fills Triton's kernel cache
#     (TRITON_CACHE_DIR), so the sanitized runs launch cached kernels instead of compiling.
#   * --target-processes application-only: the driver is the only process that touches the GPU.
#   * Triton kernels carry line info by default (do not set TRITON_DISABLE_LINE_INFO), so reports
#     name the Triton source line; the CUDA kernels are reported by name and offset.
#   * racecheck covers shared memory only (the block reductions of both backends); memcheck covers
#     global memory, including misaligned accesses; initcheck reads of never-written global
#     memory (e.g. a workspace slot read before any program wrote it); synccheck barriers.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$#" -ge 1 ]; then
    LOGS="$1"
elif [ -n "${OUT:-}" ]; then
    LOGS="$OUT/sanitize-gpu"
else
    LOGS="$ROOT/build/sanitize-gpu"
fi
mkdir -p "$LOGS"
LOGS="$(cd "$LOGS" && pwd)"
TOOLS="${TOOLS:-memcheck racecheck initcheck synccheck}"
BACKENDS="${BACKENDS:-cuda,triton}"
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# ---- the tool ---------------------------------------------------------------------------------------------
sanitizer="${COMPUTE_SANITIZER:-}"
if [ -z "$sanitizer" ]; then
    for candidate in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-}/bin/compute-sanitizer" \
        /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            sanitizer="$candidate"
            break
        fi
    done
fi
if [ -z "$sanitizer" ]; then
    say "compute-sanitizer not found: install the CUDA toolkit or set COMPUTE_SANITIZER"
    exit 2
fi
say "compute-sanitizer: $sanitizer ($("$sanitizer" --version 2>/dev/null | grep -iE 'version' | head -n 1))"
sanitizer_help="$("$sanitizer" --help 2>&1)"
has_option() { grep -q -- "$1" <<<"$sanitizer_help"; }

cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
unset TRITON_INTERPRET
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/fusedclip-sanitize-triton-cache}"
export PYTHONDONTWRITEBYTECODE=1

# ---- the extension with CUDA kernels (built in place when missing) -----------------------------------------
if [[ ",$BACKENDS," == *,cuda,* ]] && ! "$PY" -c "from fusedclip import _ext; raise SystemExit(_ext.cuda_build_reason() is not None)"; then
    archs="${FUSEDCLIP_CUDA_ARCHS:-$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")}"
    say "building fusedclip._C with CUDA kernels for $archs (log: $LOGS/build.log)"
    if ! FUSEDCLIP_CUDA=1 FUSEDCLIP_CUDA_ARCHS="$archs" "$PY" setup.py build_ext --inplace >"$LOGS/build.log" 2>&1; then
        say "FAILED: the build (see $LOGS/build.log)"
        exit 2
    fi
fi

# shellcheck disable=SC2206  # DRIVER_ARGS is a list of words
driver=("$PY" benchmarks/sanitize_driver.py --backends "$BACKENDS" ${DRIVER_ARGS:-})

# ---- a plain run: correct results, warm Triton cache ----------------------------------------------------------
started=$SECONDS
"${driver[@]}" >"$LOGS/plain.log" 2>&1
status=$?
if [ "$status" -ne 0 ]; then
    say "FAILED: the plain run exited with $status (see $LOGS/plain.log)"
    tail -n 20 "$LOGS/plain.log"
    exit "$status"
fi
say "plain run: ok in $((SECONDS - started)) s"

# ---- one run per tool -------------------------------------------------------------------------------------------
failures=0
for tool in $TOOLS; do
    options=(--tool "$tool" --error-exitcode 99 --print-limit 50 --log-file "$LOGS/$tool.log")
    has_option "--target-processes" && options+=(--target-processes application-only)
    if [ "$tool" = memcheck ] && has_option "--padding"; then
        options+=(--padding 64)
    fi
    started=$SECONDS
    "$sanitizer" "${options[@]}" "${driver[@]}" >"$LOGS/$tool.out" 2>&1
    status=$?
    elapsed=$((SECONDS - started))
    errors="$(grep -hE "ERROR SUMMARY: [0-9]+ error" "$LOGS/$tool.log" "$LOGS/$tool.out" 2>/dev/null | tail -n 1 | sed -E 's/.*ERROR SUMMARY: ([0-9]+) error.*/\1/')"
    hazards="$(grep -hE "RACECHECK SUMMARY: [0-9]+ hazard" "$LOGS/$tool.log" "$LOGS/$tool.out" 2>/dev/null | tail -n 1 | sed -E 's/.*RACECHECK SUMMARY: ([0-9]+) hazard.*/\1/')"
    verdict="clean"
    if [ "$status" -ne 0 ] || [ "${errors:-missing}" != 0 ] || { [ "$tool" = racecheck ] && [ "${hazards:-0}" != 0 ]; }; then
        verdict="FAILED"
        failures=$((failures + 1))
    fi
    say "$tool: $verdict (exit $status, errors ${errors:-no summary}${hazards:+, hazards $hazards}, ${elapsed} s; $LOGS/$tool.log)"
    if [ "$verdict" = FAILED ]; then
        grep -m 20 -E "^========= (Invalid|Uninitialized|Race|Barrier|Program hit|    at |Error)" "$LOGS/$tool.log" || tail -n 20 "$LOGS/$tool.out"
    fi
done

if [ "$failures" -ne 0 ]; then
    say "compute-sanitizer: $failures tool(s) reported errors"
    exit 1
fi
say "compute-sanitizer: every tool clean on backends $BACKENDS"
