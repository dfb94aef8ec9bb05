#!/usr/bin/env bash
# The GPU proof in one call of at most 8 minutes, on a fresh CUDA machine without network access:
# build with CUDA required, prove that the `cuda` and `triton` backends run, measure the key sets,
# run the GPU contract tests and a reduced GPU parity suite. Every stage runs under its own
# `timeout`, the stages run in order of value, and every result is on disk (flushed) the moment it
# exists, so a call cut short still returns what was done.
#
#   OUT=/path/to/results benchmarks/gpu_proof.sh            # the proof (OUT defaults to ./gpu_out)
#   benchmarks/gpu_proof.sh --list                          # the stages and their budgets
#   benchmarks/gpu_proof.sh --rehearse                      # everything but the GPU, on any machine
#
# Stages (seconds of budget; a stage gets at most what is left before the deadline, TOTAL_S=470):
#   build     100  FUSEDCLIP_CUDA=1 pip install --no-build-isolation --no-deps -e .  -> build.log
#                  (FUSEDCLIP_CUDA_ARCHS defaults to this GPU's architecture only: one nvcc pass)
#   gate       45  benchmarks/gpu_gate.py: versions, build record, available_backends("cuda"), one
#                  explicit clip per backend against float64, the kernels it launched; exits non-zero
#                  when `cuda` or `triton` cannot run: no silent CPU-only build    -> env.txt
#   bench     130  benchmarks/gpu_headline.py: GPT-2 small fp32/bf16, Llama-2-7B bf16, 2000 small
#                  tensors, one 2^31-element tensor; clipped and unclipped; cuda, triton, torch, apex
#                  (if installed) for every set first, then torch.compile (sets of at most 300
#                  tensors, within a compile budget) so that no cold compile delays a kernel row;
#                  device time, wall time, copy-bandwidth share; one row per line as it is measured
#                                                                       -> bench.jsonl, bench.md
#   contract  110  pytest tests/test_gpu_contract.py (launch count, no sync under
#                  set_sync_debug_mode("error"), CUDA graphs, >2^31 elements, two streams, ...)
#                                                                       -> contract.log
#   parity     55  pytest -m gpu tests/test_parity.py: the CUDA cases of the kernel backends (cuda,
#                  triton; the `torch` backend's CUDA cases are left out), default chunking,
#                  fp32/bf16/bf16+fp32/all-four dtype sets (about 300 tests)      -> parity.log
#   tracker    30  python -m fusedclip.bench.training_step on GPT-2 small (full size): backward + a
#                  fused AdamW step with no clipping, torch's, fusedclip's, clip_and_step_ and
#                  NormTracker + clip_and_step_ (skipped, not failed, when the time is gone)
#                                                                       -> tracker.md
# Every stage's verdict is appended to summary.md as it ends. At most 8 files land in $OUT (the
# device tool returns at most 8). The exit status is non-zero when any stage failed; later stages
# still run, except that nothing runs after a failed build.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

STAGES=(build gate bench contract parity tracker)
declare -A BUDGET=([build]=100 [gate]=45 [bench]=130 [contract]=110 [parity]=55 [tracker]=30)
TOTAL_S=${TOTAL_S:-470}
#: every file the proof writes into $OUT (the rehearsal checks that no other appears)
OUT_FILES=(summary.md build.log env.txt bench.jsonl bench.md contract.log parity.log tracker.md)
PARITY_K="(cuda-cuda or cuda-triton) and not chunk-64 and not fp64 and not fp16"

mode=run
case "${1:-}" in
    "") ;;
    --rehearse) mode=rehearse ;;
    --list) mode=list ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--rehearse|--list]" >&2; exit 2 ;;
esac

if [ "$mode" = list ]; then
    sum=0
    for stage in "${STAGES[@]}"; do
        echo "$stage ${BUDGET[$stage]}"
        sum=$((sum + BUDGET[$stage]))
    done
    echo "total $sum"
    echo "deadline $TOTAL_S"
    echo "files ${OUT_FILES[*]}"
    exit 0
fi

OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
if [ "$mode" = rehearse ]; then
    PY=${PYTHON:-python}
fi
STARTED=$SECONDS
DEADLINE=$((STARTED + TOTAL_S))
status=0
: >"$OUT/summary.md"

note() { echo "$*" | tee -a "$OUT/summary.md"; }

budget_for() {  # a stage's budget, cut to what is left before the deadline (5 s kept for the summary)
    local own=${BUDGET[$1]} left=$((DEADLINE - SECONDS - 5))
    [ "$left" -lt "$own" ] && own=$left
    echo "$own"
}

run_stage() {  # name log command...: the command under `timeout`, output to $OUT/log, verdict to summary.md
    local name=$1 log=$2
    shift 2
    local budget
    budget=$(budget_for "$name")
    if [ "$budget" -lt 10 ]; then
        note "| $name | skipped: ${budget} s left before the ${TOTAL_S} s deadline | | $log |"
        status=1
        return 1
    fi
    local start=$SECONDS
    timeout --signal=TERM --kill-after=5 "$budget" "$@" >>"$OUT/$log" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT after its ${budget} s"
    [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $rc)"
    note "| $name | $verdict | $((SECONDS - start)) s of ${BUDGET[$name]} s | $log |"
    tail -n 4 "$OUT/$log" | sed "s/^/    [$name] /"
    [ $rc -eq 0 ] || status=1
    return $rc
}

