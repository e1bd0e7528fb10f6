"""The records every stage shares: who plays (Policy, the expert), what a turn and an episode produced.

A leaf module (it imports only the environment protocol and the model config), so rollout,
batch building, evaluation and methods can all depend on it without depending on each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gopd_jax.envs import StepResult, TaskSpec
from gopd_jax.models import Qwen3Config

STUDENT, TEACHER = "student", "teacher"  # turn owners


@dataclasses.dataclass(frozen=True)
class Policy:
    """The completer seam: one model's params and config. Swap params to swap the policy."""

    params: Any
    config: Qwen3Config


class ExpertPolicy:
    """The environment's own expert as a policy, replying in the agent's format: turn t plays the t-th action
    of its plan (ALFWorld walkthroughs, ScienceWorld gold paths), or, where the environment was built with a
    state-dependent expert (ALFWorld `expert="handcoded"`), that expert's action for the current state. Used
    for SFT data and as a reference policy in evaluation; its log-probs are zero (it is not a model)."""


EXPERT = ExpertPolicy()


@dataclasses.dataclass
class Turn:
    owner: str
    prompt_ids: np.ndarray  # int32, exactly what the model was fed
    response_ids: np.ndarray  # int32, exactly what it sampled (stop token included)
    logprobs: np.ndarray  # float32 log-probs of response_ids under the owner's sampling distribution
    action: str | None  # None: no parsable <action> tag (an invalid action)
    result: StepResult
    index: int = 0  # turn number within its episode (0-based)
    # Set by the rollout: a parsable action that the state it was played from offered (any parsable action where
    # that state lists no actions). Judged once here, since the state is gone once the turn's result replaces it.
    valid: bool = False


@dataclasses.dataclass
class EpisodeResult:
    task: TaskSpec
    won: bool
    score: float  # final 0-100 score
    rounds: int  # turns taken
    env_failed: bool = False
    invalid_actions: int = 0  # replies without a parsable <action> tag
    inadmissible_actions: int = 0  # parsable actions that were not among the admissible ones
    owners: list = dataclasses.field(default_factory=list)  # owner of each turn
    truncated: bool = False  # stopped by the method's owner rule before the environment's end or turn limit


@dataclasses.dataclass
class Episode:
    index: int  # position of the task in the list the rollout was given
    task: TaskSpec
    goal: str
    turns: list[Turn]
    result: EpisodeResult
    start: StepResult | None = None  # the state the episode began in (the reset's result)

    def states(self) -> list[StepResult]:
        """The state each turn was played from: start, then each turn's result but the last."""
        return [self.start, *(t.result for t in self.turns[:-1])][:len(self.turns)]
