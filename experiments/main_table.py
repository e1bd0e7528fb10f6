"""The paper's main table: for each environment x student, the teacher alone, the zero-shot student, vanilla
OPD and Guided-OPD, with the paper's hyperparameters (docs/PAPER.md §3) as defaults.

    python -m experiments.main_table --teacher /ckpt/Qwen3-30B-A3B \\
        --students /ckpt/Qwen3-0.6B /ckpt/Qwen3-1.7B /ckpt/Qwen3-4B --envs alfworld scienceworld webshop
WebShop reads its data from $WEBSHOP_DATA (one --data-dir cannot serve two environments' layouts); it trains on
its train goals and is evaluated on the first 500 goals, the peers' test set (gopd_jax/envs/webshop/data.py).
Any runner flag (--steps, --batch-tasks, --learning-rate, --num-workers, ...) applies to every run. Runs and
evaluations finished with the same settings are skipped, so the table resumes where it stopped; ones made with
other settings are refused before anything runs. Writes <out-dir>/main_table.md.
"""

import dataclasses
import json
from pathlib import Path

from experiments.grid import parse_base
from gopd_jax.evaluate import evaluate_checkpoint
from gopd_jax.experiment import EVAL_FIELDS, ExperimentConfig, config_diff
from gopd_jax.reporting import finished_run, markdown_table
from gopd_jax.runner import run_experiment

ENV_SPLITS = {"alfworld": ("train", "valid_unseen"), "scienceworld": ("train", "test"), "webshop": ("train", "test")}


def _extra(ap):
    ap.add_argument("--students", nargs="+", required=True, help="student checkpoint directories")
    ap.add_argument("--envs", nargs="+", default=["alfworld", "scienceworld", "webshop"], choices=sorted(ENV_SPLITS))


def _cached_eval(path: Path, cfg: ExperimentConfig, checkpoint: str) -> dict:
    """evaluate_checkpoint, reused from `path` only if it was made with the same evaluation settings."""
    used = dataclasses.replace(cfg, student=checkpoint, teacher=checkpoint)
    settings = path.with_name(path.stem + ".config.json")
    if path.is_file():
        saved = json.loads(settings.read_text()) if settings.is_file() else None
        diff = config_diff(saved, used, EVAL_FIELDS) if saved is not None else {"settings": ("unsaved", "")}
        if diff:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{path} was evaluated with other settings ({what}): use a new --out-dir, or delete "
                             "the file to evaluate again")
        return json.loads(path.read_text())
    result = evaluate_checkpoint(cfg, checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(used.to_json())
    path.write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    base, args = parse_base(__doc__, ExperimentConfig(name="main_table", out_dir="runs/main_table"), argv, _extra)
    root = Path(base.out_dir)
    table = []
    cells = {}  # (env, student) -> (cfg, {method: run config})
    for env in args.envs:
        train, evaluation = ENV_SPLITS[env]
        for student in args.students:
            tag = f"{env}/{Path(student).name}"
            cfg = dataclasses.replace(base, env=env, train_split=train, eval_split=evaluation, student=student,
                                      out_dir=str(root / tag))
            runs = {m: dataclasses.replace(cfg, method=m, name=f"{tag}/{m}", out_dir=str(root / tag / m))
                    for m in ("opd", "guided_opd")}
            for run in runs.values():  # every cell fails before the first one starts
                run.validate()
                finished_run(run)
            cells[env, student] = cfg, runs
    for (env, student), (cfg, runs) in cells.items():
        tag = f"{env}/{Path(student).name}"
        rows = {"teacher": _cached_eval(root / env / "teacher_eval.json", cfg, cfg.teacher),
                "zero-shot student": _cached_eval(root / tag / "zero_shot.json", cfg, student)}
        rows.update({m: run_experiment(run) for m, run in runs.items()})  # a finished run is a no-op
        table += [[env, Path(student).name, name, f"{r['score']:.2f}", f"{r['success_rate']:.2f}",
                   f"{r['rounds']:.2f}"] for name, r in rows.items()]
        text = markdown_table(["env", "student", "system", "Score", "Success Rate (%)", "Rounds"], table)
        (root / "main_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
