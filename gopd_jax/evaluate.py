"""The paper's metrics (Score 0-100, Success Rate %, Rounds) and policy evaluation through the rollout engine:
a model checkpoint alone (beta = 0), or the environment's expert, on a split or a seeded stratified draw."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from gopd_jax.envs import EnvPool, TaskSpec, list_tasks
from gopd_jax.records import EXPERT, STUDENT, TEACHER, Episode, EpisodeResult, Policy
from gopd_jax.reporting import markdown_table
from gopd_jax.rollout import RolloutConfig, RolloutRunner, env_kwargs

if TYPE_CHECKING:
    from gopd_jax.experiment import ExperimentConfig

EXPERT_TURN_LIMIT = 1000  # the expert plays its whole plan (ScienceWorld gold paths run past 30 turns)


def _metrics(results: list[EpisodeResult]) -> dict[str, float]:
    n = len(results)
    return {"n": n,
            "score": sum(r.score for r in results) / n,
            "success_rate": 100.0 * sum(r.won for r in results) / n,
            "rounds": sum(r.rounds for r in results) / n,
            "env_failures": sum(r.env_failed for r in results),
            "invalid_actions": sum(r.invalid_actions for r in results),
            # A graded signal of policy quality that moves long before success does (tiny models).
            "valid_action_rate": 100.0 * (1 - sum(r.invalid_actions + r.inadmissible_actions for r in results)
                                          / max(1, sum(r.rounds for r in results)))}


def summarize(results: list[EpisodeResult]) -> dict[str, Any]:
    """Overall metrics, a per-task-type breakdown (keys sorted) and each game's outcome."""
    if not results:
        raise ValueError("no episodes to summarize")
    by_type: dict[str, list[EpisodeResult]] = defaultdict(list)
    for r in results:
        by_type[r.task.task_type].append(r)
    # Per game, for intervals over games (gopd_jax.intervals) and paired comparisons of methods.
    games = [{"game": r.task.game_id, "task_type": r.task.task_type, "won": r.won, "score": r.score,
              "rounds": r.rounds} for r in results]
    return {**_metrics(results), "by_task_type": {t: _metrics(by_type[t]) for t in sorted(by_type)}, "games": games}


def format_table(summary: dict[str, Any]) -> str:
    """A summary as a markdown table: one row per task type, then all."""
    rows = [*summary["by_task_type"].items(), ("**all**", summary)]
    return markdown_table(
        ["task type", "n", "Score", "Success Rate (%)", "Rounds", "valid actions (%)", "env failures",
         "invalid actions"],
        [[name, m["n"], f"{m['score']:.2f}", f"{m['success_rate']:.2f}", f"{m['rounds']:.2f}",
          f"{m['valid_action_rate']:.1f}", m["env_failures"], m["invalid_actions"]] for name, m in rows])


def success_by_turn(results: list[EpisodeResult], max_turns: int) -> list[float]:
    """Fraction of episodes won within t turns, t = 1..max_turns."""
    return [float(np.mean([r.won and r.rounds <= t for r in results])) for t in range(1, max_turns + 1)]


def stratified_draw(tasks: list[TaskSpec], n: int, seed: int) -> list[TaskSpec]:
    """A seeded draw of n tasks spread evenly over task types (round-robin over the types in a seeded
    order, each type's tasks in a seeded order), never a prefix of the list. n <= 0 or n >= len: all tasks."""
    if n <= 0 or n >= len(tasks):
        return list(tasks)
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[TaskSpec]] = defaultdict(list)
    for t in tasks:
        by_type[t.task_type].append(t)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_type.items())]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    out: list[TaskSpec] = []
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


NO_ACTION = "(none)"  # the verb of a reply without a parsable action


def action_verb(action: str | None) -> str:
    """An action's verb: its first word, lower-cased ("go" for "go to desk 1"); NO_ACTION for None or blank."""
    words = (action or "").split()
    return words[0].lower() if words else NO_ACTION