pytest_flags() {  # pytest-timeout / pytest-xdist when installed (both are on the lent H200)
    local flags=(-p no:cacheprovider -rfEs --durations=10 -o addopts= --strict-markers)
    "$PY" -c "import pytest_timeout" 2>/dev/null && flags+=(--timeout=100)
    [ "$mode" = run ] && "$PY" -c "import xdist" 2>/dev/null && flags+=(-n 4)
    echo "${flags[@]}"
}

no_backend_skips() {  # a GPU test skipped because a backend cannot run is a failure here, not a skip
    local skipped
    skipped=$(grep -E "^SKIPPED" "$OUT/$2" | grep -ciE "unavailable|no CUDA device|cannot run" || true)
    if [ "${skipped:-0}" -ne 0 ]; then
        note "| $1 | FAILED: $skipped test(s) skipped because a backend or the GPU was unavailable | | $2 |"
        status=1
    fi
}

note "# GPU proof ($mode) $(date -u '+%Y-%m-%d %H:%M UTC'), deadline ${TOTAL_S} s"
note ""
note "| stage | verdict | time | log |"
note "|---|---|---|---|"

# ---- build ----------------------------------------------------------------------------------------
if [ "$mode" = run ]; then
    archs=${FUSEDCLIP_CUDA_ARCHS:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')}
    archs=${archs:-90}
    echo "FUSEDCLIP_CUDA=1 FUSEDCLIP_CUDA_ARCHS=$archs MAX_JOBS=$(nproc)" >"$OUT/build.log"
    if ! run_stage build build.log env FUSEDCLIP_CUDA=1 FUSEDCLIP_CUDA_ARCHS="$archs" MAX_JOBS="$(nproc)" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
        note ""
        note "The build failed: nothing else runs (see build.log)."
        exit 1
    fi
else
    # the rehearsal never builds: it checks that the build command is still what setup.py accepts
    run_stage build build.log "$PY" - <<'EOF'
import runpy, sys
setup = runpy.run_path("setup.py", run_name="fusedclip_setup")  # the helpers, without running setup()
assert setup["_cuda_archs"]("90") == [("90", False)]
assert callable(setup["choose_cuda_toolkit"])
print("setup.py: FUSEDCLIP_CUDA=1 FUSEDCLIP_CUDA_ARCHS=90 is understood; build skipped in the rehearsal")
EOF
fi

# ---- gate: the kernel backends must run -------------------------------------------------------------
gate_args=()
[ "$mode" = rehearse ] && gate_args=(--rehearse)
if [ "$mode" = run ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv >>"$OUT/env.txt" 2>&1
fi
run_stage gate env.txt "$PY" benchmarks/gpu_gate.py "${gate_args[@]}"

# ---- bench: the headline numbers ----------------------------------------------------------------------
bench_args=(--out "$OUT" --budget "$(budget_for bench)")
[ "$mode" = rehearse ] && bench_args+=(--rehearse)
# bench.jsonl and bench.md carry the results; the console output joins env.txt
run_stage bench env.txt "$PY" benchmarks/gpu_headline.py "${bench_args[@]}"

# ---- the contract and parity tests -------------------------------------------------------------------
# shellcheck disable=SC2046  # the flags are words
if [ "$mode" = run ]; then
    run_stage contract contract.log "$PY" -m pytest tests/test_gpu_contract.py $(pytest_flags)
    no_backend_skips contract contract.log
    run_stage parity parity.log "$PY" -m pytest tests/test_parity.py -m gpu -k "$PARITY_K" $(pytest_flags)
    no_backend_skips parity parity.log
else
    # on a machine without a GPU: the selections must still collect tests (a rename would empty them)
    run_stage contract contract.log "$PY" -m pytest tests/test_gpu_contract.py --collect-only -q $(pytest_flags)
    run_stage parity parity.log "$PY" -m pytest tests/test_parity.py -m gpu -k "$PARITY_K" --collect-only -q \
        $(pytest_flags)
fi

# ---- the tracker in a training step (least valuable: only when time is left) ----------------------------
if [ "$(budget_for tracker)" -lt 20 ]; then
    note "| tracker | not run: $(budget_for tracker) s left | | tracker.md |"
    : >"$OUT/tracker.md"
elif [ "$mode" = run ]; then
    run_stage tracker tracker.md "$PY" -m fusedclip.bench.training_step --device cuda --models gpt2 --size full \
        --rounds 7
else
    run_stage tracker tracker.md "$PY" -m fusedclip.bench.training_step --models lstm --size small --rounds 1
fi

note ""
note "total $((SECONDS - STARTED)) s of ${TOTAL_S} s; exit $status"
exit $status
