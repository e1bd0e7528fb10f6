"""Run logs (JSONL + TensorBoard), the markdown results table and the PNG plots of a run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

TRAIN_LOG, EVAL_LOG = "metrics.jsonl", "eval.jsonl"
NAN = float("nan")  # steps skipped without an update log no loss


def markdown_table(header: list[str], rows: list[list]) -> str:
    """The one markdown table formatter: a header row, a separator, one line per row (cells as str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
