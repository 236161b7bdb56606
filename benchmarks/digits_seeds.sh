#!/usr/bin/env bash
# Every compress recipe on digits, seeds 0-4: does each pass the gate (>= 342/360) on every seed?
#
#   bash benchmarks/digits_seeds.sh                          # all of conf/compress/, seeds 0-4, into outputs/seeds
#   OUT=/tmp/s SEEDS="0 1" CONFIGS="prune_q4 auto_digits" bash benchmarks/digits_seeds.sh
#
# Per seed it trains the baseline once (compress=none, into $OUT/digits_cnn/none/seed<S>) and starts every other
# recipe from it (init=); CPU runs are deterministic and the baseline stage of a from-scratch run is that very
# training, so this skips only repeated work (checked for prune_q4 seed 0 with the same thread count: the same
# report.json, to the last digit of score and loss; see benchmarks/README.md). The thread count matters: runs
# with OMP_NUM_THREADS=1 and with 2 threads differ by a test image or so.
# Runs are sequential, in the background-friendly form (no progress bars, one log per run under $OUT/logs);
# a failed run is reported and the next one still runs. Finished runs are not retrained when the script is run
# again (train/run.py resumes). At the end it prints the table of `python -m train.search.compare $OUT`.
# EXTRA holds overrides for every run (e.g. EXTRA="data.val_split=0.2").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/seeds}
SEEDS=${SEEDS:-0 1 2 3 4}
CONFIGS=${CONFIGS:-$(ls conf/compress/ | sed -n 's/\.yaml$//p' | grep -vx none | tr '\n' ' ')}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
failed=0

run() {  # run NAME OVERRIDES...: one train/run.py call, its output in $OUT/logs/NAME.log
    local name=$1
    shift
    local start=$SECONDS
    # shellcheck disable=SC2086  # EXTRA is a list of overrides
    if "$PYTHON" train/run.py "$@" data.num_workers=0 $EXTRA > "$OUT/logs/$name.log" 2>&1; then
        echo "$name: done in $((SECONDS - start)) s: $(grep -m1 -o 'gate [A-Z]*: top-1 [0-9/]*' "$OUT/logs/$name.log")"
    else
        echo "$name: FAILED (exit $?), see $OUT/logs/$name.log: $(tail -n 1 "$OUT/logs/$name.log")"
        failed=$((failed + 1))
    fi
}

for seed in $SEEDS; do
    base="$OUT/digits_cnn/none/seed$seed"
    run "none_seed$seed" compress=none seed="$seed" hydra.run.dir="$base"
    for config in $CONFIGS; do
        run "${config}_seed$seed" compress="$config" seed="$seed" init="$base" \
            hydra.run.dir="$OUT/digits_cnn/$config/seed$seed"
    done
done
"$PYTHON" -m train.search.compare "$OUT"
exit "$failed"
