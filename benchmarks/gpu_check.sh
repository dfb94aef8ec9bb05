#!/usr/bin/env bash
# Prove and time fusedclip on a CUDA GPU, stage by stage, on a machine with no network:
# build the extension in place, run every GPU-marked test, run the benchmarks, and write the logs,
# the Markdown table and the JSON into one folder.
#
#   OUT=/path/to/results benchmarks/gpu_check.sh [all|build|test|bench|kernels|sanitize]
#
# For the headline evidence in ONE call of at most 8 minutes use benchmarks/gpu_proof.sh; this script
# is the longer, stage-by-stage version (several calls).
#
# Stages (each writes into $OUT, default ./gpu_out; `all` runs build, test, bench and kernels):
#   build     FUSEDCLIP_CUDA=1 pip install --no-build-isolation --no-deps -e .  -> build.log, env.txt
#             CUDA is required: a failed nvcc build fails the stage instead of leaving a CPU-only
#             extension (FUSEDCLIP_CUDA_ARCHS defaults to this GPU's architecture). Then
#             benchmarks/gpu_gate.py must find `cuda` and `triton` running on the GPU, else the
#             stage fails and nothing after it runs: GPU tests that skip the cuda backend prove nothing.
#   test      python -m pytest -m gpu                              -> gpu-tests.log
#   bench     python -m fusedclip.bench --device cuda --save $OUT  -> bench.log, <gpu>.md/.json/.png
#   kernels   benchmarks/triton_gpu_bench.py (device time, copy share, 2000-tensor wall time)
#                                                                  -> kernels.log, kernels.json
#   sanitize  benchmarks/sanitize_gpu.sh (compute-sanitizer memcheck + racecheck)
#
# The device tool of this project runs at most 10 minutes per command and returns at most 8
# files: run `build test` in one call, `build bench` in another (a fresh machine needs the build
# again), `build kernels` and `build sanitize` in others. Every stage is also fine on its own.
# The exit status is non-zero when any stage failed; later stages still run.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
[ "${stages[0]}" = all ] && stages=(build test bench kernels)
status=0

run_stage() {  # name, then the command; output to $OUT/<log> and a one-line verdict on stdout
    local name=$1 log=$2
    shift 2
    local start=$SECONDS
    "$@" >"$OUT/$log" 2>&1
    local rc=$?
    echo "[$name] exit $rc after $((SECONDS - start)) s -> $log"
    tail -n 3 "$OUT/$log" | sed "s/^/[$name]   /"
    [ $rc -eq 0 ] || status=1
}

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python3 - <<'EOF'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton missing:", error)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
import fusedclip
try:
    print("backends on cuda", fusedclip.available_backends("cuda"))
except TypeError:  # an older fusedclip without per-device answers
    print("backends", fusedclip.available_backends())
import fusedclip._C as C
print("extension", C.build_info())
EOF
}

for stage in "${stages[@]}"; do
    case $stage in
        build)
            archs=${FUSEDCLIP_CUDA_ARCHS:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')}
            run_stage build build.log env FUSEDCLIP_CUDA=1 FUSEDCLIP_CUDA_ARCHS="${archs:-80;90+PTX}" \
                python3 -m pip install --no-build-isolation --no-deps --no-index -e .
            environment >"$OUT/env.txt" 2>&1
            cat "$OUT/env.txt"
            if [ $status -ne 0 ]; then
                echo "[build] the CUDA build failed: stopping (see $OUT/build.log)"
                exit 1
            fi
            run_stage gate gate.log python3 benchmarks/gpu_gate.py
            if [ $status -ne 0 ]; then
                echo "[gate] the cuda or triton backend cannot run on this GPU: stopping (see $OUT/gate.log)"
                exit 1
            fi
            ;;
        test)
            # every GPU-marked test: the parity suite on CUDA for cuda/triton/torch, the launch,
            # graph, sync, >2^31-element, 10^5-tensor and stream contract, per-backend GPU tests
            run_stage test gpu-tests.log python3 -m pytest -q -m gpu -p no:cacheprovider -rs --durations=15
            ;;
        bench)
            # all providers, fp32/bf16/mix (fp16 behaves as bf16 on the bandwidth side);
            # torch.compile gets two minutes of compile time
            # the complete sweep (--full where the CLI's default is its fast job)
            full=()
            python3 -m fusedclip.bench --help 2>/dev/null | grep -q -- "--full" && full=(--full)
            run_stage bench bench.log python3 -m fusedclip.bench "${full[@]}" --device cuda --save "$OUT" --dtype fp32,bf16,mix \
                --compile-budget 120 --no-progress
            ;;
        kernels)
            run_stage kernels kernels.log python3 benchmarks/triton_gpu_bench.py --json "$OUT/kernels.json"
            ;;
        sanitize)
            run_stage sanitize sanitize.log env OUT="$OUT" bash benchmarks/sanitize_gpu.sh
            ;;
        *)
            echo "unknown stage $stage (all, build, test, bench, kernels, sanitize)" >&2
            exit 2
            ;;
    esac
done
exit $status
