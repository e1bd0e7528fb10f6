"""Episode records and the paper's metrics: Score (0-100), Success Rate (%), Rounds (turns taken)."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from gopd_jax.envs import EnvPool, TaskSpec, list_tasks


@dataclasses.dataclass
class EpisodeResult:
    task: TaskSpec
    won: bool
    score: float  # final 0-100 score
    rounds: int  # turns taken
    env_failed: bool = False
    invalid_actions: int = 0  # replies without a parsable <action> tag
    inadmissible_actions: int = 0  # parsable actions that were not among the admissible ones
    turns: list = dataclasses.field(default_factory=list)  # optional per-turn records (owners, ...)


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
    """Overall metrics plus a per-task-type breakdown (keys sorted)."""
    if not results:
        raise ValueError("no episodes to summarize")
    by_type: dict[str, list[EpisodeResult]] = defaultdict(list)
    for r in results:
        by_type[r.task.task_type].append(r)
    return {**_metrics(results), "by_task_type": {t: _metrics(by_type[t]) for t in sorted(by_type)}}


def format_table(summary: dict[str, Any]) -> str:
    rows = [*summary["by_task_type"].items(), ("**all**", summary)]
    lines = ["| task type | n | Score | Success Rate (%) | Rounds | valid actions (%) | env failures | "
             "invalid actions |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {m['n']} | {m['score']:.2f} | {m['success_rate']:.2f} | {m['rounds']:.2f} | "
              f"{m['valid_action_rate']:.1f} | {m['env_failures']} | {m['invalid_actions']} |" for name, m in rows]
    return "\n".join(lines)


def replay_experts(pool: EnvPool, tasks: list[TaskSpec], max_steps: int | None = None) -> list[EpisodeResult]:
    """Plays each task's expert action sequence, keeping every worker busy (a slot takes the next task as
    soon as its episode ends). With `max_steps`, stops after that many env steps in total and drops the
    episodes still running (for benchmarks)."""
    todo = list(reversed(tasks))
    running: dict[int, tuple[TaskSpec, list[str], int]] = {}  # slot -> (task, actions left, rounds)
    results: list[EpisodeResult] = []
    steps = 0

    def start_next(slot: int) -> None:
        if todo and (max_steps is None or steps < max_steps):
            running[slot] = (todo.pop(), [], 0)
            pool.reset_async({slot: running[slot][0]})

    def advance(slot: int, last) -> None:
        nonlocal steps
        task, actions, rounds = running[slot]
        if last.done or not actions:
            del running[slot]
            results.append(EpisodeResult(task, last.won, last.score, rounds, last.info.get("env_failed", False)))
            start_next(slot)
        elif max_steps is not None and steps >= max_steps:
            del running[slot]
        else:
            running[slot] = (task, actions[1:], rounds + 1)
            steps += 1
            pool.step_async({slot: actions[0]})

    for slot in pool.slots:
        start_next(slot)
    while running:
        for slot, result in pool.collect("any").items():
            if isinstance(result, tuple):  # a reset finished
                _, result = result
                if not result.info.get("env_failed"):
                    running[slot] = (running[slot][0], pool.expert_actions(slot), 0)
            advance(slot, result)
    return results


def evaluate_expert(env_name: str, split: str, limit: int | None = None, num_workers: int = 2,
                    data_dir: str | None = None, env_kwargs: dict | None = None) -> dict[str, Any]:
    """Replays the expert action sequence of each task of `split` (the first `limit`) through an EnvPool;
    returns `summarize` of the episodes (rounds = expert actions taken)."""
    tasks = list_tasks(env_name, split, data_dir=data_dir)[:limit]
    with EnvPool(env_name, env_kwargs, num_workers=num_workers) as pool:
        return summarize(replay_experts(pool, tasks))
