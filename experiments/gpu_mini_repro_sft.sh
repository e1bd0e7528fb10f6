#!/usr/bin/env bash
# The mini reproduction's training that needs no environment, on a lent GPU machine (no ALFWorld there): both
# students' warm-ups and the teacher's SFT steps up to its first DAgger round (`mini_repro --offline`), three
# processes side by side. It needs, carried from a machine that ran `mini_repro --preset full --until tokenizer`:
# runs/mini_repro/tokenizer and runs/corpus/alfworld_train_handcoded/rendered (the token ids; the shards
# themselves are unpacked here from the snapshot in experiments/data). Each run dir comes back as a tar under
# $OUT with its latest checkpoint; unpack them into runs/mini_repro/ and rerun the same pipeline without
# --offline where ALFWorld runs: it resumes there (DAgger rounds, evaluations).
#   OUT=gpu_out SFT_S=480 bash experiments/gpu_mini_repro_sft.sh   (SFT_S: the processes' time limit; they resume)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
export JAX_DEFAULT_MATMUL_PRECISION=highest  # float32 as on the CPU machine, not TF32
# Autotuning made every new batch width (8 of them) compile for minutes: on an H200 the d64 warm-up took 316 s for
# its first 10 steps and the teacher logged none in 390 s. Without it all three compile in ~3 minutes and then
# step at 0.01-0.02 s (2026-11-28).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
PY=${PY:-python3}
$PY -c "
from pathlib import Path
from gopd_jax.expert_corpus import unpack_snapshot
out = Path('runs/corpus/alfworld_train_handcoded')
if not (out / 'meta.json').is_file():
    unpack_snapshot('experiments/data/alfworld_train_handcoded_corpus.tar.xz', out)
" || exit 1
run="timeout ${SFT_S:-480} $PY -m experiments.mini_repro --preset full --no-progress --offline"
$run --only teacher > "$OUT/teacher.log" 2>&1 &
$run --only warmup --set "student_hidden=[64]" > "$OUT/d64_warmup.log" 2>&1 &
$run --only warmup --set "student_hidden=[96]" > "$OUT/d96_warmup.log" 2>&1 &
wait
for name in teacher d64_warmup d96_warmup; do
  dir=runs/mini_repro/$name
  [ -d "$dir" ] || continue
  # Only the latest checkpoint travels back (the files that come back are capped at 16 MiB each).
  ls -d "$dir"/checkpoints/[0-9]* 2>/dev/null | sort -t/ -k5 -n | head -n -1 | xargs -r rm -rf
  tar -czf "$OUT/$name.tgz" "$dir"
  echo "== $name"; grep -E "step [0-9]+/|stopped|Error|error" "$OUT/$name.log" | tail -n 3
done
ls -la "$OUT"
