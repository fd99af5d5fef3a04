#!/usr/bin/env bash
# Issue 12's training on a lent GPU machine (the `device` tool: 30 minutes a session, 10 per call, a fresh
# machine after 30 s idle), by the ablation bench's recipe, so that nothing is lost with the machine:
#
#   tools/gpu_session.sh start [EPOCHS] [VARIANTS] [SECONDS]  # first call: data at 512 px (about 6 minutes on
#                                                             # 16 cores), one background training per variant,
#                                                             # then waits until SECONDS after the call began
#   tools/gpu_session.sh finetune [EPOCHS] [SECONDS]          # or, first call: data at 256 px (SIZE, CASES),
#                                                             # then the shipped cpu models fine-tuned on it
#                                                             # (x2p train --init, runs default and baseline)
#   tools/gpu_session.sh wait [SECONDS]                       # each later call: waits, tails the logs
#   tools/gpu_session.sh finish [SECONDS]                     # last call: waits (at most SECONDS) for the
#                                                             # trainings to end, then measures
#
# `finish` evaluates each run's best.pt and the shipped models on the data's validation split (the shipping
# rule), each best.pt again at the presence threshold `x2p presence` chooses on 80 held-out calibration
# cases (CALIB: rendered with another seed, in no training, validation or test split), and its
# best.pt on the test split with the prompt sweep, times the GPU forward
# (`bench --gpu-latency`) and runs the CUDA tests. Every call ends by copying what it has to $OUT, within the
# device tool's 8 files: each run's best.pt, and one runs.tgz of the logs, results and the data's split lists.
# The real CTs travel in .realct (copy ../shared/realct there, carry it) for the ablation table's
# real-anatomy column only: they are measured, never trained on. The machine's python3 lacks nibabel: carry
# its wheel in .whl (pip download --no-deps -d .whl nibabel==VERSION); it is installed into /tmp/site.
# VARIANTS: keys of x2p_ros/ablation_bench.py (default: "x2p baseline").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
if [ -d .whl ] && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
if [ "${1:-}" = finetune ]; then SIZE=${SIZE:-256} CASES=${CASES:-4000}; fi  # the cpu models' size
SIZE=${SIZE:-512} CASES=${CASES:-1200} SIZES=${SIZES:-paper} DEVICE=${DEVICE:-cuda}  # a dry run: tiny, 64, cpu
DATA=${DATA:-data/gpu-$SIZE-s1000}
CALIB=${CALIB:-data/gpu-$SIZE-s5000}
RUNS=${RUNS:-runs/ablation-gpu}
OUT=${OUT:-/tmp/gpu_session_out}
WORKERS=${WORKERS:-15}  # synthesis processes; each training gets 7 loaders (the strong look randomisation)
began=$SECONDS

case ${1:-wait} in
start)
    epochs=${2:-30}
    variants=${3:-x2p baseline}
    if [ -d .realct ] && [ ! -e ../shared/realct ]; then
        mkdir -p ../shared && cp -r .realct ../shared/realct
    fi
    python3 -m x2p_ros.cli data synth --out "$DATA" --cases "$CASES" --size "$SIZE" --seed 1000 --workers "$WORKERS" \
        --quiet
    mkdir -p "$RUNS"
    for v in $variants; do
        setsid nohup python3 -m x2p_ros.ablation_bench --data "$DATA" --sizes "$SIZES" --epochs "$epochs" \
            --batch-size 8 --device "$DEVICE" --workers "${LOADERS:-7}" --runs "$RUNS" \
            --json "$RUNS/ablation_result.json" --only "$v" --quiet >"$RUNS/$v.log" 2>&1 &
    done
    sleep $(( ${4:-60} > SECONDS - began ? ${4:-60} - (SECONDS - began) : 1 ))
    ;;
