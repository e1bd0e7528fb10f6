"""Mini-scale reproduction of the paper's central comparison, sized for a CPU machine.

Pipeline (everything real: ALFWorld games, Qwen3 / Qwen3-MoE models, the library's runner):
  1. a byte-level BPE tokenizer trained on ALFWorld expert transcripts (prompts + replies);
  2. a small Qwen3-MoE teacher trained by SFT on expert (walkthrough) trajectories;
  3. small dense Qwen3 students, each warmed up by a short SFT from one shared init;
  4. from that same init: vanilla OPD, Guided-OPD (cosine curriculum) and SFT, for several seeds;
  5. evaluation on valid_unseen (beta = 0, temperature 0.4) and a results table with the paper-style
     relative gains of Guided-OPD over OPD.

    python -m experiments.mini_repro                       # the full mini table (hours on 2 CPU cores)
    python -m experiments.mini_repro --preset quick        # minutes: the README's quickstart
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import jax

from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.envs.prompting import build_messages
from gopd_jax.experiment import ExperimentConfig
from gopd_jax.methods import owners_from_beta
from gopd_jax.models import Qwen3Config, init_params, save_hf_checkpoint
from gopd_jax.records import EXPERT, STUDENT, TEACHER
from gopd_jax.rollout import RolloutConfig, RolloutRunner
from gopd_jax.runner import run_experiment
from gopd_jax.tokenizer import load_tokenizer, train_bpe_tokenizer


@dataclasses.dataclass(frozen=True)
class MiniConfig:
    out_dir: str = "runs/mini_repro"
    env: str = "alfworld"
    corpus_tasks: int = 48
    vocab_size: int = 1024
    teacher_layers: int = 2
    teacher_hidden: int = 128
    teacher_experts: int = 4
    teacher_sft_steps: int = 60
    student_hidden: tuple[int, ...] = (48, 96)
    student_layers: int = 2
    warmup_sft_steps: int = 16
    distill_steps: int = 12
    batch_tasks: int = 4
    learning_rate: float = 2e-3
    methods: tuple[str, ...] = ("opd", "guided_opd")
    seeds: tuple[int, ...] = (0, 1, 2)
    sft_baseline_seeds: tuple[int, ...] = (0,)  # SFT on expert trajectories, continued from the same init
    max_turns: int = 15
    max_new_tokens: int = 24
    eval_limit: int = 30
    num_workers: int = 8
    progress: bool = True


PRESETS = {
    "full": MiniConfig(),
    "quick": MiniConfig(out_dir="runs/quickstart", corpus_tasks=8, vocab_size=512, teacher_layers=2,
                        teacher_hidden=64, teacher_experts=4, teacher_sft_steps=6, student_hidden=(32,),
                        warmup_sft_steps=2, distill_steps=3, batch_tasks=2, methods=("opd", "guided_opd"),
                        seeds=(0,), sft_baseline_seeds=(), max_turns=4, max_new_tokens=12, eval_limit=4,
                        num_workers=2),
}


def _base(mini: MiniConfig, **kw) -> ExperimentConfig:
    """The runner settings shared by every stage (tiny models: no thinking, short replies, float32)."""
    return ExperimentConfig(env=mini.env, think=False, k_history=1, max_turns=mini.max_turns,
                            max_new_tokens=mini.max_new_tokens, compute_dtype="float32",
                            batch_tasks=mini.batch_tasks, learning_rate=mini.learning_rate, micro_batch_rows=8,
                            num_workers=mini.num_workers, eval_limit=mini.eval_limit, eval_every=0,
                            checkpoint_every=10, progress=mini.progress, **kw)


def build_tokenizer(mini: MiniConfig, out: Path):
    """Train the tokenizer on real expert transcripts: replay walkthroughs on train games and render every
    turn's prompt and reply. A throwaway byte-level tokenizer carries the first pass (rendering only)."""
    if (out / "tokenizer.json").is_file():
        return load_tokenizer(out)
    tasks = list_tasks(mini.env, "train")[::max(1, len(list_tasks(mini.env, "train")) // mini.corpus_tasks)]
    seed_text = [m["content"] for m in build_messages("", [], "", [], mini.env, think=False)]
    bootstrap = train_bpe_tokenizer(seed_text, 300, out / "bootstrap")
    with EnvPool(mini.env, num_workers=mini.num_workers) as pool:
        runner = RolloutRunner(pool, bootstrap, RolloutConfig(env=mini.env, max_turns=50, think=False))
        episodes, _ = runner.run(tasks[:mini.corpus_tasks], {STUDENT: EXPERT, TEACHER: EXPERT},
                                 owners_from_beta(1.0), jax.random.PRNGKey(0), progress=mini.progress,
                                 desc="expert corpus")
    corpus = [bootstrap.decode(list(t.prompt_ids) + list(t.response_ids)) for e in episodes for t in e.turns]
    return train_bpe_tokenizer(corpus, mini.vocab_size, out)


def random_checkpoint(config: Qwen3Config, tokenizer, out: Path, seed: int) -> str:
    if not (out / "config.json").is_file():
        save_hf_checkpoint(init_params(config, jax.random.PRNGKey(seed)), config, out)
        tokenizer.save_pretrained(out)
    return str(out)


def _dense(vocab: int, hidden: int, layers: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                       num_attention_heads=max(2, hidden // 32), num_key_value_heads=1, head_dim=32,
                       tie_word_embeddings=True)


def _teacher_config(mini: MiniConfig, vocab: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab, hidden_size=mini.teacher_hidden, intermediate_size=3 * mini.teacher_hidden,
                       num_hidden_layers=mini.teacher_layers, num_attention_heads=max(2, mini.teacher_hidden // 32),
                       num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, num_experts=mini.teacher_experts,
                       num_experts_per_tok=2, moe_intermediate_size=mini.teacher_hidden, norm_topk_prob=True)


def train_stage(cfg: ExperimentConfig) -> tuple[dict, str]:
    """run_experiment: a stage that finished with the same config is a no-op (so the whole table resumes
    too); one made with other settings is refused."""
    return run_experiment(cfg), str(Path(cfg.out_dir) / "final_model")


def run(mini: MiniConfig) -> str:
    root = Path(mini.out_dir)
    tokenizer = build_tokenizer(mini, root / "tokenizer")
    vocab = len(tokenizer)
    teacher_cfg = _teacher_config(mini, vocab)
    teacher_init = random_checkpoint(teacher_cfg, tokenizer, root / "teacher_init", seed=0)
    teacher_eval, teacher = train_stage(_base(mini, name="teacher_sft", out_dir=str(root / "teacher_sft"),
                                              method="sft", student=teacher_init, teacher=teacher_init,
                                              steps=mini.teacher_sft_steps))
    students = {}
    for hidden in mini.student_hidden:
        init = random_checkpoint(_dense(vocab, hidden, mini.student_layers), tokenizer, root / f"student_d{hidden}_init",
                                 seed=1)
        _, students[hidden] = train_stage(_base(mini, name=f"d{hidden}_warmup", out_dir=str(root / f"d{hidden}_warmup"),
                                                method="sft", student=init, teacher=teacher,
                                                steps=mini.warmup_sft_steps))
    # Seed-major order: an interrupted table still compares every method on the same seeds.
    table = ""
    for seed in mini.seeds:
        for hidden, warm in students.items():
            for method in mini.methods + (("sft",) if seed in mini.sft_baseline_seeds else ()):
                train_stage(_base(mini, name=f"d{hidden}_{method}_s{seed}", out_dir=str(root / f"d{hidden}_{method}_s{seed}"),
                                  method=method, student=warm, teacher=teacher, steps=mini.distill_steps, seed=seed))
        table = report(mini)
    return table


def _final_evals(root: Path, name: str) -> list[dict]:
    path = root / name / "final_eval.json"
    return [json.loads(path.read_text())] if path.is_file() else []


def _late_kl(root: Path, name: str, last: int = 3) -> float | None:
    """Teacher-student sampled KL (nats/token, host-computed per turn) over the run's last steps."""
    path = root / name / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines()][-last:]
    values = [v for r in records for v in r["kl_by_turn"] if v is not None]
    return statistics.fmean(values) if values else None


def report(mini: MiniConfig) -> str:
    """Build results.md from the finished runs on disk (also usable while the grid is still running)."""
    root = Path(mini.out_dir)
    vocab = len(load_tokenizer(root / "tokenizer"))
    rows = [("teacher (SFT, MoE)", _teacher_config(mini, vocab).num_params(), "-", _final_evals(root, "teacher_sft"), [])]
    for hidden in mini.student_hidden:
        n = _dense(vocab, hidden, mini.student_layers).num_params()
        rows.append((f"student d{hidden} (start)", n, "warm-up SFT", _final_evals(root, f"d{hidden}_warmup"), []))
        # Methods compared on the seeds where every compared method has finished.
        seeds = [s for s in mini.seeds if all(_final_evals(root, f"d{hidden}_{m}_s{s}") for m in mini.methods)]
        for method in mini.methods:
            names = [f"d{hidden}_{method}_s{s}" for s in seeds]
            rows.append((f"student d{hidden}", n, method, [e for x in names for e in _final_evals(root, x)],
                         [_late_kl(root, x) for x in names]))
        sft = [f"d{hidden}_sft_s{s}" for s in mini.sft_baseline_seeds]
        rows.append((f"student d{hidden}", n, "sft", [e for x in sft for e in _final_evals(root, x)],
                     [_late_kl(root, x) for x in sft]))
    table = results_table([r for r in rows if r[3]], mini)
    (root / "results.md").write_text(table)
    comparison_plot(mini, root)
    print(table)
    return table


def comparison_plot(mini: MiniConfig, root: Path) -> None:
    """OPD vs Guided-OPD per student size, averaged over finished seeds: training curves and KL by turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gopd_jax.reporting import read_jsonl

    fig, ax = plt.subplots(len(mini.student_hidden), 3, figsize=(14, 4 * len(mini.student_hidden)), squeeze=False)
    for row, hidden in enumerate(mini.student_hidden):
        for method in (*mini.methods, "sft"):
            runs = [read_jsonl(root / f"d{hidden}_{method}_s{s}" / "metrics.jsonl") for s in mini.seeds
                    if _final_evals(root, f"d{hidden}_{method}_s{s}")]  # finished runs only
            runs = [r for r in runs if r]
            if not runs:
                continue
            steps = range(min(len(r) for r in runs))
            mean = lambda key: [statistics.fmean(r[i].get(key, float("nan")) for r in runs) for i in steps]  # noqa: E731
            ax[row, 0].plot(steps, mean("invalid_action_frac"), label=f"{method} (n={len(runs)})")
            ax[row, 1].plot(steps, mean("teacher_turn_frac"), label=method)
            late = [t for r in runs for t in r[-3:]]
            kl = [statistics.fmean(v) if (v := [x["kl_by_turn"][i] for x in late if x["kl_by_turn"][i] is not None])
                  else float("nan") for i in range(len(late[0]["kl_by_turn"]))]
            ax[row, 2].plot(range(1, len(kl) + 1), kl, label=method)
        ax[row, 0].set(title=f"d{hidden}: invalid-action fraction in training rollouts", xlabel="step")
        ax[row, 1].set(title=f"d{hidden}: teacher-owned turn fraction", xlabel="step")
        ax[row, 2].set(title=f"d{hidden}: sampled KL to teacher by turn (last 3 steps)", xlabel="turn",
                       ylabel="nats/token")
        for a in ax[row]:
            a.legend()
    fig.tight_layout()
    fig.savefig(root / "comparison.png", dpi=80)
    plt.close(fig)


def _ms(values, digits: int = 1):
    mean = statistics.fmean(values)
    return (f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1
            else f"{mean:.{digits}f}")


def results_table(rows, mini: MiniConfig) -> str:
    """rows: (model, params, method, final evals (one per seed), late-training KLs)."""
    lines = [f"# Mini-scale Guided-OPD reproduction ({mini.env}, first {mini.eval_limit} valid_unseen games)", "",
             f"distillation: {mini.distill_steps} steps x {mini.batch_tasks} tasks from one warm-up SFT init; eval at "
             "beta 0, temperature 0.4; mean ± std over seeds (n)", "",
             "| model | params | method (n) | Score | Success Rate (%) | Rounds | valid actions (%) | "
             "train KL to teacher, last 3 steps |", "|---|---|---|---|---|---|---|---|"]
    by = {}
    for name, n, method, evals, kls in rows:
        kls = [k for k in kls if k is not None]
        lines.append(f"| {name} | {n / 1e6:.2f}M | {method} ({len(evals)}) | {_ms([e['score'] for e in evals])} | "
                     f"{_ms([e['success_rate'] for e in evals])} | {_ms([e['rounds'] for e in evals])} | "
                     f"{_ms([e['valid_action_rate'] for e in evals])} | {_ms(kls, 2) if kls else '-'} |")
        by[(name, method)] = evals
    lines += ["", "Relative change of Guided-OPD over vanilla OPD on the same seeds (paper, DESIGN.md §3: +21.1% "
                  "Score, +25.5% Success Rate, -6.0% Rounds on average):", "",
              "| student | Score | Success Rate | Rounds | valid actions |", "|---|---|---|---|---|"]
    for name, _, method, _, _ in rows:
        if method == "guided_opd" and by.get((name, "opd")):
            g, o = by[(name, "guided_opd")], by[(name, "opd")]
            cells = []
            for k in ("score", "success_rate", "rounds", "valid_action_rate"):
                a, b = statistics.fmean(e[k] for e in g), statistics.fmean(e[k] for e in o)
                cells.append(f"{100 * (a - b) / b:+.1f}%" if b else f"{a - b:+.2f} (absolute; OPD at 0)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.md from the finished runs")
    args = ap.parse_args(argv)
    mini = PRESETS[args.preset]
    mini = dataclasses.replace(mini, out_dir=args.out_dir or mini.out_dir, progress=not args.no_progress)
    report(mini) if args.report_only else run(mini)


if __name__ == "__main__":
    main()
