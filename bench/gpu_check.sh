#!/usr/bin/env bash
# The GPU check, prepared to run as-is from a fresh clone's root on a machine with one CUDA GPU:
#
#   bash bench/gpu_check.sh
#
# It installs nothing beyond the README's set-up (`make setup`: .venv with the pinned torch and the project),
# then runs, each under its own `timeout` (the timeouts sum to about 9 minutes; the set-up is not counted):
#   1. the test suite (what `make test` runs; no test takes a device, so it runs on the CPU here too);
#   2. the torch.compile equality test on the GPU (compiled refiner step = eager, outputs and gradients);
#   3. bf16 autocast training on the GPU: 20 phase-1 steps of configs/tiny_refiner.yaml (the embedded default);
#   4. sampling on the GPU with a bf16 backbone from that run: the exact sampler, then threshold + dual cache;
#   5. bench/bench_sampler.py on the GPU (bf16): decoding modes, refiner share at K = 1, 4 with its floor;
#   6. bench/bench_sampler.py --wide: the shipped recipe (every chunk, no halting, K = 4; slot and MLP) on a
#      random LLaDA-8B-wide backbone of 4 layers against its FLOP and weight-read floors (extrapolated to 32
#      layers, labelled so);
#   6b. bench/bench_load_memory.py --layers 8: loading a random sharded bf16 checkpoint of LLaDA-8B's width
#      (4 GB): peak RSS over the weights, whole-tensor vs sliced finiteness scan (host memory);
#   7. bench/bench_compile.py on the GPU at LLaDA-8B width: the refiner step and the cached phase-1 step,
#      eager vs compiled;
#   8. bench/bench_training.py on the GPU (bf16 autocast): feature cache vs live on the embedded backbone and on
#      a random LLaDA-8B-wide backbone of 4 layers (extrapolated to 32, labelled so);
# and prints one table. Exit status: 0 when every step passed (or there is no GPU), 1 otherwise.
#
# Without a CUDA device it prints "no CUDA device: skipping the GPU checks" and exits 0 before any set-up.
# Knobs (environment): GPU_CHECK_PY=python  use that interpreter (with PYTHONPATH=src) instead of `make setup`,
# for a machine that cannot reach the package index; GPU_CHECK_DEVICE=cpu  dry-run every step on the CPU
# (checks this script itself; slow); GPU_CHECK_OUT=DIR  keep the logs there (default: a temporary folder).
set -u
cd "$(dirname "$0")/.." || exit 1

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
skip() {
    echo "no CUDA device: skipping the GPU checks ($1)"
    exit 0
}
if [ "$DEVICE" = cuda ]; then
    command -v nvidia-smi >/dev/null 2>&1 || skip "nvidia-smi not found"
    nvidia-smi -L >/dev/null 2>&1 || skip "nvidia-smi lists no GPU"
fi

OUT="${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

# ------------------------------------------------------------------ set-up (the README's, nothing more)
if [ -n "${GPU_CHECK_PY:-}" ]; then
    PY="$GPU_CHECK_PY"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    echo "set-up: using $PY with PYTHONPATH=src (GPU_CHECK_PY)"
else
    echo "set-up: make setup (first use: creates .venv and installs the pinned torch; log $OUT/setup.log)"
    if ! timeout 900 make setup >"$OUT/setup.log" 2>&1; then
        tail -n 20 "$OUT/setup.log"
        echo "set-up failed (see $OUT/setup.log); on a machine without the package index, rerun with"
        echo "GPU_CHECK_PY=<a python with torch and this project's dependencies> bash bench/gpu_check.sh"
        exit 1
    fi
    PY=.venv/bin/python
fi
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
        || skip "$("$PY" -c 'import torch; print("torch", torch.__version__, "sees none")' 2>&1 | tail -n 1)"
    "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
fi

# ------------------------------------------------------------------ steps
NAMES=() STATUS=() SECONDS_TAKEN=() RESULTS=()
FAILED=0

# step NAME TIMEOUT_S COMMAND...: run it, log to $OUT/NAME.log, record status and seconds.
step() {
    local name="$1" limit="$2"
    shift 2
    echo
    echo "== $name (timeout ${limit}s): $*"
    local start=$SECONDS rc=0
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT"
    elif [ "$rc" -ne 0 ]; then
        status="FAIL rc=$rc"
    fi
    [ "$status" = ok ] || { FAILED=1; tail -n 25 "$OUT/$name.log"; }
    tail -n 3 "$OUT/$name.log"
    NAMES+=("$name") STATUS+=("$status") SECONDS_TAKEN+=($((SECONDS - start)))
}

# result TEXT: the one-line result of the last step (shown in the table).
result() { RESULTS+=("$1"); }

# json_get FILE PYTHON_EXPRESSION (of `d`, the parsed file): a line of text, or "-" when it cannot be read.
json_get() {
    "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null || echo "-"
}

