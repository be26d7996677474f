#!/usr/bin/env bash
# The GPU measurements the benchmark issues need, step by step, each bounded in time.
#
#   tools/gpu_campaign.sh [STEP ...]        STEP: perf quick paper pytest asv train (default: all)
#
# perf (issue 8, first): the perf suite into reports/<gpu-model>/, then the ablation of rampde's
# options (perf/ablation.csv) and the torch.profiler tables (perf/profile/) of
# `python -m rampde.bench.profiling ablate|profile`, each of the three bounded by PERF_S (170 s:
# the step fits one 10-minute call).
# Results go to reports/<gpu-model>/ (results.csv, timelines.csv, pytest-benchmark.json, perf/),
# reports/asv/results/<gpu-model>/ and reports/training/<gpu-model>/. A step stopped by its limit
# (SIGINT) keeps what it finished: sweeps, the ablation and training write atomically as they go,
# and a rerun of a sweep or training resumes (the ablation and the profiles start afresh).
# Limits in seconds: PERF_S, QUICK_S, PAPER_S, PYTEST_S, ASV_S, TRAIN_S; PYTHON picks the
# interpreter (one with rampde installed, e.g. `pip install --no-deps -e .`). A box without
# internet gets plotly and asv as wheels fetched elsewhere by tools/fetch_gpu_wheels.sh.
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
    perf)
        step "${PERF_S:-170}" "$py" -m rampde.bench run --suite perf --out "$dir"
        step "${PERF_S:-170}" "$py" -m rampde.bench.profiling ablate --out "$dir/perf"
        step "${PERF_S:-170}" "$py" -m rampde.bench.profiling profile --out "$dir/perf"
        ;;
    quick) step "${QUICK_S:-480}" "$py" -m rampde.bench run --suite quick --out "$dir" ;;
    paper) step "${PAPER_S:-540}" "$py" -m rampde.bench run --suite paper --out "$dir" ;;
    pytest) step "${PYTEST_S:-480}" "$py" -m pytest tests/benchmarks --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$dir/pytest-benchmark.json" ;;
    asv) step "${ASV_S:-540}" "$py" tools/asv_history.py --count 3 --bench "MLPClaims|track_time_ms|track_peak" ;;
    train)
        step "${TRAIN_S:-270}" "$py" -m rampde.bench train --task digits --epochs 15 --out "reports/training/$gpu"
        step "${TRAIN_S:-270}" "$py" -m rampde.bench train --task cnf --epochs 20 --out "reports/training/$gpu"
        ;;
    *) echo "gpu_campaign: unknown step $1 (perf quick paper pytest asv train)" >&2; return 2 ;;
    esac
}

"$py" -m rampde.bench env --device cuda
for s in "${@:-perf quick paper pytest asv train}"; do
    for one in $s; do run_step "$one"; done
done
