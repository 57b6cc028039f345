#!/usr/bin/env bash
# The GPU measurement of a decoding step at LLaDA-8B shapes, sized for one device call of at most 8 minutes.
#
#   bash scripts/measure-gpu.sh STAGE [PROMPT_LEN ...]
#
# STAGE:
#   all        everything below in one call (about 7 minutes on an H100/H200): `main` at each prompt length
#              (default 1024 512), then `tests`
#   main       the torch backend with CUDA graphs and Triton kernels (--profile), then the plain unfused
#              path (the "before" of the same run), at each prompt length given
#   kernels    versions and the kernel tests only (each Triton kernel vs its torch twin on the GPU)
#   verify     the fused path only (two warm-up rounds): profiled at the first prompt length, then the GPU
#              tests, attention backends timed at the step's shapes (scripts/sdpa-backends.py), the
#              roofline's figures measured and its prediction of the profiled step (roofline measure/compare
#              --figures), `dcu` and `dcu+apd` with the split-KV attention kernel (--attention split-kv),
#              the host work between two graph replays on this machine's CPU, one sequence and a batch of 16
#              (scripts/host-overhead.py),
#              and the other prompt lengths unprofiled (about 7 minutes)
#   buckets    the default `dcu` and `dcu+apd` (proportional budgets) at the first prompt length on three new
#              prompts without warm-up, with bucketed row counts (the default with graphs), with one bucket
#              for every layer of a step (--step-bucket-slack inf) and with exact ones (--no-row-buckets),
#              one run each (about 4 minutes)
#   tests      versions and the GPU tests (kernels vs twins, graph replay == eager, Triton path == plain path)
#   batch      batched decoding at the first prompt length (default 512): `full`, `dcu` and `dcu+apd` at
#              batch 1, 4 and 16 side by side (dllm-bench --batch 1,4,16, 16 prompts; `dcu` and `dcu+apd`
#              also profiled at each size: kernels per batched step), about 8 minutes
#   torch      the torch-backend benches only, per prompt length
#   ort        the same on ONNX Runtime's CUDA provider; needs onnxruntime-gpu staged beforehand with
#              ../shared/tools/device-wheels onnxruntime-gpu==1.31.1 and PYTHONPATH / LD_LIBRARY_PATH exported
#
# Every bench runs METHODS side by side in one process (budget 32, window 32, uniform allocation) and writes
# bench-BACKEND-pPROMPT.json/.png under $OUT (default ./gpu-out); all output also goes to $OUT/log.txt.
# One failing step does not stop the others; the exit status is the number of failed steps.
#
# Environment (defaults): SHAPE=llada-8b DEVICE=cuda DTYPE=bf16 GEN=256 BLOCK=32 OUT=gpu-out
# FIGURES (verify: the roofline's device figures; default h200 on an H200, h100-sxm otherwise)
# A CPU smoke run: DEVICE=cpu DTYPE=fp32 SHAPE=spec.json GEN=16 BLOCK=16 bash scripts/measure-gpu.sh torch 32
set -u
stage=${1:?usage: bash scripts/measure-gpu.sh all|main|verify|buckets|kernels|tests|batch|torch|ort [PROMPT_LEN ...]}
shift
prompts=("$@")
[ $# -eq 0 ] && prompts=(1024 512)
OUT=${OUT:-gpu-out}
SHAPE=${SHAPE:-llada-8b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
GEN=${GEN:-256}
BLOCK=${BLOCK:-32}
METHODS=${METHODS:-full,dual+threshold,dcu@allocation=uniform,dcu+apd@allocation=uniform}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
failed=0

step() {   # step NAME SECONDS CMD...: run with a time limit, log to $OUT/log.txt, count failures
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "SyncActivityProfilerHandler" | tee -a "$OUT/log.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)" | tee -a "$OUT/log.txt"; failed=$((failed + 1)); }
}

bench() {  # bench NAME PROMPT KERNELS BACKEND SECONDS [extra flags]: one dllm-bench run
    local name=$1 p=$2 kernels=$3 backend=$4 limit=$5
    shift 5
    step "$name" "$limit" python3 -m dllm.tools.bench --random-weights "$SHAPE" --backend "$backend" \
        --device "$DEVICE" --dtype "$DTYPE" --kernels "$kernels" --methods "$METHODS" --prompt-len "$p" \
        --gen-length "$GEN" --block-length "$BLOCK" --steps "$GEN" --num-prompts "${NUM_PROMPTS:-1}" --repeat 1 --warmup "${WARMUP:-1}" \
        --json "$OUT/$name.json" "$@"
}

versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/log.txt"
    python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tee -a "$OUT/log.txt"
    python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$OUT/log.txt"
}

