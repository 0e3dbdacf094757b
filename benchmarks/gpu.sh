#!/usr/bin/env bash
# GPU checks for the fast path in one go (at most 5 minutes; about 3-4 on an H100/H200), writing JSON to
# benchmarks/results (or the folder given as $1):
#   gpu-check.json             torch CUDA fp16 vs ONNX Runtime, device vs CPU labels, stage ms
#   bench-gpu-2048.json        livemask bench, 2048x2048, torch backend, pipelined mode (bench's
#                              default since session 9: every frame analysed, the camera as fast
#                              as the pipeline takes frames) with a 10 ms exposure (at most ~95
#                              frames/s: a real sCMOS camera's full-frame rate)
#   bench-gpu-2048-50fps.json  the camera paced at 50 frames/s, 1 ms exposure (latency at a rate)
#   bench-gpu-2048-one.json    camera free, inference and analysis in one thread
#                              (pipeline.stage_threads: one; the others use the default, two)
#   bench-gpu-2048-free.json   free-run mode: the camera runs ahead and frames skip analysis
#                              (the bench's mode until session 8)
#   bench-gpu-512.json         livemask bench, 512x512, torch backend
#   host-ceiling-2048-50fps.json  the same service on this host's CPUs with the GPU stages
#                              replaced by waits (benchmarks/host_ceiling.py): host side alone
#   gpu-contention-2048.json   the analysis' parts alone and beside a running model
#                              (benchmarks/gpu_contention.py)
#   pyspy-gil-2048.{txt,json}  with py-spy on the PATH: GIL samples per thread of a 2048²
#                              bench (summary by benchmarks/gil_profile.py)
# Needs livemask importable (pip install -e '.[torch]' with a CUDA build of torch) and a GPU.
# Each step has its own time limit and the whole script a budget ($GPU_SH_BUDGET_S, default
# 300 s), in order of importance; a step that fails or times out is reported and the next one
# runs. The exit status is 1 when any step failed or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
py=${PYTHON:-python3}
budget=${GPU_SH_BUDGET_S:-300}
mkdir -p "$out"
failed=()

step() {  # step NAME LIMIT_S COMMAND...: run COMMAND with at most LIMIT_S (and the budget left)
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS))
    if ((left < 20)); then
        echo "== $name: skipped (budget of ${budget} s spent)"
        failed+=("$name (skipped)")
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s; ${SECONDS} s so far)"
    if ! timeout "$limit" "$@"; then
        echo "!! $name failed or timed out"
        failed+=("$name")
        return 1
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step gpu-check 75 "$py" benchmarks/gpu_check.py --size 2048 --json "$out/gpu-check.json"
step bench-2048 75 "$py" -m livemask bench --backend torch --size 2048 --frames 300 \
    --threads 8 --exposure-ms 10 --json "$out/bench-gpu-2048.json"
step bench-2048-50fps 50 "$py" -m livemask bench --backend torch --size 2048 --frames 250 \
    --threads 8 --exposure-ms 1 --camera-fps 50 --json "$out/bench-gpu-2048-50fps.json"
step bench-512 40 "$py" -m livemask bench --backend torch --size 512 --frames 300 --threads 8 \
    --json "$out/bench-gpu-512.json"
step host-ceiling 45 "$py" benchmarks/host_ceiling.py --frames 250 --camera-fps 50 \
    --policy-only --json "$out/host-ceiling-2048-50fps.json"
step bench-2048-one 40 "$py" -m livemask bench --backend torch --size 2048 --frames 150 \
    --threads 8 --exposure-ms 10 --stage-threads one --json "$out/bench-gpu-2048-one.json"
step bench-2048-free 35 "$py" -m livemask bench --backend torch --size 2048 --frames 120 \
    --threads 8 --exposure-ms 10 --mode free-run --json "$out/bench-gpu-2048-free.json"
step contention 50 "$py" benchmarks/gpu_contention.py --size 2048 \
    --json "$out/gpu-contention-2048.json"
# Who holds the GIL in the 2048² pipeline (py-spy samples only the GIL holder with --gil);
# optional: needs py-spy on the PATH and permission to trace a child process.
if command -v py-spy >/dev/null 2>&1; then
    step pyspy 60 py-spy record --gil --threads -r 100 -f raw -o "$out/pyspy-gil-2048.txt" \
        -- "$py" -m livemask bench --backend torch --size 2048 --frames 120 --threads 8 \
        --exposure-ms 10 --json "$out/bench-gpu-2048-pyspy.json" \
        && step gil-profile 20 "$py" benchmarks/gil_profile.py "$out/pyspy-gil-2048.txt" \
            --json "$out/pyspy-gil-2048.json"
fi
echo "gpu.sh: ${SECONDS} s"
if ((${#failed[@]})); then
    echo "gpu.sh: failed or skipped: ${failed[*]}"
    exit 1
fi
