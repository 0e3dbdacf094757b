#!/usr/bin/env bash
# GPU checks for the fast path in one go (about 3-4 minutes on an H100/H200), writing JSON to
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
#   pyspy-gil-2048.{txt,json}  with py-spy on the PATH: GIL samples per thread of a 2048²
#                              bench (summary by benchmarks/gil_profile.py)
# Needs livemask importable (pip install -e '.[torch]' with a CUDA build of torch) and a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
py=${PYTHON:-python3}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$py" benchmarks/gpu_check.py --size 2048 --json "$out/gpu-check.json"
"$py" -m livemask bench --backend torch --size 2048 --frames 400 --threads 8 --exposure-ms 10 \
    --json "$out/bench-gpu-2048.json"
"$py" -m livemask bench --backend torch --size 2048 --frames 300 --threads 8 --exposure-ms 1 \
    --camera-fps 50 \
    --json "$out/bench-gpu-2048-50fps.json"
"$py" -m livemask bench --backend torch --size 2048 --frames 200 --threads 8 --exposure-ms 10 \
    --stage-threads one \
    --json "$out/bench-gpu-2048-one.json"
"$py" -m livemask bench --backend torch --size 2048 --frames 150 --threads 8 --exposure-ms 10 \
    --mode free-run \
    --json "$out/bench-gpu-2048-free.json"
"$py" -m livemask bench --backend torch --size 512 --frames 400 --threads 8 \
    --json "$out/bench-gpu-512.json"
"$py" benchmarks/host_ceiling.py --frames 300 --camera-fps 50 --policy-only \
    --json "$out/host-ceiling-2048-50fps.json"
# Who holds the GIL in the 2048² pipeline (py-spy samples only the GIL holder with --gil);
# optional: needs py-spy on the PATH and permission to trace a child process.
if command -v py-spy >/dev/null 2>&1; then
    timeout 120 py-spy record --gil --threads -r 100 -f raw -o "$out/pyspy-gil-2048.txt" -- \
        "$py" -m livemask bench --backend torch --size 2048 --frames 150 --threads 8 \
        --exposure-ms 10 --json "$out/bench-gpu-2048-pyspy.json" \
        && "$py" benchmarks/gil_profile.py "$out/pyspy-gil-2048.txt" \
            --json "$out/pyspy-gil-2048.json" \
        || echo "py-spy profile skipped (py-spy failed or timed out)"
fi
