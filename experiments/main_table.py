"""The paper's main table: for each environment x student, the teacher alone, the zero-shot student, vanilla
OPD and Guided-OPD, with the paper's hyperparameters (DESIGN.md §3) as defaults.

    python -m experiments.main_table --teacher /ckpt/Qwen3-30B-A3B \\
        --students /ckpt/Qwen3-0.6B /ckpt/Qwen3-1.7B /ckpt/Qwen3-4B --envs alfworld scienceworld webshop
WebShop reads its data from $WEBSHOP_DATA (one --data-dir cannot serve two environments' layouts); it trains on
its train goals and is evaluated on the first 500 goals, the peers' test set (gopd_jax/envs/webshop/data.py).
Any runner flag (--steps, --batch-tasks, --learning-rate, --num-workers, ...) applies to every run. Finished
runs are skipped, so the table resumes where it stopped. Writes <out-dir>/main_table.md.
"""

import dataclasses
import json
from pathlib import Path

from experiments.grid import parse_base
from gopd_jax.evaluate import evaluate_checkpoint
from gopd_jax.experiment import ExperimentConfig
from gopd_jax.reporting import markdown_table
from gopd_jax.runner import run_experiment

ENV_SPLITS = {"alfworld": ("train", "valid_unseen"), "scienceworld": ("train", "test"), "webshop": ("train", "test")}


def _extra(ap):
    ap.add_argument("--students", nargs="+", required=True, help="student checkpoint directories")
    ap.add_argument("--envs", nargs="+", default=["alfworld", "scienceworld", "webshop"], choices=sorted(ENV_SPLITS))


def _cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    base, args = parse_base(__doc__, ExperimentConfig(name="main_table", out_dir="runs/main_table"), argv, _extra)
    root = Path(base.out_dir)
    table = []
    for env in args.envs:
        train, evaluation = ENV_SPLITS[env]
        for student in args.students:
            tag = f"{env}/{Path(student).name}"
            cfg = dataclasses.replace(base, env=env, train_split=train, eval_split=evaluation, student=student,
                                      out_dir=str(root / tag))
            rows = {
                "teacher": _cached(root / env / "teacher_eval.json", lambda: evaluate_checkpoint(cfg, cfg.teacher)),
                "zero-shot student": _cached(root / tag / "zero_shot.json", lambda: evaluate_checkpoint(cfg, student)),
            }
            for method in ("opd", "guided_opd"):
                run = dataclasses.replace(cfg, method=method, name=f"{tag}/{method}", out_dir=str(root / tag / method))
                rows[method] = _cached(Path(run.out_dir) / "final_eval.json", lambda: run_experiment(run))
            table += [[env, Path(student).name, name, f"{r['score']:.2f}", f"{r['success_rate']:.2f}",
                       f"{r['rounds']:.2f}"] for name, r in rows.items()]
            text = markdown_table(["env", "student", "system", "Score", "Success Rate (%)", "Rounds"], table)
            (root / "main_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
