#!/usr/bin/env bash
# Every GPU check of issue 11 in one run of < 10 minutes on a lent H100/H200 (its image has its own
# jax/flax/optax/orbax/transformers/torch, no alfworld/scienceworld), most important first; each step gets
# min(its cap, the time left of BUDGET_S) and is skipped when less than 20 s remain:
#   1. update step, Qwen3-0.6B 8 x 2048 bf16: XLA vs cuDNN training attention (MFU target >= 35%)
#   2. GPU tests of the training paths (cuDNN attention grads vs XLA, remat, FSDP/exact on one device) + plan
#   3. MoE teacher decode, Qwen3-30B-A3B shapes (layers reduced), batch 64 / 256, vs the HBM roofline
#   4. MoE teacher scoring vs the FLOP roofline; grouped (ragged_dot) vs dense experts
#   5. student decode, Qwen3-0.6B, batch 64 / 256, vs transformers and the HBM roofline
#   6. one paper step (bench_step; needs the Qwen3 tokenizer at shared/data/qwen3_tokenizer in the checkout)
#   7. update step with the remat policy "dots" (cuDNN attention)
#   8. model / generation parity tests (when time is left)
#   9. a profiler trace of the cuDNN update step in $OUT/profile (when time is left)
# Full logs go under $OUT; the summary is printed last.
#   OUT=gpu_out bash experiments/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAX_COMPILATION_CACHE_DIR=/tmp/gopd_jax_compile TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-570} ))
TEACHER_LAYERS=${TEACHER_LAYERS:-12}  # Qwen3-30B-A3B has 48; 12 layers = 8.1B params = 16 GB in bf16

step() {  # step NAME CAP_S COMMAND...: run with min(CAP_S, time left), log to $OUT/NAME.txt
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 20 )); then echo "skipped: out of time" > "$OUT/$name.txt"; return; fi
  local t0=$(date +%s)
  timeout $(( cap < left ? cap : left )) "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $? after $(( $(date +%s) - t0 )) s" >> "$OUT/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import jax, flax, optax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, 'transformers', transformers.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1

step train_xla 80 $PY -m experiments.bench_train --preset qwen3-0.6b --seq 2048 --batch 8 --steps 3 --attention xla
step train_cudnn 80 $PY -m experiments.bench_train --preset qwen3-0.6b --seq 2048 --batch 8 --steps 3 --attention cudnn
JAX_DEFAULT_MATMUL_PRECISION=highest step tests_train 90 $PY -m pytest tests/test_train.py tests/test_device_plan.py \
  -q -p no:cacheprovider
step moe_decode 80 $PY -m experiments.bench_generate --preset qwen3-30b-a3b --layers "$TEACHER_LAYERS" --batch 64 256 \
  --prompt 512 --new 64 --dtype bfloat16 --repeats 2 --attention fused --skip-transformers
step moe_scoring 50 $PY -m experiments.bench_scoring --preset qwen3-30b-a3b --layers "$TEACHER_LAYERS" --batch 8 \
  --seq 2048 --moe-tokens 64 256 16384 --repeats 2
step student_decode 110 $PY -m experiments.bench_generate --preset qwen3-0.6b --batch 64 256 --prompt 512 --new 128 \
  --dtype bfloat16 --repeats 2 --attention fused
step paper_step 120 $PY -m experiments.bench_step --teacher qwen3-30b-a3b --teacher-layers "$TEACHER_LAYERS" \
  --student qwen3-0.6b --tasks 8 --workers 8 --max-turns 3 --max-new-tokens 512 --max-prompt-tokens 4096 \
  --micro-batch-rows 4 --steps 2
step train_cudnn_dots 80 $PY -m experiments.bench_train --preset qwen3-0.6b --seq 2048 --batch 8 --steps 3 \
  --attention cudnn --remat dots
JAX_DEFAULT_MATMUL_PRECISION=highest step tests_models_generate 150 $PY -m pytest tests/test_models.py \
  tests/test_generate.py -q -p no:cacheprovider
step train_profile 70 $PY -m experiments.bench_train --preset qwen3-0.6b --seq 2048 --batch 8 --steps 2 \
  --attention cudnn --profile "$OUT/profile"

cat "$OUT/gpu.txt"
for f in train_xla train_cudnn train_cudnn_dots; do echo "== $f"; grep -E "^step|exit|Error" "$OUT/$f.txt" | tail -n 3; done
for f in tests_train tests_models_generate; do echo "== $f"; tail -n 3 "$OUT/$f.txt"; done
for f in moe_decode student_decode; do echo "== $f"; grep -E "^MoE|^\| [0-9]|exit" "$OUT/$f.txt" | tail -n 6; done
echo "== moe_scoring"; grep -E "^scoring|^\| [0-9]|exit" "$OUT/moe_scoring.txt"
echo "== paper_step"; grep -E "teacher:|^step|^env|^projected|exit|Error" "$OUT/paper_step.txt"
