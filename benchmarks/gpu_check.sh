#!/usr/bin/env bash
# The one prepared run for a lent GPU: benchmarks and the CUDA paths the CPU suite cannot execute.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, results under $OUT (default gpu_check/)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # the same steps, tiny, on CPU: checks the script itself
#
# Steps (each with its own time limit; a failed step is reported and the next one still runs):
#   env       GPU model, driver, torch / CUDA versions
#   speed     benchmarks/train_speed.py: plain vs ours vs ours + prune + QAT8       -> speed.json
#   compile   the same for resnet18_cifar with torch.compile (one repeat): fuses QAT's element-wise ops -> speed_compile.json
#   digits    train/run.py on digits, dense: the cuDNN batch-norm variant folded by the scorer -> digits_report.json
#   digits_count  that report's counts equal a CPU count of the same architecture
#   cifar     train/run.py on a generated CIFAR-100 fixture with the GPU-resident loader, prune_q8, under
#             torchrun (nccl)                                                        -> cifar_report.json
#   tests     the CPU test suite on that machine's torch, in parallel
# Everything printed goes to $OUT/gpu_check.log as well. Exit status: the number of failed steps.
#
# The GPU machine has no package registry and lacks hydra-core, omegaconf and antlr4; their wheels travel in
# .whl/ (see benchmarks/README.md, "GPU check") and are installed into /tmp/site here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failed=0

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "could not install the wheels in .whl/" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# step NAME SECONDS COMMAND...: run it with a time limit, its output into the log, a one-line verdict.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ]; then
        failed=$((failed + 1))
        tail -n 15 "$LOG"
    fi
}

if [ "$QUICK" = 1 ]; then
    models=(resnet18_cifar)
    speed_args=(--steps 2 --warmup 1 --batch-size 8 --repeats 1)
    run_args=(train.epochs=1 score.examples=16)
    test_args=(-m "not slow")
    per_class=2
else
    models=(resnet18_cifar efficientnet_b0_cifar)
    speed_args=()
    run_args=()
    test_args=()
    per_class=20
fi
"$PYTHON" -c "import xdist" 2> /dev/null && test_args+=(-n 8)

step env 60 "$PYTHON" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| cudnn', torch.backends.cudnn.version())
if torch.cuda.is_available():
    print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, 'GiB')
"
command -v nvidia-smi > /dev/null && nvidia-smi >> "$LOG" 2>&1

step speed 300 "$PYTHON" benchmarks/train_speed.py --device "$DEVICE" --models "${models[@]}" "${speed_args[@]}" \
    --json "$OUT/speed.json"
step compile 240 "$PYTHON" benchmarks/train_speed.py --device "$DEVICE" --models resnet18_cifar \
    --compile --repeats 1 "${speed_args[@]}" --json "$OUT/speed_compile.json"

step digits 180 "$PYTHON" train/run.py device="$DEVICE" "${run_args[@]}" hydra.run.dir="$WORK/digits"
cp "$WORK/digits/report.json" "$OUT/digits_report.json" 2> /dev/null
# The dense model trained on the device must count exactly as the same architecture counted on the CPU.
step digits_count 60 "$PYTHON" -c "
import json, subprocess, sys
subprocess.run([sys.executable, '-m', 'scoring', '--model', 'digits_cnn', '--task', 'digits',
                '--json', '$WORK/cpu_count.json'], check=True, stdout=subprocess.DEVNULL)
trained, cpu = (json.load(open(f'$WORK/{name}.json')) for name in ('digits/report', 'cpu_count'))
fields = ('param_bits', 'mults', 'adds', 'freebie')
print({key: (trained[key], cpu[key]) for key in fields})
sys.exit(any(trained[key] != cpu[key] for key in fields))
"

step fixture 60 "$PYTHON" -c "from tests.fixtures import make_cifar100; make_cifar100('$WORK/cifar', train_per_class=$per_class)"
step cifar 240 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 train/run.py task=cifar100 \
    model=resnet18_cifar compress=prune_q8 device="$DEVICE" data.root="$WORK/cifar" data.num_workers=0 \
    train.epochs=1 train.batch_size=64 train.eval_batch_size=64 "${run_args[@]}" \
    hydra.run.dir="$WORK/cifar_run"
cp "$WORK/cifar_run/report.json" "$OUT/cifar_report.json" 2>/dev/null

step tests 300 "$PYTHON" -m pytest tests -q -x -p no:cacheprovider "${test_args[@]}"

echo "== $failed step(s) failed; log: $LOG" | tee -a "$LOG"
exit "$failed"
