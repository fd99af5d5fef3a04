#!/usr/bin/env bash
# Issue 12's training on a lent GPU machine (the `device` tool: 30 minutes a session, 10 per call, a fresh
# machine after 30 s idle), by the ablation bench's recipe, so that nothing is lost with the machine:
#
#   tools/gpu_session.sh start [EPOCHS] [VARIANTS]   # first call: data at 512 px (about 6 minutes on 16
#                                                    # cores), then one background training per variant
#   tools/gpu_session.sh wait [SECONDS]              # each later call: waits, tails the logs
#
# Every call ends by copying the runs' checkpoints, logs and results to $OUT. Carried back into runs/ablation-gpu
# (the `carry` of the device tool), a fresh machine resumes them after `start` has made the data again (the same
# seed makes the same cases). VARIANTS: keys of x2p_ros/ablation_bench.py (default: "x2p baseline").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
SIZE=${SIZE:-512} CASES=${CASES:-1200} SIZES=${SIZES:-paper} DEVICE=${DEVICE:-cuda}  # a dry run: tiny, 64, cpu
DATA=${DATA:-data/gpu-$SIZE-s1000}
RUNS=${RUNS:-runs/ablation-gpu}
OUT=${OUT:-/tmp/gpu_session_out}

case ${1:-wait} in
start)
    epochs=${2:-40}
    variants=${3:-x2p baseline}
    python3 -m x2p_ros.cli data synth --out "$DATA" --cases "$CASES" --size "$SIZE" --seed 1000 --workers "${WORKERS:-15}" \
        --quiet
    mkdir -p "$RUNS"
    for v in $variants; do
        setsid nohup python3 -m x2p_ros.ablation_bench --data "$DATA" --sizes "$SIZES" --epochs "$epochs" \
            --batch-size 8 --device "$DEVICE" --runs "$RUNS" --json "$RUNS/ablation_result.json" --only "$v" --quiet \
            >"$RUNS/$v.log" 2>&1 &
    done
    sleep 30
    ;;
wait)
    sleep "${2:-540}"
    ;;
*)
    echo "usage: $0 start [EPOCHS] [VARIANTS] | wait [SECONDS]" >&2
    exit 2
    ;;
esac

nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
for log in "$RUNS"/*.log; do
    [ -f "$log" ] && { echo "== $log"; tail -n 3 "$log"; }
done
for run in "$RUNS"/*/; do
    [ -f "$run/log.csv" ] && { echo "== $run"; tail -n 2 "$run/log.csv"; }
done
mkdir -p "$OUT"
(cd "$RUNS" && find . -maxdepth 2 \( -name '*.pt' -o -name '*.csv' -o -name '*.json' -o -name '*.log' \) \
    -exec cp --parents {} "$OUT" \;)
echo "copied to $OUT"
