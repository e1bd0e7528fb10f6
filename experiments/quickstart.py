"""The README's main command: the mini-scale Guided-OPD pipeline end to end on CPU in minutes.

Expert corpus (12 ALFWorld train walkthroughs) -> BPE tokenizer -> a tiny dense student warmed up by SFT from the
corpus -> tiny Qwen3-MoE teacher by SFT from the corpus -> vanilla OPD and Guided-OPD -> evaluation on a stratified
draw of valid_unseen games -> results table. One console line per stage; each stage's config and output are
in files under the output directory. Everything is tiny, so the numbers show that the pipeline runs, not
what the method does: that is `python -m experiments.mini_repro --preset full` (hours; resumable).
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from experiments.mini_repro import PRESETS, run


def _eval(root: Path, name: str) -> dict | None:
    path = root / name / "final_eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def plain_reading(root: Path, mini) -> str:
    """Two lines a newcomer can act on: what moved at this size, and the command for the real thing."""
    def cell(name):
        e = _eval(root, name)
        return (f"{e['valid_action_rate']:.0f}% valid actions, {e['success_rate']:.0f}% of {e['n']} games won" if e
                else "not run")

    hidden = mini.student_hidden[0]
    first = (f"Measured after a few steps: teacher {cell('teacher')}; student d{hidden} after warm-up "
             f"{cell(f'd{hidden}_warmup')}, after OPD "
             f"{cell(f'd{hidden}_opd_s0')}, after Guided-OPD {cell(f'd{hidden}_guided_opd_s0')} - at this size the "
             "numbers only show that every stage runs, not what the method does.")
    second = ("For the real comparison run `./run experiments.mini_repro --preset full` (hours on CPU, resumable); "
              "its commands and measured table are in experiments/results/mini_repro/.")
    return f"{first}\n{second}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=PRESETS["quick"].out_dir)
    args = ap.parse_args(argv)
    mini = dataclasses.replace(PRESETS["quick"], out_dir=args.out_dir,
                               corpus_dir=str(Path(args.out_dir) / "corpus"), progress=False, quiet=True)
    t0 = time.perf_counter()
    table = run(mini)
    print(f"\n{table}\n{plain_reading(Path(mini.out_dir), mini)}\n[quickstart] {time.perf_counter() - t0:.0f} s in "
          f"total; configs, logs and metrics under {mini.out_dir}/")


if __name__ == "__main__":
    main()
