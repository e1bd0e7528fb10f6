"""Training methods as values: each method is one ``Method`` record built from the experiment config.

A method says, as pure functions of the training step, who plays each turn of a rollout (the owner
rule), how the two owners' tokens are weighted in the loss (``beta``), which owners' turns are trained on,
whether the environment's expert plays instead of the models, and what to log. The runner only asks the
method; it never tests a method's name. A new method is one function in one file::

    from gopd_jax.methods import Method, default_loss, owners_from_beta, register_method

    @register_method("half_teacher")
    def half_teacher(cfg):
        return Method(name="half_teacher", beta=lambda step: 0.5, owners=lambda step: owners_from_beta(0.5),
                      loss=default_loss(cfg))

and ``ExperimentConfig(method="half_teacher")`` runs it (import the module before the config is built).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from gopd_jax import curriculum as cur
from gopd_jax.envs.prompting import MAX_TURNS
from gopd_jax.losses import LossConfig
from gopd_jax.records import STUDENT, TEACHER, Episode

if TYPE_CHECKING:
    from gopd_jax.experiment import ExperimentConfig
    from gopd_jax.rollout import RolloutRunner

# (episode key, turn limit, task index) -> owners, True = teacher. An array shorter than the turn limit ends
# the episode after that many turns (marked truncated).
OwnerFn = Callable[[jax.Array, int, int], np.ndarray]


def owners_from_beta(beta: float) -> OwnerFn:
    """Guided-OPD: every turn independently teacher-owned with probability beta."""
    return lambda key, n, index: np.asarray(cur.draw_owners(key, beta, (n,)))


def student_first(depth: int) -> OwnerFn:
    """TCOD-f2b: the student plays turns 0..depth-1 and the episode ends there."""
    return lambda key, n, index: np.zeros(min(depth, n), bool)


def teacher_then_student(switch: Sequence[int]) -> OwnerFn:
    """The teacher plays turns 0..switch[index]-1 of task `index`, the student every turn after."""
    return lambda key, n, index: np.arange(n) < switch[index]


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method. ``beta(step)`` weighs the loss, L = (1 - beta) * L_student + beta * L_teacher
    (Guided-OPD also uses it as the teacher's turn probability); ``owners(step)`` is the rollout's owner rule;
    turns of owners outside ``trained_owners`` are played but carry no loss; with ``expert_plays`` the
    environment's expert plays every turn (owned by the teacher) instead of the models; ``log(step)`` adds
    method-specific fields to the step's training record; ``rollout``, when set, replaces the default
    single pass ``runner.run(tasks, policies, owners(step), key)``."""

    name: str
    beta: Callable[[int], float]
    owners: Callable[[int], OwnerFn]
    loss: LossConfig
    trained_owners: tuple[str, ...] = (STUDENT, TEACHER)
    expert_plays: bool = False
    log: Callable[[int], dict[str, Any]] = lambda step: {}
    rollout: Callable[..., tuple[list[Episode], dict[str, float]]] | None = None

    def play(self, runner: RolloutRunner, tasks, policies, key: jax.Array, step: int):
        """This step's rollout: (episodes, stats)."""
        if self.rollout is not None:
            return self.rollout(runner, tasks, policies, key, step)
        return runner.run(tasks, policies, self.owners(step), key, progress=False)


_BUILDERS: dict[str, Callable[[ExperimentConfig], Method]] = {}


def register_method(name: str):
    """Decorator: register `builder(cfg) -> Method` under `name` (the value of ExperimentConfig.method)."""
    def wrap(builder):
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"a method named {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder
    return wrap


def method_names() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def make_method(cfg: ExperimentConfig) -> Method:
    if cfg.method not in _BUILDERS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(_BUILDERS)} (or register one "
                         "with gopd_jax.methods.register_method)")
    return _BUILDERS[cfg.method](cfg)


def default_loss(cfg: ExperimentConfig) -> LossConfig:
    """The config's KL variant and estimator; masks arrive host-normalised (see batch.normalise_masks)."""
    return LossConfig.variant(cfg.kl_variant, estimator=cfg.estimator, clip_eps=cfg.clip_eps,
                              aggregation="weighted_sum")


def turn_limit(cfg: ExperimentConfig) -> int:
    return cfg.max_turns or MAX_TURNS[cfg.env]


def _beta_method(name: str, schedule: cur.Schedule, cfg: ExperimentConfig) -> Method:
    beta = lambda step: float(cur.beta_at(schedule, step))  # noqa: E731
    return Method(name=name, beta=beta, owners=lambda step: owners_from_beta(beta(step)), loss=default_loss(cfg))


