"""Mini-scale reproduction of the paper's central comparison, sized for a CPU machine.

Pipeline (everything real: ALFWorld games, Qwen3 / Qwen3-MoE models, the library's runner), each stage
resumable after a kill:
  1. the offline expert corpus: every train game's walkthrough replayed once (gopd_jax.expert_corpus);
  2. a byte-level BPE tokenizer trained on rendered corpus turns (prompts + replies);
  3. small dense Qwen3 students, each warmed up by a short SFT on the teacher's corpus (its recipe, no
     environment in the loop, no teacher needed), one checkpoint per size shared by every method and seed;
  4. a small Qwen3-MoE teacher trained by SFT from the cached corpus (static-shape batches, no environment
     in the loop), its success rate measured against training tokens on a stratified draw of valid_unseen,
     and finally on all of valid_unseen;
  5. from that same init: vanilla OPD, Guided-OPD (cosine curriculum) and SFT, for several seeds;
  6. evaluation on valid_unseen (beta = 0, temperature 0.4) and a results table with the paper-style
     relative gains of Guided-OPD over OPD.

    python -m experiments.mini_repro                       # the full mini table (hours on 2 CPU cores)
    python -m experiments.mini_repro --until teacher       # stages 1-4 only
    python -m experiments.mini_repro --preset quick        # minutes: the README's quickstart
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gopd_jax import expert_corpus as ec
from gopd_jax import intervals
from gopd_jax.checkpointing import Checkpointer
from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.envs.prompting import build_messages
from gopd_jax.evaluate import action_verb, evaluate_checkpoint, evaluate_policy, format_table, stratified_draw
from gopd_jax.experiment import ExperimentConfig
from gopd_jax.models import Qwen3Config, init_params, load_hf_checkpoint, save_hf_checkpoint
from gopd_jax.records import Policy
from gopd_jax.rollout import RolloutConfig, RolloutRunner
from gopd_jax.reporting import markdown_table, read_jsonl
from gopd_jax.runner import run_experiment
from gopd_jax.tokenizer import load_tokenizer, train_bpe_tokenizer
from gopd_jax.train import init_train_state, jit_update_step, make_optimizer, sft_loss_fn


@dataclasses.dataclass(frozen=True)
class MiniConfig:
    out_dir: str = "runs/mini_repro"
    env: str = "alfworld"
    # Expert corpus (tokenizer-independent; shared by every run that uses the same games).
    corpus_dir: str = "runs/corpus/alfworld_train"
    corpus_games: int | None = None  # None: every train game; else the first N of the corpus's seeded shuffle
    corpus_workers: int = 2
    corpus_min_games: int = 300  # with a build still running elsewhere, the teacher starts once this many are stored
    tokenizer_games: int = 300  # the tokenizer is trained on the first N games of the shuffle
    vocab_size: int = 1024
    k_history: int = 4  # the last 4 steps: with 1 the teacher shuttled between two receptacles (no memory)
    # Memory beyond the last k steps (teacher_prompts/: both lifted the valid-action rate / expert agreement):
    keep_first_observation: bool = True  # the room's receptacle list, in the expert's search order
    earlier_actions: bool = True  # where the agent has been: the actions older than the last k_history steps
    max_prompt_tokens: int = 992  # + the reply: rows fit the widest SFT bucket (1024)
    # Teacher: Qwen3-MoE trained by SFT from the rendered corpus.
    # The teacher's corpus: "handcoded" replays ALFWorld's searching expert into `teacher_corpus_dir`;
    # "walkthrough" (teacher_corpus_dir None) learns from `corpus_dir`. The students' SFT (warm-up, baseline) uses
    # the same expert.
    teacher_expert: str = "handcoded"
    teacher_corpus_dir: str | None = "runs/corpus/alfworld_train_handcoded"
    # The same expert on every valid_unseen game (30 turns): at each teacher evaluation, the % of its turns whose
    # action the teacher's greedy decoding reproduces (expert_corpus.expert_agreement); None: not measured.
    agreement_corpus_dir: str | None = "runs/corpus/alfworld_valid_unseen_handcoded"
    # DAgger rounds after the SFT steps (see collect_dagger); 0 = none.
    dagger_rounds: int = 2
    dagger_games: int = 120
    dagger_beta: float = 0.5
    dagger_steps: int = 300
    dagger_repeat: int = 4
    teacher_layers: int = 4
    teacher_hidden: int = 128
    teacher_experts: int = 4
    teacher_steps: int = 6000  # ~1.6 epochs of the corpus' won games (1,500 steps reached 43% expert agreement)
    teacher_tokens_per_batch: int = 8192
    teacher_lr: float = 2e-3
    # Weight per prompt token in the teacher's SFT loss (replies weigh 1): a teacher trained from scratch sees
    # ~80 reply tokens per 8k-token step; the prompts teach it to read and copy its context.
    teacher_prompt_weight: float = 0.1
    teacher_eval_steps: tuple[int, ...] = (500, 1000, 2000, 3000, 4000, 5000)  # + the end of every phase
    teacher_eval_games: int = 30  # intermediate evals: a seeded draw stratified over task types
    teacher_eval_turns: int = 30
    teacher_final_eval_games: int | None = None  # None: every valid_unseen game
    teacher_checkpoint_every: int = 100
    teacher_log_every: int = 10
    # Two dense students (0.25M / 0.52M parameters with 4 layers; the teacher has 1.21M). After 1,000 warm-up steps
    # they won 0-1.5% of valid_unseen, and 50 distillation steps did not lift them off zero under either method
    # (results/mini_repro/grid_start_v2): 3,000 steps aim at students that win some games, far below the teacher.
    student_hidden: tuple[int, ...] = (64, 96)
    student_layers: int = 4
    warmup_sft_steps: int = 3000
    warmup_eval_steps: tuple[int, ...] = (1000, 2000)  # the warm-up's own curve, as the teacher's: how fast it learns
    # The OPD pilot's reverse KL (lr 1e-3, exact, 15-turn rollouts) flattened after ~35 updates; training success
    # stayed 0% at every step, so it cannot mark the plateau. 50 steps = 200 games a run (results/mini_repro/opd_pilot).
    distill_steps: int = 50
    batch_tasks: int = 4
    # Every distillation method's rate (and the SFT baseline's). The SFT rate, 2e-3, broke a student in two OPD
    # updates (results/mini_repro/opd_pilot). 1e-3, stable in that 15-turn pilot, more than doubled d96's reverse KL
    # in OPD's first 4 steps on 30-turn rollouts and cost it its wins; 3e-4 did not (results/mini_repro/grid_lr1e-3).
    learning_rate: float = 3e-4
    # The reverse KL's estimator: with a 1,024-token vocabulary the exact sum over it is cheap, and its gradient has
    # none of the single-sample estimate's variance (the sampled one at lr 2e-3 broke the student in two steps).
    estimator: str = "exact"
    methods: tuple[str, ...] = ("opd", "guided_opd")
    seeds: tuple[int, ...] = (0, 1, 2)
    # Baselines from the same init on these seeds: SFT on expert trajectories, TCOD (both directions), fixed beta.
    baselines: tuple[str, ...] = ("sft", "tcod_f2b", "tcod_b2f", "fixed_beta")
    baseline_seeds: tuple[int, ...] = (0,)
    fixed_beta: float = 0.5
    # Every final model on the whole of these splits (per-game outcomes: intervals, paired differences);
    # empty: the runs' own final evaluations on `eval_limit` stratified games.
    final_eval_splits: tuple[str, ...] = ("valid_unseen", "valid_seen")
    final_eval_turns: int = 30
    # Another value than the paper's writes its own files (full_eval_<split>_t<T>.json), so evaluations at two
    # temperatures never mix and a start evaluated at the paper's is still the same start.
    final_eval_temperature: float = ExperimentConfig.eval_temperature
    # Distillation rollouts, as the paper (30 on ALFWorld): the handcoded expert needs 18 turns on average (median 16),
    # so a 15-turn cap (the pilots') ends most games before even the expert could win them.
    max_turns: int = 30
    max_new_tokens: int = 24
    eval_limit: int = 30
    num_workers: int = 2  # environment worker processes (the reference machine has 2 cores)
    progress: bool = True
    quiet: bool = False  # one console line per stage; each stage's own output goes to <out_dir>/logs/
    resume_anyway: bool = False  # continue a distillation run although its worker count differs (RUN_ONLY_FIELDS)

    def __post_init__(self):
        if self.tokenizer_games > self.corpus_min_games:
            raise ValueError(f"tokenizer_games ({self.tokenizer_games}) must be <= corpus_min_games "
                             f"({self.corpus_min_games}): the tokenizer trains on games the corpus already holds")


PRESETS = {
    "full": MiniConfig(),
    "quick": MiniConfig(out_dir="runs/quickstart", corpus_dir="runs/quickstart/corpus", corpus_games=12,
                        teacher_expert="walkthrough", teacher_corpus_dir=None, dagger_rounds=0,
                        corpus_min_games=12, tokenizer_games=12, vocab_size=512, teacher_layers=2, teacher_hidden=64,
                        teacher_experts=4, teacher_steps=40, teacher_tokens_per_batch=4096,
                        teacher_eval_steps=(), teacher_eval_games=6, teacher_eval_turns=6,
                        teacher_final_eval_games=6, agreement_corpus_dir=None,
                        teacher_checkpoint_every=20, student_hidden=(32,), student_layers=2, warmup_eval_steps=(),
                        warmup_sft_steps=2, distill_steps=3, learning_rate=1e-3,  # 3 steps must move the demo
                        batch_tasks=2, methods=("opd", "guided_opd"),
                        seeds=(0,), baselines=(), final_eval_splits=(), max_turns=4, max_new_tokens=12, eval_limit=4,
                        num_workers=2),
}


def _base(mini: MiniConfig, **kw) -> ExperimentConfig:
    """The runner settings shared by every stage (tiny models: no thinking, short replies, float32); `kw` adds
    or overrides settings."""
    shared = dict(env=mini.env, think=False, k_history=mini.k_history,
                  keep_first_observation=mini.keep_first_observation, earlier_actions=mini.earlier_actions,
                  max_turns=mini.max_turns, expert=mini.teacher_expert, max_prompt_tokens=mini.max_prompt_tokens,
                  max_new_tokens=mini.max_new_tokens, compute_dtype="float32", batch_tasks=mini.batch_tasks,
                  learning_rate=mini.learning_rate, micro_batch_rows=8, estimator=mini.estimator,
                  num_workers=mini.num_workers, eval_limit=mini.eval_limit, eval_every=0, checkpoint_every=10,
                  progress=mini.progress, resume_anyway=mini.resume_anyway)
    return ExperimentConfig(**(shared | kw))


# Packed full train corpora shipped with the repository, per (environment, expert): a fresh machine replays nothing.
SNAPSHOTS = {("alfworld", "walkthrough"): Path(__file__).parent / "data" / "alfworld_train_corpus.tar.xz",
             ("alfworld", "handcoded"): Path(__file__).parent / "data" / "alfworld_train_handcoded_corpus.tar.xz"}


# The pipeline's starting point as shipped with the repository (tokenizer, both warm-ups, the teacher; see
# pack_start): the machine a grid runs on may be wiped between sessions, and the teacher alone costs hours.
START_SNAPSHOT = Path(__file__).parent / "data" / "mini_repro_start.tar.xz"
# Settings only the distillation runs read (or whose results go to files of their own): a start made under other
# values of these is the same start.
GRID_ONLY_FIELDS = frozenset({"out_dir", "progress", "quiet", "resume_anyway", "num_workers", "corpus_workers",
                              "corpus_min_games", "distill_steps", "batch_tasks", "learning_rate", "estimator",
                              "methods", "seeds", "baselines", "baseline_seeds", "fixed_beta",
                              "final_eval_temperature"})


def start_settings(mini: MiniConfig) -> dict:
    """The settings that make the start (as JSON values): what a shipped start must agree with to be used."""
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(mini))).items() if k not in GRID_ONLY_FIELDS}


def pack_start(mini: MiniConfig, archive: str | Path) -> Path:
    """`out_dir`'s tokenizer, warm-ups and teacher with their run files as one .tar.xz. A finished stage goes
    without its checkpoints and DAgger corpora; an unfinished one with its latest checkpoint and its DAgger
    corpora, so the pipeline resumes it where it stopped."""
    import io
    import tarfile

    root = Path(mini.out_dir)
    names = ["tokenizer", *(f"d{h}_warmup" for h in mini.student_hidden), "teacher"]
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise ValueError(f"{root} has no {missing}: run `--until teacher` (or `--offline`) first")
    keep = {}
    for name in names:
        steps = [int(p.name) for p in (root / name / "checkpoints").glob("*") if p.name.isdigit()]
        keep[name] = None if (root / name / "final_eval.json").is_file() or not steps else str(max(steps))

    def member(info):  # arcname: <stage>/<path inside it>
        stage_name, *rest = Path(info.name).parts
        if rest[:1] == ["checkpoints"] and len(rest) > 1 and rest[1] != keep[stage_name]:
            return None
        if rest[:1] == ["dagger"] and keep[stage_name] is None:
            return None
        return info

    settings = json.dumps(start_settings(mini), indent=2).encode()
    with tarfile.open(archive, "w:xz") as tar:
        info = tarfile.TarInfo("start.json")
        info.size = len(settings)
        tar.addfile(info, io.BytesIO(settings))
        for name in names[::-1]:  # the tokenizer last: unpack_start extracts it last, as the mark of a whole start
            tar.add(root / name, arcname=name, filter=member)
    return Path(archive)


def unpack_start(mini: MiniConfig, archive: str | Path = START_SNAPSHOT) -> bool:
    """Seeds an `out_dir` that has no tokenizer yet with a `pack_start` archive made under the same start
    settings; True when it did. Settings that differ are named and nothing is unpacked."""
    import tarfile

    root = Path(mini.out_dir)
    if not Path(archive).is_file() or (root / "tokenizer").exists():
        return False
    with tarfile.open(archive, "r:xz") as tar:
        saved, ours = json.load(tar.extractfile("start.json")), start_settings(mini)
        differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
        if differ:
            if not mini.quiet:  # a quiet run prints one line per stage
                print(f"[mini_repro] the shipped start {archive} was made with other settings ({', '.join(differ)}): "
                      "building the start here", flush=True)
            return False
        members = sorted((m for m in tar.getmembers() if m.name != "start.json"),
                         key=lambda m: m.name.startswith("tokenizer"))
        tar.extractall(root, members=members, filter="data")
    print(f"[mini_repro] tokenizer, warm-ups and teacher unpacked from {archive} into {root} "
          "(--from-scratch trains them instead)", flush=True)
    return True


def build_expert_corpus(mini: MiniConfig) -> Path:
    """Stage 1. The walkthrough corpus (tokenizer, SFT baseline; the teacher's too when `teacher_corpus_dir`
    is None)."""
    snapshot = SNAPSHOTS.get((mini.env, "walkthrough")) if mini.corpus_games is None else None
    return _corpus_stage(mini, Path(mini.corpus_dir), lambda: ec.build_corpus(
        mini.env, "train", mini.corpus_dir, num_workers=mini.corpus_workers, limit=mini.corpus_games,
        progress=mini.progress, snapshot=snapshot))


def _corpus_stage(mini: MiniConfig, corpus: Path, build) -> Path:
    """Builds (or resumes) a corpus here, unless a build started elsewhere holds it: then waits until it has
    the first `corpus_min_games` games of its shuffle and goes on (the teacher's later epochs take up the
    new shards)."""
    if corpus.is_dir() and _build_running(corpus):
        first = set(_shuffled_game_ids(mini, corpus)[:mini.corpus_min_games])
        while missing := first - {r["game"] for r in ec.load_corpus(corpus)}:
            print(f"[mini_repro] {corpus}: waiting for the running build ({len(missing)} of the first "
                  f"{mini.corpus_min_games} games to go)", flush=True)
            time.sleep(60)
        return corpus
    return build()


def _shuffled_game_ids(mini: MiniConfig, corpus: str | Path) -> list[str]:
    """Train games in a corpus's build order (its seeded shuffle)."""
    tasks = list_tasks(mini.env, "train")
    seed = ec.corpus_meta(corpus)["seed"]
    return [tasks[i].game_id for i in np.random.default_rng(seed).permutation(len(tasks))]


