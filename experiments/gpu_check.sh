#!/usr/bin/env bash
# All GPU checks in one run (for a lent H100/H200, whose image has its own jax/flax/optax/orbax/transformers/torch
# but no alfworld/scienceworld): correctness on the GPU first, then the benchmarks. Results go under $OUT.
#   OUT=gpu_out bash experiments/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=. JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import jax, flax, optax, orbax.checkpoint, transformers, torch; print(jax.__version__, jax.devices())" \
  > "$OUT/versions.txt" 2>&1
timeout 240 python -m pytest tests/test_models.py tests/test_generate.py tests/test_losses.py tests/test_scoring.py \
  tests/test_train.py tests/test_checkpointing.py -q -p no:cacheprovider > "$OUT/tests.txt" 2>&1
timeout 200 python -m experiments.bench_generate --preset qwen3-0.6b --batch 64 256 --prompt 512 --new 128 \
  --dtype bfloat16 --repeats 2 > "$OUT/bench_generate.txt" 2>&1
timeout 120 python -m experiments.bench_train --preset qwen3-0.6b --seq 2048 --batch 8 > "$OUT/bench_train.txt" 2>&1
tail -n 3 "$OUT"/*.txt
