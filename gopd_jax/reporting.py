"""Run logs (JSONL + TensorBoard), the markdown results table and the PNG plots of a run directory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

TRAIN_LOG, EVAL_LOG, FINAL_EVAL, CONFIG = "metrics.jsonl", "eval.jsonl", "final_eval.json", "config.json"
NAN = float("nan")  # steps skipped without an update log no loss


def markdown_table(header: list[str], rows: list[list]) -> str:
    """The one markdown table formatter: a header row, a separator, one line per row (cells as str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log. A cut-off last line (a kill mid-write) is dropped with a warning; a
    damaged line elsewhere is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({e}); the log is damaged: repair or delete "
                                 "the line, or start the run in a new directory") from e
            warnings.warn(f"{path}: dropping a cut-off last line (the run was killed while writing it): {line[:80]!r}")
    return records


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def logged_eval(out_dir: str | Path, step: int) -> dict | None:
    """The evaluation logged at `step` (without its "step" key), or None: a run killed after logging its
    final evaluation reuses it instead of evaluating (and logging) it twice."""
    found = [r for r in read_jsonl(Path(out_dir) / EVAL_LOG) if r["step"] == step]
    return {k: v for k, v in found[-1].items() if k != "step"} if found else None


def write_final_eval(out_dir: str | Path, summary: dict) -> None:
    """final_eval.json, written atomically and last: its presence marks a finished run."""
    _write_atomic(Path(out_dir) / FINAL_EVAL, json.dumps(summary, indent=2))


def finished_run(cfg) -> dict | None:
    """The final evaluation of the run in cfg.out_dir if that run finished as the same experiment as `cfg`;
    None if nothing finished there. A directory that holds a finished or checkpointed run made with another
    config is refused (ValueError naming the differing fields), so grids never reuse another experiment."""
    from gopd_jax.experiment import check_resume

    out = Path(cfg.out_dir)
    finished = (out / FINAL_EVAL).is_file()
    started = (out / "checkpoints").is_dir() and any(p.name.isdigit() for p in (out / "checkpoints").iterdir())
    if not (finished or started):
        return None
    saved = json.loads((out / CONFIG).read_text()) if (out / CONFIG).is_file() else None
    # A finished result does not depend on the run-only fields (workers, progress, ...).
    lenient = finished and saved is not None
    check_resume(saved, dataclasses.replace(cfg, resume_anyway=cfg.resume_anyway or lenient), where=str(out))
    return json.loads((out / FINAL_EVAL).read_text()) if finished else None


def _rewrite_upto(path: Path, keep) -> None:
    """Keep the records `keep` accepts: a resumed run drops what the killed run logged past its checkpoint."""
    records = [r for r in read_jsonl(path) if keep(r)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


class MetricsLogger:
    def __init__(self, out_dir: str | Path, resume_from: int = 0):
        from tensorboardX import SummaryWriter

        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        _rewrite_upto(self.out / TRAIN_LOG, lambda r: r["step"] < resume_from)
        _rewrite_upto(self.out / EVAL_LOG, lambda r: r["step"] <= resume_from)
        self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_from or None)

    def _append(self, name: str, record: dict) -> None:
        with open(self.out / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_train(self, record: dict) -> None:
        self._append(TRAIN_LOG, record)
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, record["step"])

    def log_eval(self, step: int, summary: dict) -> None:
        record = {"step": step, **{k: v for k, v in summary.items() if k != "rollout"}}
        self._append(EVAL_LOG, record)
        for k in ("score", "success_rate", "rounds"):
            self.tb.add_scalar(f"eval/{k}", summary[k], step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def write_report(out_dir: str | Path, name: str) -> Path:
    """results.md (final evaluation, per task type) and plots.png (beta, learning curves, success by turn,
    teacher-student KL by turn) for one run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    train, evals = read_jsonl(out / TRAIN_LOG), read_jsonl(out / EVAL_LOG)
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    steps = [r["step"] for r in train]
    ax[0, 0].plot(steps, [r["beta"] for r in train], label="beta (teacher intervention)")
    ax[0, 0].plot(steps, [r.get("teacher_turn_frac", NAN) for r in train], ".", alpha=0.5, label="teacher turn fraction")
    ax[0, 0].set(title="curriculum", xlabel="step")
    ax[0, 0].legend()
    ax[0, 1].plot(steps, [r.get("loss", NAN) for r in train], label="loss")
    ax[0, 1].plot(steps, [r.get("sampled_kl", NAN) for r in train], label="sampled KL (student turns)")
    twin = ax[0, 1].twinx()
    twin.plot([e["step"] for e in evals], [e["success_rate"] for e in evals], "o-", color="k", label="eval success %")
    twin.set_ylabel("eval success rate (%)")
    ax[0, 1].set(title="learning curves", xlabel="step")
    ax[0, 1].legend(loc="upper left")
    if evals:
        final = evals[-1]
        ax[1, 0].plot(range(1, len(final["success_by_turn"]) + 1), [100 * s for s in final["success_by_turn"]])
    ax[1, 0].set(title="final eval: success within t turns", xlabel="turn", ylabel="%")
    thirds = [train[i * len(train) // 3:(i + 1) * len(train) // 3] for i in range(3)] if train else []
    for label, part in zip(("early", "middle", "late"), thirds):
        curves = [r["kl_by_turn"] for r in part]
        if curves:
            mean = [_mean([c[t] for c in curves if c[t] is not None]) for t in range(len(curves[0]))]
            ax[1, 1].plot(range(1, len(mean) + 1), mean, label=f"{label} training")
    ax[1, 1].set(title="teacher-student sampled KL by turn", xlabel="turn", ylabel="nats/token")
    ax[1, 1].legend()
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out / "plots.png", dpi=90)
    plt.close(fig)

    lines = [f"# {name}", ""]
    if evals:
        from gopd_jax.evaluate import format_table

        lines += [f"Final evaluation (step {evals[-1]['step']}):", "", format_table(evals[-1]), ""]
    (out / "results.md").write_text("\n".join(lines))
    return out / "results.md"


def _mean(xs):
    return sum(xs) / len(xs) if xs else NAN
