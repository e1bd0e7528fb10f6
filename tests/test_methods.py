"""Methods as values: the registry, TCOD's owners / trained turns / depth per step (both orderings, on real
ALFWorld games with the environment's expert as the teacher), and a user-registered method."""


import jax
import numpy as np
import pytest

from gopd_jax import methods as M
from gopd_jax.batch import training_batch
from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.experiment import ExperimentConfig
from gopd_jax.losses import LossConfig
from gopd_jax.records import EXPERT, STUDENT, TEACHER
from gopd_jax.rollout import RolloutConfig, RolloutRunner
from gopd_jax.tokenizer import render_chat
from tests.policies import alfworld_tokenizer, scripted_policy


def _cfg(**kw):
    return ExperimentConfig(env="alfworld", steps=10, rho=0.8, max_turns=12, **kw)


def test_builtin_methods_are_registered_and_unknown_names_are_refused():
    assert {"guided_opd", "opd", "fixed_beta", "tcod_f2b", "tcod_b2f", "sft"} <= set(M.method_names())
    with pytest.raises(ValueError, match="unknown method 'ppo'.*register_method"):
        M.make_method(_cfg(method="ppo"))


def test_beta_methods():
    g = M.make_method(_cfg(method="guided_opd"))
    assert [g.beta(s) for s in (0, 4, 8, 9)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-6)
    assert g.trained_owners == (STUDENT, TEACHER) and not g.expert_plays
    assert M.make_method(_cfg(method="opd")).beta(0) == 0.0
    fixed = M.make_method(_cfg(method="fixed_beta", beta=0.3))
    assert fixed.beta(0) == fixed.beta(9) == pytest.approx(0.3)
    owners = fixed.owners(3)(jax.random.key(0), 2000, 0)
    assert owners.shape == (2000,) and 0.25 < owners.mean() < 0.35
    sft = M.make_method(_cfg(method="sft", kl_variant="swapped"))
    assert sft.expert_plays and sft.trained_owners == (TEACHER,) and sft.beta(0) == 1.0
    assert (sft.loss.student_kl, sft.loss.teacher_kl) == ("reverse", "forward")  # CE on expert tokens


@pytest.mark.parametrize("order", ["f2b", "b2f"])
def test_tcod_depth_schedule_and_loss(order):
    m = M.make_method(_cfg(method=f"tcod_{order}"))
    # linear from 1 turn to the 12-turn limit at rho * N = 8 steps, floored: 1 + 11 s / 8
    assert [m.log(s)["tcod_depth"] for s in range(10)] == [1, 2, 3, 5, 6, 7, 9, 10, 12, 12]
    # only student turns are trained, with the plain OPD loss at full weight
    assert m.trained_owners == (STUDENT,) and all(m.beta(s) == 0.0 for s in range(10))
    assert m.loss == LossConfig(aggregation="weighted_sum") and not m.expert_plays


def test_a_user_method_registers_in_one_place_and_validates():
    @M.register_method("test_every_other")
    def every_other(cfg):
        return M.Method(name="test_every_other", beta=lambda step: 0.5,
                        owners=lambda step: (lambda key, n, index: np.arange(n) % 2 == 1), loss=M.default_loss(cfg))

    assert "test_every_other" in M.method_names()
    m = M.make_method(_cfg(method="test_every_other"))
    assert list(m.owners(0)(None, 4, 0)) == [False, True, False, True]
    with pytest.raises(ValueError, match="already registered"):
        M.register_method("test_every_other")(lambda cfg: None)


# ---- TCOD rollouts on real ALFWorld games -----------------------------------------------------------------

pytest.importorskip("alfworld")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return alfworld_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def played(tokenizer):
    """Both TCOD orderings at steps 0 and 4, the expert as teacher and a student that always says 'look'."""
    prompt_end = render_chat(tokenizer, [{"role": "user", "content": "x"}], enable_thinking=False)[-1]
    student = scripted_policy(tokenizer, "<action>look</action>", prompt_end)
    tasks = list_tasks("alfworld", "valid_unseen")[:2]
    out = {}
    with EnvPool("alfworld", num_workers=2) as pool:
        runner = RolloutRunner(pool, tokenizer, RolloutConfig(env="alfworld", max_turns=12, max_new_tokens=12,
                                                              temperature=0.0, think=False))
        expert, _ = runner.run(tasks, {STUDENT: EXPERT, TEACHER: EXPERT}, M.owners_from_beta(1.0),
                               jax.random.key(0), progress=False)
        out["expert"] = {e.index: e for e in expert}
        for order in ("f2b", "b2f"):
            m = M.make_method(_cfg(method=f"tcod_{order}"))
            for step in (0, 4):
                eps, _ = m.play(runner, tasks, {STUDENT: student, TEACHER: EXPERT}, jax.random.key(1), step)
                out[order, step] = (m.log(step)["tcod_depth"], {e.index: e for e in eps})
    return out


@pytest.mark.parametrize("step", [0, 4])
def test_tcod_f2b_student_plays_the_first_k_turns_then_the_episode_ends(played, step):
    k, episodes = played["f2b", step]
    for ep in episodes.values():
        assert [t.owner for t in ep.turns] == [STUDENT] * k and [t.index for t in ep.turns] == list(range(k))
        assert ep.result.truncated and ep.result.rounds == k and not ep.result.won


@pytest.mark.parametrize("step", [0, 4])
def test_tcod_b2f_teacher_prefix_then_the_student_for_the_last_k_turns(played, step):
    k, episodes = played["b2f", step]
    for idx, ep in episodes.items():
        expert = played["expert"][idx]
        length = expert.result.rounds  # the teacher's own episode length
        assert expert.result.won and length < 12
        switch = max(0, length - k)
        assert [t.owner for t in ep.turns] == [TEACHER] * switch + [STUDENT] * (12 - switch)
        # the prefix replays the teacher's own episode, turn for turn
        assert [t.action for t in ep.turns[:switch]] == [t.action for t in expert.turns[:switch]]
        trained = [t for t in ep.turns if t.owner in M.make_method(_cfg(method="tcod_b2f")).trained_owners]
        batch = training_batch(trained)
        assert batch["teacher_mask"].sum() == 0 and batch["student_mask"].sum() > 0
        assert not ep.result.won  # the 'look' student never finishes the task
