#!/usr/bin/env bash
# The GPU measurement of docs/benchmarks.md, in as few calls as possible (each stage fits in 10 minutes).
#
#   bash scripts/measure-gpu.sh STAGE [PROMPT_LEN ...]
#
# STAGE:
#   tests      versions, the GPU tests (CUDA-graph replay == eager, token for token)
#   torch      dllm-bench, torch backend with CUDA graphs, per prompt length (default 1024 512)
#   ort        the same on ONNX Runtime's CUDA provider; needs onnxruntime-gpu, staged beforehand with
#              ../shared/tools/device-wheels onnxruntime-gpu==1.31.1 (five back-to-back calls) and
#              PYTHONPATH / LD_LIBRARY_PATH exported as that tool prints
#
# Every bench runs full, dcu and dcu+apd (budget 32, window 32, uniform allocation: two row-count buckets
# per layer) side by side in one process, then profiles one generation per method (--profile), and
# writes bench-BACKEND-pPROMPT.json/.png under $OUT (default ./gpu-out). One failing step does not stop
# the others; the exit status is the number of failed steps.
#
# Environment (defaults: the settings of docs/benchmarks.md): SHAPE=llada-8b DEVICE=cuda DTYPE=bf16 GEN=256 BLOCK=32 OUT=gpu-out
# A CPU smoke run of this script: DEVICE=cpu DTYPE=fp32 SHAPE=spec.json GEN=16 bash scripts/measure-gpu.sh torch 32
set -u
stage=${1:?usage: bash scripts/measure-gpu.sh tests|torch|ort [PROMPT_LEN ...]}
shift
prompts=("$@")
[ $# -eq 0 ] && prompts=(1024 512)
OUT=${OUT:-gpu-out}
SHAPE=${SHAPE:-llada-8b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
GEN=${GEN:-256}
BLOCK=${BLOCK:-32}
METHODS=${METHODS:-full,dcu@allocation=uniform,dcu+apd@allocation=uniform}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
failed=0

step() {   # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, count failures
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; failed=$((failed + 1)); }
}

if ! python3 -c "import dllm.tools.bench" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
fi

case "$stage" in
tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| onnxruntime', o.__version__, o.get_available_providers())"
    step gpu-tests 300 python3 -m pytest -q tests/runtime/test_cuda_graphs.py tests/engines
    ;;
torch | ort)
    backend=$stage
    [ "$stage" = ort ] && backend=onnxruntime
    if [ "$stage" = ort ] && [ "$DEVICE" != cpu ] && ! python3 -c \
        "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
        echo "onnxruntime has no CUDAExecutionProvider here: stage onnxruntime-gpu first (see the header)"
        exit 1
    fi
    for p in "${prompts[@]}"; do
        step "bench-$stage-p$p" 560 python3 -m dllm.tools.bench --random-weights "$SHAPE" --backend "$backend" \
            --device "$DEVICE" --dtype "$DTYPE" --methods "$METHODS" --prompt-len "$p" --gen-length "$GEN" \
            --block-length "$BLOCK" --steps "$GEN" --num-prompts 1 --repeat 1 --warmup 1 --profile \
            --json "$OUT/bench-$stage-p$p.json" --plot "$OUT/bench-$stage-p$p.png"
    done
    ;;
*)
    echo "unknown stage '$stage': expected tests, torch or ort"
    exit 2
    ;;
esac
exit "$failed"
