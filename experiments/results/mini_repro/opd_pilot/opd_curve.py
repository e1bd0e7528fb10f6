"""Pilot: how fast OPD's training success moves (and what a step costs) from a warmed-up student, with a teacher
checkpoint of the long run, under the full preset's distillation settings."""
import argparse
import dataclasses
from pathlib import Path

from experiments import mini_repro as mr


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_root", type=Path, help="the teacher run's out-dir (teacher/checkpoints, tokenizer)")
    ap.add_argument("teacher_step", type=int)
    ap.add_argument("student", help="a warmed-up student's final_model directory")
    ap.add_argument("out", type=Path)
    ap.add_argument("--method", default="opd")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate on the 30-game draw every N steps (0: at the end)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a full-preset setting")
    args = ap.parse_args()
    mini = dataclasses.replace(mr.override(mr.PRESETS["full"], args.set), progress=False)
    teacher = args.out / f"teacher_step{args.teacher_step}"
    if not (teacher / "config.json").is_file():
        mr.export_teacher(args.run_root, args.teacher_step, teacher)
    name = f"{args.method}_s0"
    mr.train_stage(mr._base(mini, name=name, out_dir=str(args.out / name), method=args.method, student=args.student,
                            teacher=str(teacher), steps=args.steps, seed=0, eval_every=args.eval_every))


if __name__ == "__main__":  # env workers are spawned: they re-import this script
    main()
