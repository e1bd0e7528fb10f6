"""The README's main command: the mini-scale Guided-OPD pipeline end to end on CPU in minutes.

Tokenizer from ALFWorld expert transcripts -> tiny Qwen3-MoE teacher by SFT on walkthroughs -> a tiny dense
student warmed up by SFT -> vanilla OPD and Guided-OPD -> evaluation on valid_unseen games -> results table.
Everything is tiny (a few steps, a handful of games), so the numbers only show that the pipeline runs; the
measured mini-scale table is experiments/results/ (python -m experiments.mini_repro).
"""

import argparse
import dataclasses

from experiments.mini_repro import PRESETS, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=PRESETS["quick"].out_dir)
    args = ap.parse_args(argv)
    run(dataclasses.replace(PRESETS["quick"], out_dir=args.out_dir))


if __name__ == "__main__":
    main()
