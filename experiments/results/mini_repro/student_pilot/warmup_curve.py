"""Pilot: a dense student's warm-up curve (agreement + 30 stratified games) on the teacher's corpus and recipe."""
import dataclasses
import sys
from pathlib import Path

from experiments import mini_repro as mr
from gopd_jax.tokenizer import load_tokenizer


def main():
    hidden, layers, steps = map(int, sys.argv[1:4])
    out, tokenizer_dir = Path(sys.argv[4]), sys.argv[5]
    evals = tuple(int(s) for s in sys.argv[6].split(","))
    mini = dataclasses.replace(mr.PRESETS["full"], student_layers=layers, progress=False)
    tok = load_tokenizer(tokenizer_dir)
    mr.train_on_corpus(mini, tok, out, mr._dense(len(tok), hidden, layers), steps=steps, dagger_rounds=0,
                       eval_steps=evals)


if __name__ == "__main__":  # env workers are spawned: they re-import this script
    main()
