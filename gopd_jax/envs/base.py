"""Environment-agnostic records and the protocol every text environment adapter implements.

Adapters live in their own modules and are created through `make_env` / enumerated through
`list_tasks`; imports are lazy so that importing `gopd_jax.envs` never pulls in textworld or the JVM.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class StepResult:
    observation: str
    reward: float
    score: float  # normalised progress, 0-100 (ALFWorld: 100 if won else 0)
    done: bool
    won: bool
    admissible_actions: tuple[str, ...] = ()
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"invalid_action": True}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    env: str
    split: str
    task_id: str  # ALFWorld: game file path; ScienceWorld: "task-name:variation"; WebShop: see webshop/env.py
    task_type: str

    @property
    def game_id(self) -> str:
        """A machine-independent id: ALFWorld `<split>/<task folder>/<trial>`, else the task id."""
        if self.env == "alfworld":
            return "/".join(Path(self.task_id).parts[-4:-1])
        return self.task_id


def failed_step_result(reason: str, observation: str = "") -> StepResult:
    """The terminal result for an episode whose environment crashed or hung: ends it, counts as lost."""
    return StepResult(observation=observation, reward=0.0, score=0.0, done=True, won=False,
                      admissible_actions=(), info={"env_failed": True, "reason": reason})


@runtime_checkable
class TextEnv(Protocol):
    def reset(self, task: TaskSpec) -> tuple[str, StepResult]:
        """Starts `task`; returns (goal text, first step result)."""

    def step(self, action: str) -> StepResult: ...

    def expert_actions(self) -> list[str]:
        """An action sequence that solves the current task from its start state."""

    def close(self) -> None: ...


# name -> (module, class, list_tasks function, splits). Modules are imported on first use.
_REGISTRY: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "alfworld": ("gopd_jax.envs.alfworld_env", "AlfWorldEnv", "list_alfworld_tasks",
                 ("train", "valid_seen", "valid_unseen", "valid_train")),
    "scienceworld": ("gopd_jax.envs.scienceworld_env", "ScienceWorldTextEnv", "list_scienceworld_tasks",
                     ("train", "dev", "test")),
    "webshop": ("gopd_jax.envs.webshop", "WebShopEnv", "list_webshop_tasks", ("train", "eval", "test")),
    # Recorded ALFWorld episodes replayed: a benchmark tool (experiments/bench_step.py), not an environment.
    "alfworld_replay_bench": ("gopd_jax.envs.replay", "AlfWorldReplayEnv", "list_replay_tasks", ("valid_unseen",)),
}

BENCHMARK_ONLY = ("alfworld_replay_bench",)  # makeable by name, never offered as an experiment's environment
ENV_NAMES = tuple(name for name in _REGISTRY if name not in BENCHMARK_ONLY)


def _entry(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment {name!r}; valid names: {', '.join(ENV_NAMES)}")
    return _REGISTRY[name]


def env_splits(name: str) -> tuple[str, ...]:
    return _entry(name)[3]


def make_env(name: str, **kwargs: Any) -> TextEnv:
    module, cls, _, _ = _entry(name)
    return getattr(importlib.import_module(module), cls)(**kwargs)


def list_tasks(name: str, split: str, data_dir: str | None = None) -> list[TaskSpec]:
    module, _, fn, splits = _entry(name)
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {name}; valid splits: {', '.join(splits)}")
    return getattr(importlib.import_module(module), fn)(split, data_dir=data_dir)
