#!/usr/bin/env bash
# Does every full `compress=auto` digits run exit? N runs in a row, each in a fresh folder, each under `timeout`:
# a run that hangs at exit (e.g. multiprocessing's exit handler joining DataLoader workers) ends with 124.
#
#   nohup bash benchmarks/auto_exits.sh > /tmp/auto20.log 2>&1 &
#   N=5 OUT=/tmp/a5 LIMIT=900 bash benchmarks/auto_exits.sh
#
# The runs keep the default data.num_workers (2): worker processes are what a hang at exit would come from.
# Prints one line per run (exit status, seconds) and a summary; exits with the number of hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${N:-20}
OUT=${OUT:-/tmp/auto20}
LIMIT=${LIMIT:-600}
PYTHON=${PYTHON:-python}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
declare -A count=()
hangs=0
for i in $(seq 1 "$N"); do
    start=$SECONDS
    timeout "$LIMIT" "$PYTHON" train/run.py compress=auto data.val_split=0.2 hydra.run.dir="$OUT/$i" \
        > "$OUT/logs/$i.log" 2>&1
    rc=$?
    count[$rc]=$(( ${count[$rc]:-0} + 1 ))
    [ "$rc" -eq 124 ] && hangs=$((hangs + 1))
    echo "run $i: exit $rc in $((SECONDS - start)) s: $(grep -m1 -o 'gate [A-Z]*: top-1 [0-9/]*' "$OUT/logs/$i.log")"
done
summary=""
for rc in "${!count[@]}"; do summary+=" exit $rc: ${count[$rc]};"; done
echo "$N runs:$summary hangs (exit 124): $hangs"
exit "$hangs"
