#!/usr/bin/env bash
# Counted vs measured on today's hardware: the digits dense, prune_q8 and prune_q4 entries, exported to ONNX and
# timed on ONNX Runtime beside the task's dense float32 model, all in one `python -m scoring measure` run.
#
#   pip install -e ".[deploy]"
#   bash benchmarks/deploy_digits.sh                  # into /tmp/onnx; the table of benchmarks/README.md
#   OUT=/tmp/d THREADS=2 bash benchmarks/deploy_digits.sh
#
# Each recipe is trained into $OUT/<compress> (train/run.py; a finished run is not retrained) and exported to
# $OUT/bundle_<compress>; then the three bundles are measured in one command, which prints the table and writes
# every figure to $OUT/measured.json and the ONNX files to $OUT/onnx. Single-threaded runs, so that other load on a
# shared machine disturbs the timings least.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/onnx}
THREADS=${THREADS:-1}
PYTHON=${PYTHON:-python}
export TQDM_DISABLE=1 OMP_NUM_THREADS=$THREADS
mkdir -p "$OUT"
bundles=()
for compress in none prune_q8 prune_q4; do
    if [ ! -f "$OUT/$compress/report.json" ]; then
        "$PYTHON" train/run.py compress="$compress" hydra.run.dir="$OUT/$compress" > "$OUT/train_$compress.log" 2>&1
    fi
    [ -d "$OUT/bundle_$compress" ] || "$PYTHON" -m scoring.export "$OUT/$compress" --out "$OUT/bundle_$compress"
    bundles+=("$OUT/bundle_$compress")
done
"$PYTHON" -m scoring measure "${bundles[@]}" --threads "$THREADS" --json "$OUT/measured.json" --onnx-dir "$OUT/onnx"
