#!/usr/bin/env bash
# Every GPU check in one run, for a lent H100/H200 (its image has its own jax/flax/optax/orbax/transformers/torch,
# no alfworld/scienceworld): the generation benchmark, model/generation parity on the GPU, the update-step benchmark, then the
# remaining device tests.
# Full logs go under $OUT; the summary is printed last.
#   OUT=gpu_out bash experiments/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAX_COMPILATION_CACHE_DIR=/tmp/gopd_jax_compile TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import jax, flax, optax, orbax.checkpoint as o, transformers, torch; print('jax', jax.__version__, 'flax',
flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__,
jax.devices())" >> "$OUT/gpu.txt" 2>&1
timeout 300 $PY -m experiments.bench_generate --preset qwen3-0.6b --batch 64 256 --prompt 512 --new 128 \
  --dtype bfloat16 --repeats 2 --attention xla fused > "$OUT/bench_generate.txt" 2>&1
# fp32 parity needs true fp32 matmuls (the GPU default would use TF32).
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 $PY -m pytest tests/test_models.py tests/test_generate.py -q \
  -p no:cacheprovider > "$OUT/tests_models_generate.txt" 2>&1
timeout 130 $PY -m experiments.bench_train --preset qwen3-0.6b --seq 2048 --batch 8 > "$OUT/bench_train.txt" 2>&1
JAX_DEFAULT_MATMUL_PRECISION=highest timeout ${REST_S:-60} $PY -m pytest tests/test_losses.py tests/test_train.py \
  tests/test_scoring.py tests/test_checkpointing.py -q -p no:cacheprovider > "$OUT/tests_rest.txt" 2>&1
cat "$OUT/gpu.txt"; for f in "$OUT"/tests_*.txt; do echo "== $f"; tail -n 4 "$f"; done
echo "== bench_train"; tail -n 3 "$OUT/bench_train.txt"; echo "== bench_generate"; tail -n 8 "$OUT/bench_generate.txt"
