"""Text environments (ALFWorld, ScienceWorld, WebShop), a parallel worker pool, prompt format and action parsing."""
from gopd_jax.envs.base import (ENV_NAMES, StepResult, TaskSpec, TextEnv, env_splits, failed_step_result,
                                list_tasks, make_env)
from gopd_jax.envs.pool import EnvPool
from gopd_jax.envs.prompting import (INVALID_ACTION_FEEDBACK, MAX_TURNS, build_messages, invalid_step_result,
                                     parse_action)

__all__ = ["ENV_NAMES", "EnvPool", "INVALID_ACTION_FEEDBACK", "MAX_TURNS", "StepResult", "TaskSpec", "TextEnv",
           "build_messages", "env_splits", "failed_step_result", "invalid_step_result", "list_tasks", "make_env",
           "parse_action"]
