#!/bin/bash
# The GPU checks in one run, each step under its own time limit, every step's output kept in
# $OUT (default ./gpu-results) as it finishes, so a run cut short keeps what it measured:
#   1. the CUDA tests (tests/unit/test_on_cuda.py, the CUDA decoding checks);
#   2. generation: the built-in loop compiled / dynamic vs transformers' generate, then one
#      profiled generation per side ($OUT/profile-SIDE.txt: device-busy share, CUDA graph and
#      kernel launches a step, top kernels; $OUT/stderr-SIDE.txt: why graphs were skipped);
#   3. SFT and DPO vs TRL, activations checkpointed on both sides, ours also with the logits
#      materialised (--no-chunked-lm-head);
#   4. GRPO vs TRL, 64 completions x 256 tokens a step.
# Offline machines: put wheels of what is missing (trl, datasets, dill, multiprocess and this
# package's server dependencies: docs/distributed.md) in .whl/ first; this package runs from
# the checkout. Limits: GPU_CHECK_SCALE=2 doubles every step's time limit. One device call may
# run 600 s, less than all four steps' limits together: STEPS picks steps, e.g.
#   STEPS="tests generation" bash benchmarks/gpu_check.sh    (limits 90 + 210 s)
#   STEPS="train grpo" bash benchmarks/gpu_check.sh          (limits 240 + 240 s)
# (default: all four, for a machine without that limit).
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
SCALE=${GPU_CHECK_SCALE:-1}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-check-site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/gpu-check-site:$PWD/src:$PWD
else
    export PYTHONPATH=$PWD/src:$PWD
fi
START=$(date +%s)
STEPS=${STEPS:-tests generation train grpo}
step() {  # step NAME SECONDS COMMAND...  (skipped unless NAME is in $STEPS)
    local name=$1 limit=$(( $2 * SCALE )); shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit}s) at +$(( $(date +%s) - START ))s"
    timeout "$limit" "$@" 2>&1 | grep -v "Writing model\|Loading weights" | tee "$OUT/$name.log" \
        | tail -40
}
{ nvidia-smi -L; $PY -c "import torch, transformers; print('torch', torch.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 \
    | tee "$OUT/env.log"
step tests 90 $PY -m pytest -q -p no:cacheprovider tests/unit/test_on_cuda.py \
    tests/unit/test_static_decoding.py -k "cuda or half_precision"
step generation 210 env TORCH_LOGS=perf_hints $PY -m benchmarks.generation --model qwen2-0.5b \
    --device cuda \
    --sides hf-compiled,generate,hf --repeats 2 --profile 64 --profile-dir "$OUT"
step train 240 $PY -m benchmarks.gpu --tasks sft,dpo --steps 10 \
    --sides rewardloop,rewardloop-full,trl
step grpo 240 $PY -m benchmarks.gpu --tasks grpo --steps 4 --batch-size 64 --generations 4
echo "=== done at +$(( $(date +%s) - START ))s; logs in $OUT"