@register_method("guided_opd")
def guided_opd(cfg: ExperimentConfig) -> Method:
    """Guided-OPD: teacher turns with probability beta(step) from the curriculum (cosine to 0 at rho N)."""
    if cfg.curriculum == "constant":
        return _beta_method("guided_opd", cur.constant(cfg.beta), cfg)
    make = {"cosine": cur.cosine_to_zero, "linear": cur.linear_to_zero}[cfg.curriculum]
    return _beta_method("guided_opd", make(cfg.steps, cfg.rho), cfg)


@register_method("opd")
def opd(cfg: ExperimentConfig) -> Method:
    """Vanilla on-policy distillation: the student plays every turn (beta = 0)."""
    return _beta_method("opd", cur.constant(0.0), cfg)


@register_method("fixed_beta")
def fixed_beta(cfg: ExperimentConfig) -> Method:
    """Guided-OPD's owner draw with a constant beta (the schedule ablation)."""
    return _beta_method("fixed_beta", cur.constant(cfg.beta), cfg)


@register_method("sft")
def sft(cfg: ExperimentConfig) -> Method:
    """Supervised fine-tuning on the environment's expert trajectories: cross-entropy on every expert token
    (the teacher-owned forward KL on expert samples), whatever the KL-ablation fields say."""
    return Method(name="sft", beta=lambda step: 1.0, owners=lambda step: owners_from_beta(1.0),
                  loss=LossConfig(aggregation="weighted_sum"), trained_owners=(TEACHER,), expert_plays=True)


def _tcod(order: str, cfg: ExperimentConfig) -> Method:
    """TCOD (Wang et al., arXiv 2604.24005, "Temporal Curriculum in On-Policy Distillation for Multi-turn
    Autonomous Agents"; public code github.com/kokolerk/TCOD on Trinity-RFT).

    What we read (paper abstract and introduction, the repository README): TCOD controls the trajectory depth
    the student is exposed to and grows it from short to long on a curriculum schedule; two orderings,
    *f2b* (distillation starts on the early turns, where the student is most on-distribution, and extends
    toward the full horizon) and *b2f* (starts on the late turns, where the outcome is clearer, and extends
    toward the beginning); the loss is the plain multi-turn OPD loss (advantage = teacher minus student
    log-prob per token) on student tokens; the configs use ``checkpoint_strategy: linear`` with
    ``checkpoint_steps``. We could not read the configs' numeric values, so the depth grows linearly from 1
    turn to the full turn limit, reached at ``rho`` of training (``curriculum.tcod_depth``; rho 0.8 as for
    Guided-OPD, so the two curricula end at the same step).

    Our realisation, per step with depth k:
      f2b: the student plays turns 0..k-1 and the episode ends there (truncated);
      b2f: the teacher first plays each task alone (length L, nothing trained); then the same task is played
        again with the teacher on turns 0..L-k-1 and the student from turn max(0, L-k) to the end. Sampling
        keys are per (task, turn), so the second pass replays the teacher's prefix (exactly, up to float
        differences between batch shapes); the prefix carries no loss.
    Only student turns are trained, at full OPD weight (beta = 0 in the loss)."""
    depth_schedule = cur.tcod_depth(cfg.steps, turn_limit(cfg), cfg.rho)
    depth = lambda step: int(cur.depth_at(depth_schedule, step))  # noqa: E731
    log = lambda step: {"tcod_depth": depth(step)}  # noqa: E731
    if order == "f2b":
        return Method(name="tcod_f2b", beta=lambda step: 0.0, owners=lambda step: student_first(depth(step)),
                      loss=default_loss(cfg), trained_owners=(STUDENT,), log=log)

    def b2f_rollout(runner, tasks, policies, key, step):
        alone, first = runner.run(tasks, policies, owners_from_beta(1.0), key, progress=False)
        switch = [0] * len(tasks)
        for ep in alone:
            switch[ep.index] = max(0, ep.result.rounds - depth(step))
        episodes, stats = runner.run(tasks, policies, teacher_then_student(switch), key, progress=False)
        return episodes, {k: v + first.get(k, 0.0) for k, v in stats.items()}

    return Method(name="tcod_b2f", beta=lambda step: 0.0, owners=lambda step: owners_from_beta(1.0),
                  loss=default_loss(cfg), trained_owners=(STUDENT,), log=log, rollout=b2f_rollout)


register_method("tcod_f2b")(lambda cfg: _tcod("f2b", cfg))
register_method("tcod_b2f")(lambda cfg: _tcod("b2f", cfg))