step tests 135 "$PY" -m pytest -p no:cacheprovider  # the project's addopts give -q
result "$(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.log" | tail -n 1)"

step compile_test 60 env LLADA_TRM_COMPILE_TESTS=1 LLADA_TRM_TEST_DEVICE="$DEVICE" "$PY" -m pytest \
    -p no:cacheprovider -rs tests/test_compile_refiner.py -k matches_eager
result "$(grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/compile_test.log" | tail -n 1)"

RUN="$OUT/train"
step train_bf16 40 "$PY" -m llada_trm train --config configs/tiny_refiner.yaml \
    --device "$DEVICE" --set training.mixed_precision=bf16 --set training.max_steps=20 \
    --set training.eval_every=10 --set training.save_every=10 --log-every 5 \
    --out "$RUN" --no-progress
result "$(grep -o 'device [a-z0-9:]*, autocast [a-z0-9.]*' "$OUT/train_bf16.log" | tail -n 1); \
$(grep -o 'train loss [0-9.]*; val loss [0-9.]*' "$OUT/train_bf16.log" | tail -n 1)\
$([ -d "$RUN/checkpoints/last" ] || echo '; no checkpoint')"

for mode in exact dual; do
    extra=()
    [ "$mode" = dual ] && extra=(--threshold 0.9 --cache dual)
    step "eval_$mode" 25 "$PY" -m llada_trm eval --checkpoint "$RUN" --device "$DEVICE" --dtype bfloat16 \
        --limit 32 --batch-size 16 --gen-length 64 --steps 64 --block-length 32 --out "$OUT/eval_$mode" \
        --no-progress "${extra[@]}"
    result "$(json_get "$OUT/eval_$mode/summary.json" \
        "f\"strict {d['accuracy_strict']:.3f} of {d['n']}, {d['speed']['tokens_per_s']:.0f} tok/s, \
NFE {d['speed']['nfe']}\"")"
done

step bench_sampler 45 "$PY" bench/bench_sampler.py --device "$DEVICE" --dtype bfloat16 --threads 4 \
    --n-problems 32 --batch-size 16 --gen-length 128 --block-length 32 --ks 1,4 --json "$OUT/sampler.json"
result "$(json_get "$OUT/sampler.json" "'; '.join(
    f\"{r['mode'].split(' + ')[-1]} {r['variant']}: {100 * r['overhead_measured']:+.1f}% vs floor \
{100 * r['overhead_floor']:+.2f}% ({r['measured_over_floor']:.2f}x)\"
    for r in d['refiner share'] if r['variant'].startswith('K=4 selective'))")"

step bench_sampler_wide 45 "$PY" bench/bench_sampler.py --wide --wide-layers 4 --device "$DEVICE" \
    --threads 4 --json "$OUT/sampler_wide.json"
result "$(json_get "$OUT/sampler_wide.json" "'; '.join(
    f\"{r['variant']} {r['label']}: K=4 adds {100 * r['overhead_measured']:+.2f}% (FLOP floor \
{100 * r['overhead_floor']:+.2f}%, weight-read floor {100 * r['overhead_read_floor']:+.2f}%)\" for r in d['table'])")"

step load_memory_8b 90 "$PY" bench/bench_load_memory.py --layers 8 --repeats 1 --json "$OUT/load_memory.json"
result "$(json_get "$OUT/load_memory.json" "'; '.join(
    f\"{name} scan: peak {r['extra'] / 1e9:.2f} GB over baseline = {r['ratio']:.3f}x the weights\"
    for name, r in d.items())")"

step bench_compile 60 "$PY" bench/bench_compile.py --device "$DEVICE" --shapes wide --repeats 5 \
    --json "$OUT/compile.json"
result "$(json_get "$OUT/compile.json" "'; '.join(
    f\"{r['shape'].split(' (')[0]} {r['measure']}: {r['speedup']:.2f}x, 1st call {r['first_compiled_call_s']:.0f} s\"
    for r in d)")"

step bench_training_wide 45 "$PY" bench/bench_training.py --device "$DEVICE" --mixed-precision bf16 \
    --threads 4 --steps 12 --wide-layers 4 --wide-steps 8 --wide-batch-size 4 --json "$OUT/training.json"
result "$(json_get "$OUT/training.json" "'; '.join(
    f\"{s['case'].split(' (')[0]}: cached {s['speedup_same_batches']:.1f}x live\" + (
    f\", {s['speedup_extrapolated_32_layers']:.0f}x extrapolated to 32 layers\"
    if s['speedup_extrapolated_32_layers'] else '') for s in d)")"

# ------------------------------------------------------------------ the table
echo
echo "GPU check on $DEVICE, logs in $OUT"
printf '%-20s %-12s %6s  %s\n' step status seconds result
for i in "${!NAMES[@]}"; do
    printf '%-20s %-12s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" "${RESULTS[$i]:--}"
done
exit "$FAILED"
