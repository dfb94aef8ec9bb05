#!/usr/bin/env bash
# Prove and time fusedclip on a CUDA GPU in one go (issue 9), on a machine with no network:
# build the extension in place, run every GPU-marked test, run the benchmarks, and write the logs,
# the Markdown table and the JSON into one folder.
#
#   OUT=/path/to/results benchmarks/gpu_check.sh [all|build|test|bench|kernels|sanitize]
#
# Stages (each writes into $OUT, default ./gpu_out; `all` runs build, test, bench and kernels):
#   build     pip install --no-build-isolation --no-deps -e .   -> build.log, env.txt
#   test      python -m pytest -m gpu                              -> gpu-tests.log
#   bench     python -m fusedclip.bench --save $OUT               -> bench.log, <gpu>.md/.json/.png
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
print("backends", fusedclip.available_backends())
import fusedclip._C as C
print("extension", C.build_info())
EOF
}

for stage in "${stages[@]}"; do
    case $stage in
        build)
            run_stage build build.log python3 -m pip install --no-build-isolation --no-deps -e .
            environment >"$OUT/env.txt" 2>&1
            cat "$OUT/env.txt"
            ;;
        test)
            # every GPU-marked test: the parity suite on CUDA for cuda/triton/torch, the launch,
            # graph, sync, >2^31-element, 10^5-tensor and stream contract, per-backend GPU tests
            run_stage test gpu-tests.log python3 -m pytest -q -m gpu -p no:cacheprovider -rs --durations=15
            ;;
        bench)
            # all providers, fp32/bf16/mix (fp16 behaves as bf16 on the bandwidth side);
            # torch.compile gets two minutes of compile time
            run_stage bench bench.log python3 -m fusedclip.bench --save "$OUT" --dtype fp32,bf16,mix \
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
