"""ScienceWorld adapter (the `scienceworld` package drives a JVM through py4j)."""
from __future__ import annotations

import functools
import os

from gopd_jax.envs.base import StepResult, TaskSpec

ENV_NAME = "scienceworld"
SPLITS = ("train", "dev", "test")
JVM_HEAP = "-Xmx1g"  # without a cap the JVM grows past 2 GB per worker


def _cap_jvm_heap() -> None:
    """Must run before the JVM starts; a user's own -Xmx wins."""
    opts = os.environ.get("JAVA_TOOL_OPTIONS", "")
    if "-Xmx" not in opts:
        os.environ["JAVA_TOOL_OPTIONS"] = f"{opts} {JVM_HEAP}".strip()


def _start_jvm_env(env_step_limit: int):
    _cap_jvm_heap()
    from scienceworld import ScienceWorldEnv
    return ScienceWorldEnv("", envStepLimit=env_step_limit)


def parse_task_id(task_id: str) -> tuple[str, int]:
    name, _, variation = task_id.rpartition(":")
    return name, int(variation)


@functools.lru_cache(maxsize=None)
def _variations(split: str) -> tuple[tuple[str, int], ...]:
    env = _start_jvm_env(env_step_limit=1)
    try:
        pairs = []
        for name in env.get_task_names():
            env.load(name, 0, "")
            pairs += [(name, v) for v in getattr(env, f"get_variations_{split}")()]
        return tuple(pairs)
    finally:
        env.close()


def list_scienceworld_tasks(split: str, data_dir: str | None = None) -> list[TaskSpec]:
    """All (task, variation) pairs of the environment's own train/dev/test variation split.
    Starts a JVM once per process (results are cached); `data_dir` is unused (data ships in the jar)."""
    return [TaskSpec(ENV_NAME, split, f"{name}:{v}", name) for name, v in _variations(split)]


class ScienceWorldTextEnv:
    def __init__(self, simplification: str = "easy", env_step_limit: int = 10_000, gold_path: bool = True):
        # The step limit is the rollout's job (MAX_TURNS); the env's own default (100) would end
        # some gold paths early. `gold_path=False` skips the gold path search in `reset` (it takes
        # 30-45 s on the mendelian-genetics tasks) when no expert actions are needed.
        self._env = _start_jvm_env(env_step_limit)
        self._simplification = simplification
        self._gold_path = gold_path
        self._last_score = 0.0

    def reset(self, task: TaskSpec) -> tuple[str, StepResult]:
        name, variation = parse_task_id(task.task_id)
        self._env.load(name, variation, self._simplification, generateGoldPath=self._gold_path)
        observation, info = self._env.reset()
        self._last_score = 0.0
        goal = info["taskDesc"].removeprefix("Task Description:").strip()
        return goal, StepResult(observation.strip(), 0.0, 0.0, False, False,
                                 tuple(info["valid"]))

    def step(self, action: str) -> StepResult:
        observation, _, done, info = self._env.step(action)
        # ScienceWorld reports -100 when the agent makes the task unwinnable (and ends the episode):
        # we count that as score 0, done, not won, so that Score stays a 0-100 progress average.
        score = float(max(info["score"], 0))
        won = bool(done) and score >= 100.0
        reward, self._last_score = score - self._last_score, score
        return StepResult(observation.strip(), reward, score, bool(done), won, tuple(info["valid"]))

    def expert_actions(self) -> list[str]:
        if not self._gold_path:
            raise RuntimeError("expert actions need ScienceWorldTextEnv(gold_path=True)")
        return self._env.get_gold_action_sequence()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
