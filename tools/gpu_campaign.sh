#!/usr/bin/env bash
# The GPU measurements the benchmark issues need, step by step, each bounded in time.
#
#   tools/gpu_campaign.sh [STEP ...]        STEP: quick paper pytest asv train (default: all)
#
# Results go to reports/<gpu-model>/ (results.csv, timelines.csv, pytest-benchmark.json),
# reports/asv/results/<gpu-model>/ and reports/training/<gpu-model>/. A step stopped by its limit
# (SIGINT) keeps what it finished: sweeps and training write atomically as they go, and a rerun
# resumes. Limits in seconds: QUICK_S, PAPER_S, PYTEST_S, ASV_S, TRAIN_S; PYTHON picks the
# interpreter (one with rampde installed, e.g. `pip install --no-deps -e .`).
set -u
py=${PYTHON:-python3}
gpu=$("$py" -c 'from rampde.bench.measure import gpu_name, gpu_slug; print(gpu_slug(gpu_name("cuda")))') || {
    echo "gpu_campaign: no CUDA device visible to $py" >&2
    exit 1
}
dir="reports/$gpu"
mkdir -p "$dir"

step() {
    local limit=$1
    shift
    echo "== $(date -u +%H:%M:%S) $* (limit ${limit}s)"
    timeout --signal=INT --kill-after=30 "$limit" "$@"
    echo "== exit $?"
}

run_step() {
    case "$1" in
    quick) step "${QUICK_S:-480}" "$py" -m rampde.bench run --suite quick --out "$dir" ;;
    paper) step "${PAPER_S:-540}" "$py" -m rampde.bench run --suite paper --out "$dir" ;;
    pytest) step "${PYTEST_S:-480}" "$py" -m pytest tests/benchmarks --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$dir/pytest-benchmark.json" ;;
    asv) step "${ASV_S:-540}" "$py" tools/asv_history.py --count 3 --bench "MLPClaims|track_time_ms|track_peak" ;;
    train)
        step "${TRAIN_S:-270}" "$py" -m rampde.bench train --task digits --epochs 15 --out "reports/training/$gpu"
        step "${TRAIN_S:-270}" "$py" -m rampde.bench train --task cnf --epochs 20 --out "reports/training/$gpu"
        ;;
    *) echo "gpu_campaign: unknown step $1 (quick paper pytest asv train)" >&2; return 2 ;;
    esac
}

"$py" -m rampde.bench env --device cuda
for s in "${@:-quick paper pytest asv train}"; do
    for one in $s; do run_step "$one"; done
done
