#!/usr/bin/env bash
# Every GPU measurement of the fast path in one go, sized for under 8 minutes on one H100.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh
#
# Run from anywhere; it works in the repository root. Installs nothing: it uses the repository's
# .venv as it is (CUDA build of torch). Each step has its own time limit, so a stuck step costs at
# most its limit and the others still run. JSON results go to benchmarks/results/ (file names carry
# the GPU's name) and, with the logs and a summary, to $OUT (default benchmarks/results/gpu_check).
#
# Steps (limits in seconds; the sum stays under 8 minutes):
#   env        15  torch, CUDA, the GPU (nvidia-smi)
#   augment    40  bench_augment.py: per-sample torchvision vs BatchAugment on the GPU, every stage
#   training  190  bench_training.py: original pipeline vs fast path, SimpleCNN and ResNet18Cifar,
#                  stage5_occlusion, torch.compile on and off (compilation included), host syncs per step
#   memory     45  bench_training.py --memory: 604,388 uint8 images (SVHN train+extra) on the GPU,
#                  ResNet18Cifar at batch 1024, torch.cuda.max_memory_allocated
#   study     150  study_time.py: full-study prediction for SVHN sizes from measured GPU costs, and a
#                  scaled-down study (synthetic, one epoch per run) run for real against its prediction
#   tests      40  the CUDA tests of tests/test_fast_path.py and tests/test_training.py (the compiled
#                  one aside: bench_training.py measures torch.compile already)
# Goals on one H100: SimpleCNN + stage 5 >= 150,000 images/s, ResNet18Cifar >= 30,000 images/s,
# both >= 20x the original pipeline on the same GPU, predicted full study < 20 minutes.

set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
PY=.venv/bin/python
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
START=$(date +%s)

step() {  # step NAME LIMIT COMMAND...: run with a time limit, log to $OUT/NAME.log, show its tail
    local name=$1 limit=$2 begin rc
    shift 2
    begin=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - begin )) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -n 20 "$OUT/$name.log"
}

: > "$OUT/summary.txt"
touch "$OUT/.start"
step env 15 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.is_available(), torch.cuda.get_device_name(0))'"
step augment 40 $PY benchmarks/bench_augment.py --device cuda --n 2048
step training 190 $PY benchmarks/bench_training.py --device cuda --compile --out "$OUT/training.json"
step memory 45 $PY benchmarks/bench_training.py --memory --out "$OUT/memory.json"
step study 150 $PY benchmarks/study_time.py --device cuda --sizes svhn --validate \
    --n-train 10000 --n-test 2000 --resnet-n-train 10000 --out "$OUT/study_time.json"
step tests 40 $PY -m pytest -q -k "cuda and not compiled" tests/test_fast_path.py tests/test_training.py

find benchmarks/results -maxdepth 1 -name '*.json' -newer "$OUT/.start" -exec cp {} "$OUT/" \;  # this run's
echo "== total $(( $(date +%s) - START )) s" | tee -a "$OUT/summary.txt"