gpu_tests() {
    step gpu-tests "${1:-300}" python3 -m pytest -q tests/runtime/test_cuda_graphs.py tests/kernels
}

main_benches() {   # main_benches PROMPT...: fused (profiled) and plain side by side per prompt length
    for p in "$@"; do
        bench "bench-torch-p$p" "$p" auto torch 150 --profile --plot "$OUT/bench-torch-p$p.png"
        bench "bench-plain-p$p" "$p" plain torch 110
    done
}

fused_benches() {  # fused_benches PROMPT...: the fused path only, profiled, two warm-up rounds
    for p in "$@"; do
        WARMUP=2 bench "bench-torch-p$p" "$p" auto torch 120 --profile --plot "$OUT/bench-torch-p$p.png"
    done
}

if ! python3 -c "import dllm.tools.bench" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
fi

case "$stage" in
all)
    versions
    main_benches "${prompts[@]}"
    gpu_tests 200
    ;;
main)
    versions
    main_benches "${prompts[@]}"
    ;;
verify)
    versions
    fused_benches "${prompts[0]}"
    gpu_tests 100
    step sdpa-backends 40 python3 scripts/sdpa-backends.py
    # the Python a step's GPU waits through between two replays, on this host's CPU (no GPU work)
    step host-overhead 40 python3 scripts/host-overhead.py --json "$OUT/host-overhead.json"
    step host-overhead-b16 60 python3 scripts/host-overhead.py --batch 16 --repeat 2 --methods dcu,dcu+apd \
        --json "$OUT/host-overhead-b16.json"
    # the roofline's figures measured on this GPU, and its prediction of the step just measured (docs/jetson.md)
    fig=${FIGURES:-$(python3 -c "import torch; print('h200' if 'H200' in torch.cuda.get_device_name(0) else 'h100-sxm')")}
    step roofline-measure 60 python3 -m dllm.tools.roofline measure --device-figures "$fig" \
        --json "$OUT/roofline-figures.json"
    step roofline-compare 20 python3 -m dllm.tools.roofline compare "$OUT/bench-torch-p${prompts[0]}.json" \
        --device "$fig" --figures "$OUT/roofline-figures.json" --json "$OUT/roofline-compare.json"
    # the same step with the split-KV attention kernel (opt-in until this comparison favours it)
    METHODS=dcu@allocation=uniform,dcu+apd@allocation=uniform WARMUP=2 bench "bench-splitkv-p${prompts[0]}" \
        "${prompts[0]}" auto torch 90 --attention split-kv
    for p in "${prompts[@]:1}"; do
        WARMUP=2 bench "bench-torch-p$p" "$p" auto torch 75 --plot "$OUT/bench-torch-p$p.png"
    done
    ;;
buckets)
    versions
    p=${prompts[0]}
    # the default DCU (proportional budgets) on three different prompts and no warm-up, what a stream of new
    # prompts sees (mean: graph captures included; p50: once captured), with bucketed row counts, one bucket
    # per step, and exact row counts
    for rows in bucketed one-bucket exact; do
        flag=()
        [ "$rows" = one-bucket ] && flag=(--step-bucket-slack inf)
        [ "$rows" = exact ] && flag=(--no-row-buckets)
        METHODS=dcu,dcu+apd NUM_PROMPTS=3 WARMUP=0 bench "bench-proportional-$rows-p$p" "$p" auto torch 100 \
            ${flag[@]+"${flag[@]}"}
    done
    ;;
kernels)
    versions
    step kernel-tests 120 python3 -m pytest -q tests/kernels
    ;;
tests)
    versions
    gpu_tests 300
    ;;
batch)
    versions
    p=${prompts[0]}
    [ $# -eq 0 ] && p=512
    # full at batch 16 is compute-bound (16 x 768 rows per layer): it gets its own run and time limit
    export NUM_PROMPTS=16
    METHODS=full bench "bench-batch-full-p$p" "$p" auto torch 320 --batch 1,4,16
    # --profile: kernels and GPU idle time per batched step at each size (one batch of prompts each)
    METHODS=dcu@allocation=uniform,dcu+apd@allocation=uniform bench "bench-batch-dcu-p$p" "$p" auto torch 220 \
        --batch 1,4,16 --profile
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
        bench "bench-$stage-p$p" "$p" auto "$backend" 560 --profile --plot "$OUT/bench-$stage-p$p.png"
    done
    ;;
*)
    echo "unknown stage '$stage': expected all, main, verify, buckets, kernels, tests, batch, torch or ort"
    exit 2
    ;;
esac
echo "== done: $failed failed step(s)" | tee -a "$OUT/log.txt"
exit "$failed"
