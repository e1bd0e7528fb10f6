"""Teacher-intervention curricula (docs/PAPER.md §2).

A curriculum is any optax schedule, i.e. a callable ``step -> value``: ``beta(step)`` is the probability
that the teacher owns a turn at that training step. Guided-OPD uses ``cosine_to_zero``; vanilla OPD is
``constant(0.0)``; fixed-beta ablations are ``constant(b)``; any other optax schedule (piecewise,
exponential, ``join_schedules``) works unchanged.
"""
from __future__ import annotations

import numbers
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]


def _decay_steps(total_steps: int, rho: float) -> int:
    if total_steps < 1 or not 0.0 < rho <= 1.0:
        raise ValueError(f"need total_steps >= 1 and 0 < rho <= 1, got total_steps={total_steps}, rho={rho}")
    return max(1, int(rho * total_steps))


def cosine_to_zero(total_steps: int, rho: float = 0.8) -> Schedule:
    """The paper's curriculum: 1 at step 0, 0.5 at rho*N/2, 0 from rho*N on."""
    return optax.cosine_decay_schedule(init_value=1.0, decay_steps=_decay_steps(total_steps, rho), alpha=0.0)


def linear_to_zero(total_steps: int, rho: float = 0.8) -> Schedule:
    """Linear from 1 at step 0 to 0 at rho*N, then 0."""
    return optax.linear_schedule(init_value=1.0, end_value=0.0, transition_steps=_decay_steps(total_steps, rho))


def constant(beta: float) -> Schedule:
    """Fixed intervention probability (beta=0 is vanilla OPD)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return optax.constant_schedule(float(beta))


def as_curriculum(x: Union[float, Schedule]) -> Schedule:
    """A number becomes ``constant(x)``; a callable (any optax schedule) is returned as is."""
    if isinstance(x, numbers.Real):
        return constant(float(x))
    if callable(x):
        return x
    raise TypeError(f"a curriculum is a number in [0, 1] or a callable step -> beta, got {type(x).__name__}")


def beta_at(schedule: Schedule, step: jax.typing.ArrayLike) -> jax.Array:
    """beta for ``step`` as a float32 scalar, clipped to [0, 1] (e.g. an exponential schedule may overshoot)."""
    return jnp.clip(jnp.asarray(schedule(step), jnp.float32), 0.0, 1.0)


def draw_owners(key: jax.Array, beta: jax.typing.ArrayLike, shape: Sequence[int]) -> jax.Array:
    """Turn owners, True = teacher: independent Bernoulli(beta) draws (beta is fixed within a step)."""
    return jax.random.bernoulli(key, jnp.clip(beta, 0.0, 1.0), tuple(shape))


def tcod_depth(total_steps: int, max_turns: int, rho: float = 0.8, start: int = 1) -> Schedule:
    """TCOD baseline (trajectory-depth curriculum): the number k of leading turns the student acts in.

    Linear from ``start`` at step 0 to ``max_turns`` at rho*N, then ``max_turns``. The schedule returns a
    float; use ``depth_at`` for the integer k (the student owns turns 0..k-1 of each episode).
    """
    if not 1 <= start <= max_turns:
        raise ValueError(f"need 1 <= start <= max_turns, got start={start}, max_turns={max_turns}")
    return optax.linear_schedule(
        init_value=float(start), end_value=float(max_turns), transition_steps=_decay_steps(total_steps, rho))


def depth_at(schedule: Schedule, step: jax.typing.ArrayLike) -> jax.Array:
    """Integer TCOD depth k >= 1 at ``step`` (floor of the schedule value)."""
    return jnp.maximum(jnp.floor(jnp.asarray(schedule(step), jnp.float32)), 1.0).astype(jnp.int32)
