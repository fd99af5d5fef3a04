#!/usr/bin/env bash
# Trains the default model shipped in x2p_ros/models/ (resumable: run it again
# to continue). CPU: the "cpu" preset at 256 px; with a GPU pass CONFIG=paper SIZE=512.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-cpu}
SIZE=${SIZE:-256}
CASES=${CASES:-320}
SEED=${SEED:-1000}
DATA=${DATA:-data/bispinex-$SIZE-s$SEED}
RUN=${RUN:-runs/default-$CONFIG}
EPOCHS=${EPOCHS:-60}
$PY -m x2p_ros.cli data synth --out "$DATA" --cases "$CASES" --size "$SIZE" --seed "$SEED" --quiet
$PY -m x2p_ros.cli train --data "$DATA" --config "$CONFIG" --out "$RUN" --epochs "$EPOCHS" --workers 1 \
  --quiet ${TIME_LIMIT:+--time-limit "$TIME_LIMIT"}