finetune)
    # the GPU's other use for issue 11: a CPU trains the shipped cpu models an epoch in 11 minutes, a GPU in
    # seconds, so one session can give them many more epochs on more cases than a CPU session can
    epochs=${2:-60}
    python3 -m x2p_ros.cli data synth --out "$DATA" --cases "$CASES" --size "$SIZE" --seed 1000 --workers "$WORKERS" \
        --quiet
    mkdir -p "$RUNS"
    for model in default baseline; do
        config=$([ $model = default ] && echo cpu || echo cpu-baseline)
        # the shipped model's changes to its preset (its JSON's config_changes), as x2p train --set options
        sets=$(python3 -c 'import json, sys
changes = json.load(open(sys.argv[1])).get("config_changes", {})
text = lambda v: str(v).lower() if isinstance(v, bool) else ",".join(map(str, v)) if isinstance(v, list) else str(v)
print(" ".join(f"--set {k}={text(v)}" for k, v in changes.items()))' "x2p_ros/models/$model.json")
        # shellcheck disable=SC2086  # $sets: one word per option
        setsid nohup python3 -m x2p_ros.cli train --data "$DATA" --config "$config" --out "$RUNS/$model" \
            --epochs "$epochs" --lr 3e-4 --workers "${LOADERS:-7}" --device "$DEVICE" $sets \
            --init "x2p_ros/models/$model.pt" --quiet >"$RUNS/$model.log" 2>&1 &
    done
    sleep $(( ${3:-60} > SECONDS - began ? ${3:-60} - (SECONDS - began) : 1 ))
    ;;
wait)
    sleep "${2:-540}"
    ;;
finish)
    limit=${2:-300}
    # [x]: the pattern does not match a shell whose own command line names it
    while pgrep -f '[x]2p_ros.(ablation_bench|cli train)' >/dev/null && (( SECONDS - began < limit )); do sleep 5; done
    pkill -f '[x]2p_ros.(ablation_bench|cli train)' || true  # past the limit: best.pt stands as it is
    mkdir -p "$RUNS/eval"
    python3 -m x2p_ros.cli data synth --out "$CALIB" --cases 80 --size "$SIZE" --seed 5000 --workers "$WORKERS" \
        --quiet
    for run in "$RUNS"/*/; do
        name=$(basename "$run")
        [ -f "$run/best.pt" ] || continue
        python3 -m x2p_ros.cli evaluate --data "$DATA" --checkpoint "$run/best.pt" --split val --no-realct \
            --device "$DEVICE" --out "$RUNS/eval/$name-val" >/dev/null
        # the presence threshold chosen on held-out cases (a model trained briefly may keep its vertebrae under
        # 0.5; on its training cases a model is surer than on others, and the threshold comes out too high);
        # the table travels in runs.tgz, and `x2p presence` remakes the copy from best.pt at home
        python3 -m x2p_ros.cli presence --data "$CALIB" --checkpoint "$run/best.pt" --split all --limit 80 \
            --device "$DEVICE" --out "$run/calibrated.pt" > "$RUNS/eval/$name-presence.txt" \
            && python3 -m x2p_ros.cli evaluate --data "$DATA" --checkpoint "$run/calibrated.pt" --split val \
                --no-realct --device "$DEVICE" --out "$RUNS/eval/$name-calibrated-val" >/dev/null
        [ -f "$run/result.json" ] || python3 -m x2p_ros.cli evaluate --data "$DATA" --checkpoint "$run/best.pt" \
            --split test --limit 200 --no-realct --device "$DEVICE" --out "$RUNS/eval/$name-test" >/dev/null
    done
    for shipped in default baseline; do
        python3 -m x2p_ros.cli evaluate --data "$DATA" --checkpoint "x2p_ros/models/$shipped.pt" --split val \
            --no-realct --device "$DEVICE" --out "$RUNS/eval/shipped-$shipped-val" >/dev/null
    done
    python3 -c 'import json, sys
for p in sys.argv[1:]:
    m = json.load(open(p))["3d_mm"]
    print("{}: PCL@10 {:.1f} %, MPE {:.2f} mm, missed {} of {}".format(p, 100 * m["pcl@10"], m["mpe"], m["missed"], m["n"]))' \
        "$RUNS"/eval/*/metrics.json || true
    python3 -m x2p_ros.bench --gpu-latency "$RUNS/gpu_latency.json" || true
    python3 -m pytest -q -p no:cacheprovider test/test_cuda_graph.py 2>&1 | tail -n 5 || true
    ;;
*)
    echo "usage: $0 start [EPOCHS] [VARIANTS] [SECONDS] | finetune [EPOCHS] [SECONDS] | wait [SECONDS] |" \
        "finish [SECONDS]" >&2
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
for run in "$RUNS"/*/; do
    [ -f "$run/best.pt" ] && cp "$run/best.pt" "$OUT/$(basename "$run")-best.pt"
done
tar czf "$OUT/runs.tgz" --exclude='*.pt' "$RUNS" "$DATA"/dataset.json "$DATA"/*.txt 2>/dev/null || true
echo "copied to $OUT: $(ls "$OUT" | tr '\n' ' ')"