def _build_running(corpus: Path) -> bool:
    with open(corpus / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def rollout_settings(mini: MiniConfig, max_turns: int | None = None,
                     temperature: float = ExperimentConfig.eval_temperature) -> RolloutConfig:
    """The prompt format every stage shares (teacher and students): no thinking, k_history, prompt cap."""
    return RolloutConfig(env=mini.env, max_turns=max_turns or mini.max_turns, max_new_tokens=mini.max_new_tokens,
                         temperature=temperature, k_history=mini.k_history,
                         keep_first_observation=mini.keep_first_observation,
                         earlier_actions=mini.earlier_actions, think=False,
                         max_prompt_tokens=mini.max_prompt_tokens)


def build_tokenizer(mini: MiniConfig, out: Path):
    """Stage 2. A byte-level BPE trained on the rendered text of the first `tokenizer_games` games of the
    corpus's seeded shuffle (prompts as the agent sees them, and replies)."""
    if (out / "tokenizer.json").is_file():
        return load_tokenizer(out)
    by_id = {r["game"]: r for r in ec.load_corpus(mini.corpus_dir)}
    records = [by_id[g] for g in _shuffled_game_ids(mini, mini.corpus_dir)[:mini.tokenizer_games] if g in by_id]
    texts = []
    for t in ec.iter_turns(records):
        texts += [m["content"] for m in build_messages(t.goal, list(t.history), t.observation, t.admissible_actions,
                                                       mini.env, k_history=mini.k_history, think=False,
                                                       keep_first=mini.keep_first_observation,
                                                       earlier_actions=mini.earlier_actions)]
        texts.append(f"<action>{t.action}</action>")
    return train_bpe_tokenizer(texts, mini.vocab_size, out)


def _eval_teacher(mini: MiniConfig, tokenizer, params, config: Qwen3Config, tasks: list, seed: int) -> dict:
    with EnvPool(mini.env, num_workers=mini.num_workers) as pool:
        runner = RolloutRunner(pool, tokenizer, rollout_settings(mini, max_turns=mini.teacher_eval_turns))
        summary, _ = evaluate_policy(runner, tasks, Policy(params, config), jax.random.PRNGKey(seed), mini.progress)
    return summary


def _write_curve(out: Path, curve: list[dict]) -> None:
    (out / "curve.json").write_text(json.dumps(curve, indent=2))
    def agreement(c):
        a = c.get("agreement")
        return f"{a['agreement']:.1f} | {a['reply_nll']:.3f}" if a else "- | -"

    lines = ["| step | phase | epoch | corpus games | train tokens (M) | loss tokens (M) | reply loss | "
             "expert agreement (%) | valid_unseen reply NLL | eval games | Success Rate (%) | valid actions (%) | "
             "Rounds |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['phase']} | {c['epoch']} | {c['corpus_games']} | {c['train_tokens'] / 1e6:.2f} | "
              f"{c['loss_tokens'] / 1e6:.3f} | {c.get('reply_loss', c['train_loss']):.3f} | {agreement(c)} | "
              f"{c['eval']['n']} | {c['eval']['success_rate']:.1f} | "
              f"{c['eval']['valid_action_rate']:.1f} | {c['eval']['rounds']:.1f} |" for c in curve]
    (out / "curve.md").write_text("\n".join(lines) + "\n")


def teacher_corpus_dir(mini: MiniConfig) -> str:
    return mini.teacher_corpus_dir or mini.corpus_dir


def build_teacher_corpus(mini: MiniConfig) -> Path:
    """Stage 1b. The corpus the teacher learns from when it is not the walkthrough corpus: ALFWorld's handcoded
    expert, which searches receptacles the way an agent that cannot see inside them must (the walkthroughs go
    straight to the object, so a model copying them learns to take objects that are not there)."""
    corpus = teacher_corpus_dir(mini)
    snapshot = SNAPSHOTS.get((mini.env, mini.teacher_expert)) if mini.corpus_games is None else None
    built = _corpus_stage(mini, Path(corpus), lambda: ec.build_corpus(
        mini.env, "train", corpus, num_workers=mini.corpus_workers, limit=mini.corpus_games,
        max_turns=mini.teacher_eval_turns, progress=mini.progress, env_kwargs={"expert": mini.teacher_expert},
        snapshot=snapshot))
    if mini.agreement_corpus_dir:
        ec.build_corpus(mini.env, "valid_unseen", mini.agreement_corpus_dir, num_workers=mini.corpus_workers,
                        max_turns=mini.teacher_eval_turns, progress=mini.progress,
                        env_kwargs={"expert": mini.teacher_expert})
    return built


def sft_widths(mini: MiniConfig) -> tuple[int, ...]:
    """Every multiple of 128 up to the widest bucket: rows of ~600 tokens would waste 40% of a 1024-wide batch."""
    return tuple(range(128, ec.bucket_widths(mini.max_prompt_tokens + 32)[-1] + 1, 128))


def teacher_agreement(mini: MiniConfig, tokenizer, params, config: Qwen3Config) -> dict | None:
    """expert_corpus.expert_agreement of the teacher on the validation expert corpus (every turn, won or not)."""
    if not mini.agreement_corpus_dir:
        return None
    rendered = ec.render_corpus(mini.agreement_corpus_dir, tokenizer, rollout_settings(mini), won_only=False,
                                progress=False)
    # Which kinds of expert action the teacher gets wrong (search moves, object ids, appliance use) says what it
    # still lacks better than the total does.
    verbs = [action_verb(tokenizer.decode(rendered.row(i)[1], skip_special_tokens=True)) for i in range(len(rendered))]
    return ec.expert_agreement(params, config, rendered, mini.teacher_tokens_per_batch, sft_widths(mini),
                               pad_id=tokenizer.pad_token_id or 0, labels={"action": verbs})


def collect_dagger(mini: MiniConfig, tokenizer, params, config: Qwen3Config, out: Path, round_: int,
                   sft_steps: int) -> Path:
    """One DAgger round: the current teacher plays `dagger_games` train games (a seeded draw per round), the
    handcoded expert taking each turn with probability `dagger_beta` (the Guided-OPD idea: stay near the
    expert's states early); every state reached is labelled with the expert's action for it. Resumable."""
    from gopd_jax.methods import owners_from_beta
    from gopd_jax.records import EXPERT, STUDENT, TEACHER

    def play(pool, tasks):
        runner = RolloutRunner(pool, tokenizer, rollout_settings(mini, max_turns=mini.teacher_eval_turns))
        return ec.play_episodes(runner, tasks, {STUDENT: Policy(params, config), TEACHER: EXPERT},
                                owners_from_beta(mini.dagger_beta), jax.random.PRNGKey(round_), labelled=True,
                                chunk=25)

    return ec.build_corpus(mini.env, "train", out, num_workers=mini.num_workers, limit=mini.dagger_games,
                           seed=1000 + round_, max_turns=mini.teacher_eval_turns, progress=mini.progress,
                           env_kwargs={"expert": "handcoded"}, play=play,
                           player=f"teacher step {sft_steps + (round_ - 1) * mini.dagger_steps}, "
                                  f"expert beta {mini.dagger_beta}")


# What a corpus-trained stage's weights depend on besides its architecture (the rendering, the SFT recipe, the
# step counts): a stage on disk made under other values is refused rather than silently reused.
SFT_FIELDS = ("teacher_expert", "vocab_size", "k_history", "keep_first_observation", "earlier_actions",
              "max_prompt_tokens", "teacher_lr", "teacher_tokens_per_batch", "teacher_prompt_weight")
WARMUP_FIELDS = (*SFT_FIELDS, "warmup_sft_steps")
TEACHER_FIELDS = (*SFT_FIELDS, "teacher_steps", "dagger_rounds", "dagger_steps", "dagger_games", "dagger_beta",
                  "dagger_repeat")


def check_stage_settings(out: Path, mini: MiniConfig, config: Qwen3Config, fields: Sequence[str]) -> None:
    """Raises when `out` holds a stage (its config.json) trained with another architecture or other `fields`."""
    path = out / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    ours = json.loads(json.dumps({"model": dataclasses.asdict(config), **{k: getattr(mini, k) for k in fields}}))
    theirs = {"model": saved["model"], **{k: saved["mini"].get(k) for k in fields}}
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        raise ValueError(f"{out} was trained with other settings: "
                         + "; ".join(f"{k} {theirs[k]} there, {ours[k]} here" for k in differ)
                         + f". Use another --out-dir, or delete {out} to train it again with these settings")


def train_teacher(mini: MiniConfig, tokenizer, out: Path, offline: bool = False) -> str | None:
    """Stage 4. SFT of a Qwen3-MoE teacher from the rendered corpus, then `dagger_rounds` DAgger rounds (each:
    collect labelled episodes of the current teacher, then `dagger_steps` more steps on the corpus plus every
    round so far, the rounds' rows repeated `dagger_repeat` times). Returns the final model directory (None when
    `offline` stopped before a DAgger round, see train_on_corpus)."""
    final = out / "final_model"
    config = _teacher_config(mini, len(tokenizer))
    check_stage_settings(out, mini, config, TEACHER_FIELDS)
    if (out / "final_eval.json").is_file():
        if mini.final_eval_splits and not offline:  # those not written yet, e.g. at another temperature
            final_evaluation(mini, out)
        return str(final)
    if not train_on_corpus(mini, tokenizer, out, config, steps=mini.teacher_steps,
                           dagger_rounds=mini.dagger_rounds, eval_steps=mini.teacher_eval_steps, offline=offline):
        return None
    if offline:
        return str(final)
    if mini.final_eval_splits:  # the same whole-split evaluations as every student's
        final_evaluation(mini, out)
        summary = json.loads((out / full_eval_name(mini, mini.final_eval_splits[0])).read_text())
    else:
        tasks = list_tasks(mini.env, "valid_unseen")
        if mini.teacher_final_eval_games is not None:
            tasks = stratified_draw(tasks, mini.teacher_final_eval_games, seed=1)
        summary = _eval_teacher(mini, tokenizer, *load_hf_checkpoint(final, dtype=jnp.float32), tasks, seed=1)
    (out / "final_eval.json").write_text(json.dumps(summary, indent=2))
    print(f"[mini_repro] teacher on {summary['n']} valid_unseen games:\n{format_table(summary)}", flush=True)
    return str(final)


def warm_up_student(mini: MiniConfig, tokenizer, out: Path, hidden: int, offline: bool = False) -> str | None:
    """Stage 3. A dense student's warm-up: `warmup_sft_steps` of the teacher's SFT recipe on the same corpus,
    from a seeded init; its checkpoint is the start of every method and seed. `offline`: training only (see
    train_on_corpus)."""
    final = out / "final_model"
    config = _dense(len(tokenizer), hidden, mini.student_layers)
    check_stage_settings(out, mini, config, WARMUP_FIELDS)
    if not (out / "final_eval.json").is_file():
        trained = train_on_corpus(mini, tokenizer, out, config, steps=mini.warmup_sft_steps, dagger_rounds=0,
                                  eval_steps=mini.warmup_eval_steps, offline=offline)
        if offline:
            return trained
        # The evaluation every distilled student's run ends with (seed 0's draw), so start and end compare.
        summary = evaluate_checkpoint(_base(mini, name=out.name, out_dir=str(out), seed=0), str(final))
        (out / "final_eval.json").write_text(json.dumps(summary, indent=2))
    final_evaluation(mini, out)
    return str(final)


def train_on_corpus(mini: MiniConfig, tokenizer, out: Path, config: Qwen3Config, *, steps: int, dagger_rounds: int,
                    eval_steps: Sequence[int], offline: bool = False) -> str | None:
    """`steps` SFT steps of `config` from the rendered corpus (prompt tokens at `teacher_prompt_weight`), then
    `dagger_rounds` DAgger rounds of `dagger_steps`; one learning-rate schedule over all steps. Checkpointed and
    resumable. Success rate against training tokens on a stratified valid_unseen draw at `eval_steps` (and at
    the end of every phase when there are any), with the expert agreement. Returns the final model directory.

    `offline`: no environment (an accelerator machine without ALFWorld): the evaluations are skipped (logged in
    offline.jsonl) and training stops at the first DAgger round, which plays games; returns None when it stopped
    there. The same call without `offline` resumes from that checkpoint."""
    final = out / "final_model"
    out.mkdir(parents=True, exist_ok=True)
    render = rollout_settings(mini)
    (out / "config.json").write_text(json.dumps({"mini": dataclasses.asdict(mini), "model": dataclasses.asdict(config),
                                                 "params": config.num_params()}, indent=2))
    total = steps + dagger_rounds * mini.dagger_steps
    bounds = [0, *(steps + r * mini.dagger_steps for r in range(dagger_rounds + 1))]
    # Each (phase, epoch) trains on the shards stored when it starts (a corpus still being built grows between
    # epochs); epochs.json pins them so a resumed run replays the same batches.
    epochs_file = out / "epochs.json"
    epochs = json.loads(epochs_file.read_text()) if epochs_file.is_file() else {}
    dagger_dirs = [out / "dagger" / f"round-{r}" for r in range(1, dagger_rounds + 1)]

    @functools.lru_cache(maxsize=2)
    def corpus_for(phase: int, epoch: int) -> ec.RenderedCorpus:
        key = f"{phase}/{epoch}"
        if key not in epochs:
            epochs[key] = sorted(p.name for p in Path(teacher_corpus_dir(mini)).glob("shard-*.jsonl"))
            epochs_file.write_text(json.dumps(epochs))
        parts = [ec.render_corpus(teacher_corpus_dir(mini), tokenizer, render, shards=epochs[key],
                                  progress=mini.progress)]
        parts += [ec.render_corpus(d, tokenizer, render, progress=mini.progress)
                  for d in dagger_dirs[:phase]] * mini.dagger_repeat
        return ec.concat_corpora(parts)

    schedule = optax.warmup_cosine_decay_schedule(0.0, mini.teacher_lr, min(200, total // 10 + 1), total,
                                                  end_value=mini.teacher_lr / 10)
    optimizer = make_optimizer(schedule, weight_decay=0.01)
    state = init_train_state(init_params(config, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(0))
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=2)
    totals = {"train_tokens": 0, "loss_tokens": 0}
    start = 0
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(state)
        start, totals = extra["next_step"], extra["totals"]
        print(f"[mini_repro] {out.name}: resumed at step {start}", flush=True)
    curve = json.loads((out / "curve.json").read_text()) if (out / "curve.json").is_file() else []
    curve = [c for c in curve if c["step"] <= start]
    update = jit_update_step(functools.partial(sft_loss_fn, config=config, prompt_weight=mini.teacher_prompt_weight),
                             optimizer)
    eval_tasks = None  # drawn at the first evaluation: listing the games needs the environment's data
    widths = sft_widths(mini)
    skipped = []
    # A resumed run drops what the killed one logged past its checkpoint.
    logged = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] <= start]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    log = open(out / "metrics.jsonl", "a")
    # Where the steps ran and the curve points they owe, rewritten with every checkpoint: a killed offline run keeps
    # the record of exactly the steps its checkpoint holds.
    offline_log = read_jsonl(out / "offline.jsonl")
    step = start
    while step < total:
        phase = max(p for p in range(len(bounds) - 1) if bounds[p] <= step)
        if phase and offline:
            print(f"[mini_repro] {out.name}: stopped at step {step}, before DAgger round {phase} (it plays games): "
                  "resume without --offline where the environment runs", flush=True)
            break
        if phase:  # params here are the phase's start: a checkpoint is always saved at a phase boundary
            collect_dagger(mini, tokenizer, state.params, config, dagger_dirs[phase - 1], phase, steps)
        t0, losses = time.perf_counter(), []
        for local, epoch, batch in ec.sft_batches(functools.partial(corpus_for, phase), mini.teacher_tokens_per_batch,
                                                  seed=phase, start_step=step - bounds[phase], widths=widths,
                                                  pad_id=tokenizer.pad_token_id or 0):
            if bounds[phase] + local >= bounds[phase + 1]:
                break
            state, metrics = update(state, batch)
            totals["train_tokens"] += int((batch["tokens"] != (tokenizer.pad_token_id or 0)).sum())
            totals["loss_tokens"] += int(batch["loss_mask"].sum())
            losses.append((metrics["loss"], metrics["reply_loss"]))  # read back at log time: no host sync per step
            step = done = bounds[phase] + local + 1
            if done % mini.teacher_log_every == 0:
                loss, reply_loss = np.mean(jax.device_get(losses), axis=0).tolist()
                rec = {"step": done, "phase": phase, "epoch": epoch, "loss": loss, "reply_loss": reply_loss, **totals,
                       "s_per_step": (time.perf_counter() - t0) / len(losses), "width": batch["tokens"].shape[1]}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(f"[mini_repro] {out.name} step {done}/{total} phase {phase} epoch {epoch} loss {loss:.3f} "
                      f"(replies {reply_loss:.3f}) "
                      f"tokens {totals['train_tokens'] / 1e6:.2f}M ({rec['s_per_step']:.2f} s/step)", flush=True)
                t0, losses = time.perf_counter(), []
            due = done in eval_steps or (done in bounds[1:] and eval_steps)
            if due and offline:
                skipped.append(done)
            elif due:
                eval_tasks = eval_tasks or stratified_draw(list_tasks(mini.env, "valid_unseen"),
                                                           mini.teacher_eval_games, seed=0)
                summary = _eval_teacher(mini, tokenizer, state.params, config, eval_tasks, seed=done)
                curve.append({"step": done, "phase": phase, "epoch": epoch,
                              "corpus_games": len(corpus_for(phase, epoch).games), **totals,
                              "train_loss": float(metrics["loss"]), "reply_loss": float(metrics["reply_loss"]),
                              "agreement": teacher_agreement(mini, tokenizer, state.params, config),
                              "eval": summary})
                _write_curve(out, curve)
                print(f"[mini_repro] {out.name} step {done}: {summary['success_rate']:.1f}% success on "
                      f"{summary['n']} stratified valid_unseen games", flush=True)
                t0 = time.perf_counter()  # the step timing excludes evaluations
            if done % mini.teacher_checkpoint_every == 0 or done in bounds[1:]:
                ckpt.save(done, state, {"next_step": done, "totals": totals})
                if offline:
                    ran = {"steps": [start, done], "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                           "skipped_evaluations": skipped}
                    (out / "offline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*offline_log, ran]))
    log.close()
    ckpt.close()
    if step < total:
        return None
    save_hf_checkpoint(jax.device_get(state.params), config, final)
    tokenizer.save_pretrained(final)
    return str(final)


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


STAGES = ("corpus", "tokenizer", "warmup", "teacher", "all")


@contextlib.contextmanager
def stage(mini: MiniConfig, name: str, what: str):
    """Announces a stage. With `mini.quiet` the stage's own output (configs, progress) goes to
    `<out_dir>/logs/<name>.log` and the console gets one line when the stage ends."""
    if not mini.quiet:
        print(f"[mini_repro] {name}: {what}", flush=True)
        yield
        return
    log = Path(mini.out_dir) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield
    print(f"[mini_repro] {name:<20} {time.perf_counter() - t0:5.0f} s  {what}  (log: {log})", flush=True)


def run(mini: MiniConfig, until: str = "all", only: str | None = None, offline: bool = False,
        from_scratch: bool = False) -> str:
    """The pipeline up to and including stage `until`; with `only` ("warmup" or "teacher") just that stage after
    the corpus and tokenizer it needs, e.g. the warm-ups and the teacher in two processes. `offline`: only the
    training that needs no environment (see train_on_corpus), from a corpus and tokenizer already built. A fresh
    `out_dir` starts from the shipped START_SNAPSHOT when its settings agree, unless `from_scratch`."""
    if only not in (None, "warmup", "teacher"):
        raise ValueError(f"only must be 'warmup' or 'teacher', got {only!r}")
    root = Path(mini.out_dir)
    if not offline:
        with stage(mini, "corpus", f"expert corpus in {mini.corpus_dir}"):
            build_expert_corpus(mini)
        if mini.teacher_corpus_dir:
            with stage(mini, "teacher_corpus", f"{mini.teacher_expert} expert corpus in {mini.teacher_corpus_dir}"):
                build_teacher_corpus(mini)
    if until == "corpus":
        return ""
    if not from_scratch:
        unpack_start(mini)
    if offline:
        missing = [p for p in (Path(teacher_corpus_dir(mini)) / "meta.json", root / "tokenizer" / "tokenizer.json")
                   if not p.is_file()]
        if missing:
            raise SystemExit(f"--offline trains from a corpus and tokenizer already on disk; missing {missing}: build "
                             "them with --until tokenizer on a machine with the environment, and copy them here")
    with stage(mini, "tokenizer", f"BPE tokenizer ({mini.vocab_size} tokens) in {root / 'tokenizer'}"):
        tokenizer = build_tokenizer(mini, root / "tokenizer")
    vocab = len(tokenizer)
    if until == "tokenizer":
        return ""
    students = {}
    for hidden in mini.student_hidden if only != "teacher" else ():
        name = f"d{hidden}_warmup"
        with stage(mini, name, f"dense student d{hidden}, {mini.warmup_sft_steps} warm-up SFT steps on the corpus, "
                               f"in {root / name}"):
            students[hidden] = warm_up_student(mini, tokenizer, root / name, hidden, offline)
    if until == "warmup" or only == "warmup":
        return ""
    with stage(mini, "teacher", f"Qwen3-MoE teacher ({_teacher_config(mini, vocab).num_params() / 1e6:.2f}M params), "
                                f"{mini.teacher_steps} SFT steps from the corpus + {mini.dagger_rounds} DAgger rounds "
                                f"of {mini.dagger_steps}, in {root / 'teacher'}"):
        teacher = train_teacher(mini, tokenizer, root / "teacher", offline)
    if until == "teacher" or only == "teacher" or offline:
        return ""
    table = ""
    for seed, hidden, method in grid_order(mini):
        name = f"d{hidden}_{method}_s{seed}"
        with stage(mini, name, f"{method}, {mini.distill_steps} steps, in {root / name}"):
            train_stage(_base(mini, name=name, out_dir=str(root / name), method=method, student=students[hidden],
                              teacher=teacher, steps=mini.distill_steps, seed=seed,
                              beta=mini.fixed_beta if method == "fixed_beta" else 0.0))
        final_evaluation(mini, root / name)
        with stage(mini, "report", f"results table in {root / 'results.md'}"):
            table = report(mini)
    return table


def grid_order(mini: MiniConfig) -> list[tuple[int, int, str]]:
    """(seed, student hidden size, method) of every distillation run, in the order they run: the compared methods
    seed by seed (an interrupted grid still compares them on the same seeds, with the most seeds soonest), then
    the baselines, which run on fewer seeds."""
    return ([(s, h, m) for s in mini.seeds for h in mini.student_hidden for m in mini.methods]
            + [(s, h, m) for s in mini.baseline_seeds for h in mini.student_hidden for m in mini.baselines])


def full_eval_name(mini: MiniConfig, split: str) -> str:
    """The file of a whole-split evaluation: full_eval_<split>.json at the paper's temperature (ExperimentConfig's
    eval_temperature, 0.4), else with the temperature in the name."""
    t = mini.final_eval_temperature
    at = "" if t == ExperimentConfig.eval_temperature else f"_t{t:g}"
    return f"full_eval_{split}{at}.json"


def final_evaluation(mini: MiniConfig, run_dir: Path) -> None:
    """A run's final model on every game of `final_eval_splits` at `final_eval_turns` turns and
    `final_eval_temperature`, each split written once (see full_eval_name; per-game outcomes included)."""
    for split in mini.final_eval_splits:
        path = run_dir / full_eval_name(mini, split)
        if path.is_file():
            continue
        with stage(mini, f"{run_dir.name}_eval", f"{run_dir.name} on all of {split}"
                                                 f" at temperature {mini.final_eval_temperature:g}"):
            cfg = _base(mini, name=run_dir.name, out_dir=str(run_dir), eval_split=split, eval_limit=0,
                        max_turns=mini.final_eval_turns, eval_temperature=mini.final_eval_temperature)
            summary = evaluate_checkpoint(cfg, str(run_dir / "final_model"))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(path)


def _final_evals(mini: MiniConfig, root: Path, name: str, split: str | None = None) -> list[dict]:
    """A finished run's final evaluation on `split` (default: the first of `final_eval_splits`; without any,
    the run's own final evaluation on its stratified draw); [] while it is missing. Without `split`, a run counts
    as finished once every split is written (a report made while it is being evaluated leaves it out)."""
    files = ([full_eval_name(mini, split)] if split
             else [full_eval_name(mini, s) for s in mini.final_eval_splits] or ["final_eval.json"])
    paths = [root / name / f for f in files]
    return [json.loads(paths[0].read_text())] if all(p.is_file() for p in paths) else []


def _logged_mean(records: list[dict], key: str) -> float | None:
    """Mean of a training-log field over `records`; a per-turn list (kl_by_turn) counts each turn. None when no
    record has a value (a turn position no episode reached is logged as None)."""
    logged = [r.get(key) for r in records]
    values = [v for x in logged for v in (x if isinstance(x, list) else [x]) if v is not None]
    return statistics.fmean(values) if values else None


def _late_kl(root: Path, name: str, last: int = 3) -> float | None:
    """Teacher-student sampled KL (nats/token, host-computed per turn) over the run's last steps."""
    return _logged_mean(read_jsonl(root / name / "metrics.jsonl")[-last:], "kl_by_turn")  # cut-off line dropped


def report(mini: MiniConfig) -> str:
    """Build results.md from the finished runs on disk (also usable while the grid is still running)."""
    root = Path(mini.out_dir)
    vocab = len(load_tokenizer(root / "tokenizer"))
    trained = "SFT" + (f" + {mini.dagger_rounds} DAgger rounds" if mini.dagger_rounds else "")
    rows = [("teacher (MoE)", _teacher_config(mini, vocab).num_params(), trained, ["teacher"])]
    for hidden in mini.student_hidden:
        n = _dense(vocab, hidden, mini.student_layers).num_params()
        rows.append((f"student d{hidden}", n, "warm-up SFT (start)", [f"d{hidden}_warmup"]))
        # Methods compared on the seeds where every compared method has finished.
        seeds = [s for s in mini.seeds if all(_final_evals(mini, root, f"d{hidden}_{m}_s{s}") for m in mini.methods)]
        rows += [(f"student d{hidden}", n, m, [f"d{hidden}_{m}_s{s}" for s in seeds]) for m in mini.methods]
        rows += [(f"student d{hidden}", n, m, [f"d{hidden}_{m}_s{s}" for s in mini.baseline_seeds])
                 for m in mini.baselines]
    table = results_table(root, [r for r in rows if all(_final_evals(mini, root, x) for x in r[3]) and r[3]], mini)
    (root / "results.md").write_text(table)
    comparison_plot(mini, root)
    print(table)
    return table


def export_results(mini: MiniConfig, dest: Path) -> str:
    """Copy the files `report` reads (no weights) from the out-dir into `dest`, a directory that can be committed,
    and rebuild the table there from those copies alone: the committed table is reproducible from its files."""
    root, dest = Path(mini.out_dir), Path(dest)
    shutil.copytree(root / "tokenizer", dest / "tokenizer", dirs_exist_ok=True)
    trained = ["teacher", *(f"d{h}_warmup" for h in mini.student_hidden)]
    runs = [f"d{h}_{m}_s{s}" for s, h, m in grid_order(mini)]
    for name in trained + runs:
        if not _final_evals(mini, root, name):
            continue  # unfinished
        files = [*(root / name).glob("full_eval_*.json"), root / name / "config.json", root / name / "agreement.json"]
        if name in runs:  # the training curves of the comparison plot and the late KL column
            files += [root / name / f for f in ("eval.jsonl", "final_eval.json", "metrics.jsonl")]
        (dest / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            if f.is_file():
                shutil.copy2(f, dest / name / f.name)
    return report(dataclasses.replace(mini, out_dir=str(dest)))


SMOOTH = 5  # steps averaged in the training curves: a step plays only `batch_tasks` games


def comparison_plot(mini: MiniConfig, root: Path) -> None:
    """OPD vs Guided-OPD per student size, averaged over finished seeds: training curves and KL by turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(len(mini.student_hidden), 4, figsize=(18, 4 * len(mini.student_hidden)), squeeze=False)
    for row, hidden in enumerate(mini.student_hidden):
        for method in (*mini.methods, *mini.baselines):
            runs = [read_jsonl(root / f"d{hidden}_{method}_s{s}" / "metrics.jsonl") for s in mini.seeds
                    if _final_evals(mini, root, f"d{hidden}_{method}_s{s}")]  # finished runs only
            runs = [r for r in runs if r]
            if not runs:
                continue
            steps = range(min(len(r) for r in runs))
            def mean(key, window=1, runs=runs, steps=steps):
                """Per step, the mean over runs and the last `window` steps of the values logged (NaN: that step
                had no such turn; runs before 558d70b lack student_valid_action_frac)."""
                return [statistics.fmean(v) if (v := [x for r in runs for j in range(max(0, i - window + 1), i + 1)
                                                      if math.isfinite(x := r[j].get(key, math.nan))]) else math.nan
                        for i in steps]
            ax[row, 0].plot(steps, mean("train_success", SMOOTH), label=f"{method} (n={len(runs)})")
            ax[row, 1].plot(steps, [100 * x for x in mean("student_valid_action_frac", SMOOTH)], label=method)
            ax[row, 2].plot(steps, mean("teacher_turn_frac"), label=method)
            late = [t for r in runs for t in r[-3:]]
            kl = [statistics.fmean(v) if (v := [x["kl_by_turn"][i] for x in late if x["kl_by_turn"][i] is not None])
                  else float("nan") for i in range(len(late[0]["kl_by_turn"]))]
            ax[row, 3].plot(range(1, len(kl) + 1), kl, label=method)
        ax[row, 0].set(title=f"d{hidden}: training success (%, {SMOOTH}-step mean)", xlabel="step")
        ax[row, 1].set(title=f"d{hidden}: student's offered actions (%, training, {SMOOTH}-step mean)",
                       xlabel="step")
        ax[row, 2].set(title=f"d{hidden}: teacher-owned turn fraction", xlabel="step")
        ax[row, 3].set(title=f"d{hidden}: sampled KL to teacher by turn (last 3 steps)", xlabel="turn",
                       ylabel="nats/token")
        for a in ax[row]:
            if a.get_legend_handles_labels()[0]:
                a.legend()
    fig.tight_layout()
    fig.savefig(root / "comparison.png", dpi=80)
    plt.close(fig)


def _ms(values, digits: int = 1, sign: str = ""):
    """Mean ± std (over seeds); sign "+" writes the mean's sign (differences)."""
    mean = statistics.fmean(values)
    return (f"{mean:{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1
            else f"{mean:{sign}.{digits}f}")


def _outcomes(evals: list[dict], key: str) -> np.ndarray:
    """[seeds, games] of one per-game field, games in one order (by game id) for every seed."""
    return np.asarray([[g[key] for g in sorted(e["games"], key=lambda g: g["game"])] for e in evals], np.float64)


def results_table(root: Path, rows, mini: MiniConfig) -> str:
    """rows: (model, params, method, run names (one per seed)). Success Rate with a 95% bootstrap interval over
    games and seeds; Guided-OPD minus OPD paired on the same seeds and games."""
    splits = mini.final_eval_splits or (None,)
    header = ["model", "params", "method (seeds)"]
    for split in splits:
        where = split or "valid_unseen draw"
        header += [f"Score ({where})", f"Success Rate % [95% CI] ({where})", "Rounds", "valid actions %"]
    header.append("train KL to teacher, last 3 steps")
    table, by_type = [], []
    for model, n, method, names in rows:
        cells = [model, f"{n / 1e6:.2f}M", f"{method} ({len(names)})"]
        for split in splits:
            evals = [e for x in names for e in _final_evals(mini, root, x, split)]
            success = intervals.bootstrap(100 * _outcomes(evals, "won"))
            cells += [_ms([e["score"] for e in evals]), str(success), _ms([e["rounds"] for e in evals]),
                      _ms([e["valid_action_rate"] for e in evals])]
        kls = [k for x in names if (k := _late_kl(root, x)) is not None]
        table.append(cells + [_ms(kls, 2) if kls else "-"])
        evals = [e for x in names for e in _final_evals(mini, root, x)]
        by_type.append((model, method, evals))
    types = sorted({t for _, _, evals in by_type for e in evals for t in e["by_task_type"]})
    by_type = [[model, method, *(_ms([e["by_task_type"][t]["success_rate"] for e in evals])
                                 if all(t in e["by_task_type"] for e in evals) else "-" for t in types)]
               for model, method, evals in by_type]
    lines = [f"# Mini-scale Guided-OPD reproduction ({mini.env})", "",
             f"Students: {mini.distill_steps} distillation steps x {mini.batch_tasks} tasks from one warm-up SFT init "
             f"per size. Evaluation at beta 0, temperature "
             f"{mini.final_eval_temperature if mini.final_eval_splits else ExperimentConfig.eval_temperature:g}, "
             f"{mini.final_eval_turns if mini.final_eval_splits else mini.max_turns} turns. Success Rate: mean "
             "with a 95% bootstrap interval over games and seeds; other columns: mean ± std over seeds.", "",
             markdown_table(header, table), ""]
    if by_type:
        lines += [f"Success Rate (%) per task type ({splits[0] or 'eval draw'}):", "",
                  markdown_table(["model", "method", *types], by_type), ""]
    # The distillation runs' logs only: the teacher's and warm-ups' own SFT logs (in the out-dir, not exported) are
    # thousands of steps of another kind.
    windows = training_windows(root, [r for r in rows if r[2] in (*mini.methods, *mini.baselines)])
    if windows:
        lines += [f"Training, in {WINDOW}-step windows ({WINDOW * mini.batch_tasks} games a seed; mean ± std over "
                  "seeds): games won, the teacher's share of the turns, and the sampled KL to the teacher on the "
                  "student's turns (mean over turn positions). Whether OPD's training success has flattened is read "
                  "here:", "",
                  markdown_table(["model", "method", "steps", "training games won %", "teacher-owned turns %",
                                  "sampled KL (nats/token)"], windows), ""]
    for split in splits:
        profile = action_table(root, rows, mini, split)
        if profile:
            lines += [f"What the models do with their turns ({split or 'eval draw'}; evaluations that kept an action "
                      "profile, turns pooled over seeds): per action verb, its share of all turns % and, in brackets, "
                      "the % of those turns that the state offered (valid) and that repeat an action the episode had "
                      "already played:", "",
                      *profile, ""]
    lines += ["Guided-OPD minus OPD on the same seeds and games (percentage points, 95% paired bootstrap interval), "
              "and the relative change; the paper (docs/PAPER.md §3) reports +21.1% Score, +25.5% Success Rate, "
              "-6.0% Rounds on average:", ""]
    diffs = []
    for model, _, method, names in rows:
        if method != "guided_opd":
            continue
        opd = [x.replace("_guided_opd_", "_opd_") for x in names]
        for split in splits:
            g = [e for x in names for e in _final_evals(mini, root, x, split)]
            o = [e for x in opd for e in _final_evals(mini, root, x, split)]
            if len(g) != len(o) or not o:
                continue
            d = intervals.paired_difference(100 * _outcomes(g, "won"), 100 * _outcomes(o, "won"))
            def rel(k):
                a, b = statistics.fmean(e[k] for e in g), statistics.fmean(e[k] for e in o)
                return f"{100 * (a / b - 1):+.1f}%" if b else "- (OPD at 0)"
            # Paired by seed (same seed, same games); the evaluations keep no per-game valid-action counts.
            valid = [a["valid_action_rate"] - b["valid_action_rate"] for a, b in zip(g, o)]
            diffs.append([model, split or "eval draw", len(g), str(d), rel("score"), rel("success_rate"),
                          rel("rounds"), _ms(valid, sign="+")])
    lines += [markdown_table(["student", "split", "seeds", "Success Rate difference [95% CI]", "Score (relative)",
                              "Success Rate (relative)", "Rounds (relative)",
                              "valid actions (points, mean ± std over seeds)"], diffs)]
    return "\n".join(lines) + "\n"


WINDOW = 10  # steps per row of the training table
MIN_VERB_SHARE = 2.0  # % of some row's turns a verb needs for a column of its own; rarer verbs go to "other"


def action_table(root: Path, rows, mini: MiniConfig, split: str | None) -> list[str]:
    """The action profiles (evaluate.action_profile) of `rows` (as in `results_table`) on `split`, counts pooled
    over seeds, as markdown lines; rows whose evaluations predate the profile are left out, [] when none has one."""
    pooled = []
    for model, _, method, names in rows:
        evals = [e for x in names for e in _final_evals(mini, root, x, split)]
        if not evals or not all("actions" in e for e in evals):
            continue
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for e in evals:
            for verb, c in e["actions"].items():
                counts[verb].update(c)
        pooled.append((model, f"{method} ({len(evals)})", sum(e["n"] for e in evals), counts))
    if not pooled:
        return []
    frequent, overall = set(), collections.Counter()
    for *_, counts in pooled:
        turns = sum(c["turns"] for c in counts.values())
        frequent |= {v for v, c in counts.items() if 100 * c["turns"] >= MIN_VERB_SHARE * turns}
        overall.update({v: c["turns"] for v, c in counts.items()})
    verbs = sorted(frequent, key=lambda v: (-overall[v], v))  # most played first
    table = []
    for model, method, games, counts in pooled:
        turns = sum(c["turns"] for c in counts.values())
        other = collections.Counter()
        for v in set(counts) - set(verbs):
            other.update(counts[v])
        cells = [f"{100 * c['turns'] / turns:.1f} ({100 * c['valid'] / c['turns']:.0f}, "
                 f"{100 * c['repeats'] / c['turns']:.0f})" if c['turns'] else "0.0"
                 for c in (*(counts.get(v, collections.Counter()) for v in verbs), other)]
        table.append([model, method, f"{turns / games:.1f}",
                      f"{100 * sum(c['valid'] for c in counts.values()) / turns:.1f}",
                      f"{100 * sum(c['repeats'] for c in counts.values()) / turns:.1f}", *cells])
    return [markdown_table(["model", "method (seeds)", "turns a game", "valid %", "repeats %", *verbs, "other"],
                           table)]


def training_windows(root: Path, rows) -> list[list[str]]:
    """Per distillation row (rows as in `results_table`, given without the teacher's and warm-ups', whose logs are
    SFT logs; rows without a training log are left out), the training log averaged over consecutive WINDOW-step
    windows, per seed, then mean ± std over seeds."""
    table = []
    for model, _, method, names in rows:
        runs = [r for x in names if (r := read_jsonl(root / x / "metrics.jsonl"))]
        steps = min((len(r) for r in runs), default=0)
        for lo in range(0, steps, WINDOW):
            cells = []
            for key, scale, digits in (("train_success", 1, 1), ("teacher_turn_frac", 100, 0), ("kl_by_turn", 1, 3)):
                means = [scale * m for r in runs if (m := _logged_mean(r[lo:lo + WINDOW], key)) is not None]
                cells.append(_ms(means, digits) if means else "-")
            table.append([model, method, f"{lo}-{min(lo + WINDOW, steps) - 1}", *cells])
    return table


def override(mini: MiniConfig, settings: Sequence[str]) -> MiniConfig:
    """`KEY=VALUE` settings over a preset (VALUE as JSON, lists as tuples; anything else is a string)."""
    fields = {f.name for f in dataclasses.fields(MiniConfig)}
    changes = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY a MiniConfig field: "
                             f"{', '.join(sorted(fields))}")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a bare string such as a directory
        changes[key] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(mini, **changes)


def restore_teacher(run_root: Path, step: int | None = None):
    """A teacher checkpoint (default: the latest) of the run in `run_root` with the settings that run was made
    with: (mini, tokenizer, config, params, step)."""
    fields = {f.name for f in dataclasses.fields(MiniConfig)}
    saved = json.loads((run_root / "teacher" / "config.json").read_text())["mini"]
    mini = MiniConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
    tokenizer = load_tokenizer(run_root / "tokenizer")
    config = _teacher_config(mini, len(tokenizer))
    optimizer = make_optimizer(optax.constant_schedule(mini.teacher_lr), weight_decay=0.01)  # restore's template
    state = init_train_state(init_params(config, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(0))
    ckpt = Checkpointer(run_root / "teacher" / "checkpoints")
    state, extra = ckpt.restore(state, step=step)
    ckpt.close()
    return mini, tokenizer, config, state.params, extra["next_step"]


def export_teacher(run_root: Path, step: int, dest: Path) -> str:
    """A teacher checkpoint as a Hugging Face model directory (with its tokenizer): a runner's `teacher` before
    the teacher stage has finished (pilots)."""
    _, tokenizer, config, params, _ = restore_teacher(run_root, step)
    save_hf_checkpoint(jax.device_get(params), config, dest)
    tokenizer.save_pretrained(dest)
    return str(dest)


def required_agreement(mini: MiniConfig, tokenizer, params, config: Qwen3Config) -> dict:
    """teacher_agreement, for the commands that exist to measure it: no expert corpus is an error, not a skip."""
    result = teacher_agreement(mini, tokenizer, params, config)
    if result is None:
        raise SystemExit("agreement_corpus_dir is not set: there is no expert corpus to measure the agreement on "
                         "(the full preset sets it; --set agreement_corpus_dir=... for another)")
    return result


def checkpoint_agreement(run_root: Path, step: int | None = None) -> dict:
    """The expert agreement of a teacher checkpoint (default: the latest) of the run in `run_root`, under the
    settings that run was made with; appended to its teacher/agreement.jsonl. For runs whose curve predates it."""
    mini, tokenizer, config, params, done = restore_teacher(run_root, step)
    result = {"step": done, **required_agreement(mini, tokenizer, params, config)}
    with open(run_root / "teacher" / "agreement.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def model_agreement(mini: MiniConfig, name: str) -> dict:
    """The expert agreement (teacher_agreement: on the expert's own validation states, by action verb) of the
    out-dir's finished model `name` (the teacher, a warm-up or a distillation run), written to its
    agreement.json: whether a student imitates the expert's moves better or worse after distillation."""
    root = Path(mini.out_dir)
    tokenizer = load_tokenizer(root / "tokenizer")
    params, config = load_hf_checkpoint(root / name / "final_model", dtype=jnp.float32)
    result = required_agreement(mini, tokenizer, params, config)
    (root / name / "agreement.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--resume-anyway", action="store_true",
                    help="continue a distillation run that was started with another worker count")
    ap.add_argument("--until", choices=STAGES, default="all", help="stop after this stage")
    ap.add_argument("--only", choices=("warmup", "teacher"), default=None,
                    help="run just this stage (after the corpus and tokenizer): the students' warm-ups and the "
                         "teacher need only those, so they can run in two processes")
    ap.add_argument("--offline", action="store_true",
                    help="train the warm-ups and the teacher's SFT steps (up to its first DAgger round) from the "
                         "corpus and tokenizer already in place, with no environment and no evaluation, e.g. on a "
                         "GPU machine without ALFWorld; rerun without it where the environment runs to go on")
    ap.add_argument("--from-scratch", action="store_true",
                    help=f"train the tokenizer, warm-ups and teacher here even where {START_SNAPSHOT.name} (the "
                         "shipped start) was made with the same settings")
    ap.add_argument("--pack-start", nargs="?", const=str(START_SNAPSHOT), default=None, metavar="FILE",
                    help="pack the out-dir's tokenizer, warm-ups and teacher (an unfinished one with its latest "
                         f"checkpoint) into FILE (default: {START_SNAPSHOT}), the start a fresh out-dir unpacks")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.md from the finished runs")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="copy the finished runs' result files (no weights) into DIR and rebuild results.md and "
                         "comparison.png there from those copies alone")
    ap.add_argument("--agreement", nargs="?", type=int, const=0, default=None, metavar="STEP",
                    help="print (and log to teacher/agreement.jsonl) the expert agreement of the out-dir's teacher "
                         "checkpoint at STEP (default: the latest)")
    ap.add_argument("--agreement-of", nargs="+", default=None, metavar="RUN",
                    help="write the expert agreement of each finished model RUN of the out-dir (teacher, d64_warmup, "
                         "d96_opd_s0, ...) to RUN/agreement.json, and print its total")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a preset's setting, e.g. --set teacher_prompt_weight=0.1 --set seeds=[0,1]")
    args = ap.parse_args(argv)
    mini = override(PRESETS[args.preset], args.set)
    mini = dataclasses.replace(mini, out_dir=args.out_dir or mini.out_dir, progress=not args.no_progress,
                               resume_anyway=args.resume_anyway or mini.resume_anyway)
    if args.pack_start:
        print(pack_start(mini, args.pack_start))
    elif args.agreement_of:
        for name in args.agreement_of:
            print(name, f"{model_agreement(mini, name)['agreement']:.1f}% expert agreement", flush=True)
    elif args.agreement is not None:
        print(json.dumps(checkpoint_agreement(Path(mini.out_dir), args.agreement or None)))
    elif args.export:
        export_results(mini, Path(args.export))
    else:
        report(mini) if args.report_only else run(mini, args.until, args.only, args.offline, args.from_scratch)


if __name__ == "__main__":
    main()
