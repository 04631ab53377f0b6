#!/usr/bin/env bash
# Issue 4 on a CUDA machine: the same speed and memory ratios as on the CPU, in milliseconds and
# MiB, for ResNet-50 at batch 1 and 8. ORT columns use CUDAExecutionProvider when onnxruntime-gpu
# is installed (pip install 'tsgb-fx[gpu]'), and are skipped otherwise. Finishes in under 5
# minutes for ResNet-50 (each step has a hard timeout); never run by the tests.
#
#   benchmarks/gpu.sh                     # from the repository root, with .venv or python3 on PATH
#   RESULTS=/some/dir benchmarks/gpu.sh   # where the JSON/markdown go (default: $OUT if set, else
#                                         # benchmarks/results/gpu)
#
# Overrides for a smoke test without a GPU: DEVICE=cpu MODELS=resnet18 SIZE=64 REPEATS=1 ONNX=0
# More models need longer step limits: all five took 100 s of speed and 200 s of memory (a fresh
# process of 13 s per model and case) on an H100, e.g. SPEED_SECONDS=240 MEMORY_SECONDS=240.
# COMPILE=1 adds compile=True (one cold torch.compile per model and batch size, each model in its
# own run of at most COMPILE_SECONDS, default 150) for COMPILE_MODELS (default: MODELS). On an
# H200 that took 44-88 s per model, and about 190 s for DenseNet-121 (cold compiles of 83 and
# 99 s; COMPILE_SECONDS=300 fits it).
# TESTS=1 (the default) first runs the tests that skip without a GPU (CUDA against CPU maps,
# CUDA graphs), at most TESTS_SECONDS (default 240); TESTS=0 skips them.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-resnet50}
SIZE=${SIZE:-224}
REPEATS=${REPEATS:-20}
WARMUP=${WARMUP:-3}
ONNX=${ONNX:-1}
SPEED_SECONDS=${SPEED_SECONDS:-90}
COMPILE=${COMPILE:-0}
COMPILE_SECONDS=${COMPILE_SECONDS:-150}
COMPILE_MODELS=${COMPILE_MODELS:-$MODELS}
TESTS=${TESTS:-1}
TESTS_SECONDS=${TESTS_SECONDS:-240}
MEMORY_SECONDS=${MEMORY_SECONDS:-55}
RESULTS=${RESULTS:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$RESULTS"
started=$(date +%s)

echo "== machine"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - "$DEVICE" <<'EOF' || exit 1
import sys, torch
device = sys.argv[1]
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), threads {torch.get_num_threads()}")
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: install a CUDA build of torch or run with DEVICE=cpu")
if device.startswith("cuda"):
    print("device:", torch.cuda.get_device_name())
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError:
    print("onnxruntime not installed: ORT columns skipped")
EOF

tests_rc=0
if [ "$TESTS" = 1 ]; then
    echo "== tests that need CUDA (they skip elsewhere), slow ones included"
    timeout "$TESTS_SECONDS" "$PY" -m pytest -p no:cacheprovider -rs -m "slow or not slow" -k cuda \
        tests/test_explainer.py tests/test_compiled.py tests/test_cli.py 2>&1 | tee "$RESULTS/tests.txt"
    tests_rc=${PIPESTATUS[0]}
    [ $tests_rc = 0 ] || echo "tests: exit $tests_rc (124 = ran past its $TESTS_SECONDS s)"
fi

# speed NAME SECONDS MODELS FLAGS...: one benchmarks.speed run (batch 1 and 8) under a hard
# timeout, written to $RESULTS/NAME.json and NAME.md; returns its exit status
speed() {
    local name=$1 seconds=$2 models=$3
    shift 3
    timeout "$seconds" "$PY" -m benchmarks.speed --device "$DEVICE" --models $models --batch-sizes 1 8 \
        --size "$SIZE" --repeats "$REPEATS" --warmup "$WARMUP" "$@" \
        --json-out "$RESULTS/$name.json" --markdown-out "$RESULTS/$name.md"
    local rc=$?
    [ $rc = 0 ] || echo "$name: exit $rc (124 = ran past its $seconds s)"
    return $rc
}

echo "== speed, torch (ms and ratio to the plain forward)"
speed speed "$SPEED_SECONDS" "$MODELS" --no-onnx
speed_rc=$?

echo "== memory (peak above the state before the call; explain vs forward with a grad-requiring input)"
timeout "$MEMORY_SECONDS" "$PY" -m benchmarks.memory --device "$DEVICE" --models $MODELS --batch-sizes 1 8 --size "$SIZE" \
    --cases forward_grad gradient tsgb_eager \
    --json-out "$RESULTS/memory.json" --markdown-out "$RESULTS/memory.md"
memory_rc=$?
[ $memory_rc = 0 ] || echo "memory: exit $memory_rc (124 = ran past its $MEMORY_SECONDS s)"

# compile=True and ORT last: cold compiles and the two ONNX exports take the longest, and the
# torch numbers above are then already safe.
compile_rc=0
if [ "$COMPILE" = 1 ]; then
    echo "== compile=True (torch.compile of the explicit graph; cold compile time in the one-off table)"
    for model in $COMPILE_MODELS; do
        speed "compile_$model" "$COMPILE_SECONDS" "$model" --no-onnx --no-explicit --compile || compile_rc=1
    done
fi

ort_rc=0
if [ "$ONNX" = 1 ] && "$PY" -c "import sys, onnxruntime as o; sys.exit('CUDAExecutionProvider' not in o.get_available_providers() and '$DEVICE' != 'cpu')" 2>/dev/null; then
    echo "== speed with onnxruntime (ORT ratio: the exported explainer to ORT's own forward)"
    speed speed_ort 130 "$MODELS" --no-explicit
    ort_rc=$?
else
    echo "== onnxruntime: no CUDAExecutionProvider (pip install 'tsgb-fx[gpu]'), or ONNX=0: ORT skipped"
fi

echo "== done in $(( $(date +%s) - started )) s; results in $RESULTS"
[ $tests_rc = 0 ] && [ $speed_rc = 0 ] && [ $compile_rc = 0 ] && [ $memory_rc = 0 ] && [ $ort_rc = 0 ]
