"""A starting student on the evaluation a distillation run ends with (seed 0's 30-game draw at the preset's
`max_turns`: 15 when the pilots ran, 30 from commit d6a7744).

    PYTHONPATH=. .venv/bin/python experiments/results/mini_repro/opd_pilot/eval_start.py STUDENT OUT
"""
import dataclasses
import json
import sys
from pathlib import Path

from experiments import mini_repro as mr
from gopd_jax.evaluate import evaluate_checkpoint

if __name__ == "__main__":  # env workers are spawned: they re-import this script
    student, out = sys.argv[1], Path(sys.argv[2])
    mini = dataclasses.replace(mr.PRESETS["full"], progress=False)
    summary = evaluate_checkpoint(mr._base(mini, name=out.name, out_dir=str(out), seed=0), student)
    (out / "final_eval.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("n", "success_rate", "valid_action_rate", "rounds")}))