def action_profile(episodes: list[Episode]) -> dict[str, dict[str, int]]:
    """Counts of what a policy did with its turns, per action_verb (NO_ACTION for a reply without a parsable
    action): turns, valid (the state offered the action) and repeats
    (the episode had already played the same action). The valid-action rate alone cannot tell a policy that
    plays useful moves from one that keeps playing admissible moves that lead nowhere (examining, looking,
    walking back and forth); this can. Counts, not rates, so that seeds and runs pool by addition."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"turns": 0, "valid": 0, "repeats": 0})
    for ep in episodes:
        played: set[str] = set()
        for turn in ep.turns:
            c = counts[action_verb(turn.action)]
            c["turns"] += 1
            c["valid"] += bool(turn.valid)
            c["repeats"] += turn.action is not None and turn.action in played
            if turn.action is not None:
                played.add(turn.action)
    return {verb: counts[verb] for verb in sorted(counts)}


def evaluate_policy(runner: RolloutRunner, tasks, policy, key, progress: bool = True) -> tuple[dict, list[Episode]]:
    """Score a policy alone (beta = 0): Score / Success Rate / Rounds, per task type, success by turn, and the
    action profile (what it did with its turns)."""
    from gopd_jax.methods import owners_from_beta

    episodes, stats = runner.run(tasks, {STUDENT: policy, TEACHER: policy}, owners_from_beta(0.0), key,
                                 progress=progress, desc="eval")
    results = [e.result for e in episodes]
    summary = summarize(results)
    summary["success_by_turn"] = success_by_turn(results, runner.config.turn_limit)
    summary["actions"] = action_profile(episodes)
    summary["rollout"] = stats
    return summary, episodes


def eval_tasks(cfg: ExperimentConfig) -> list[TaskSpec]:
    """The config's evaluation tasks: the whole eval split, or a seeded stratified draw of eval_limit."""
    return stratified_draw(list_tasks(cfg.env, cfg.eval_split, data_dir=cfg.data_dir or None), cfg.eval_limit,
                           cfg.seed)


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str) -> dict:
    """Evaluate one Hugging Face checkpoint alone on cfg's eval tasks with cfg's rollout settings."""
    from gopd_jax.models import load_hf_checkpoint
    from gopd_jax.tokenizer import check_fits, load_tokenizer

    cfg = dataclasses.replace(cfg, student=checkpoint, teacher=checkpoint).validate()
    params, config = load_hf_checkpoint(checkpoint, dtype=jnp.dtype(cfg.compute_dtype))
    tokenizer = load_tokenizer(cfg.tokenizer or checkpoint)
    check_fits(tokenizer, config.vocab_size, cfg.tokenizer or checkpoint)
    with EnvPool(cfg.env, env_kwargs(cfg.env, expert=False), num_workers=cfg.num_workers) as pool:
        summary, _ = evaluate_policy(RolloutRunner(pool, tokenizer, RolloutConfig.from_experiment(cfg, True)),
                                     eval_tasks(cfg), Policy(params, config), jax.random.PRNGKey(cfg.seed),
                                     cfg.progress)
    return summary


def evaluate_expert(env_name: str, split: str, limit: int | None = None, num_workers: int = 2,
                    data_dir: str | None = None, seed: int = 0, progress: bool = False,
                    max_turns: int = EXPERT_TURN_LIMIT, expert: str | None = None) -> dict[str, Any]:
    """The environment's expert played through the rollout engine on `split` (all tasks, or a seeded
    stratified draw of `limit`) for at most `max_turns`; returns `summarize` of the episodes (rounds = expert
    actions taken). `expert`: which of the environment's experts where it has several (ALFWorld: "walkthrough",
    the default, or "handcoded")."""
    from gopd_jax.methods import owners_from_beta

    tasks = stratified_draw(list_tasks(env_name, split, data_dir=data_dir), limit or 0, seed)
    with EnvPool(env_name, env_kwargs(env_name, True, expert or "walkthrough"), num_workers=num_workers) as pool:
        runner = RolloutRunner(pool, None, RolloutConfig(env=env_name, max_turns=max_turns))
        episodes, _ = runner.run(tasks, {STUDENT: EXPERT, TEACHER: EXPERT}, owners_from_beta(1.0),
                                 jax.random.PRNGKey(seed), progress=progress, desc="expert")
    return summarize([e.result for e in episodes])
