"""The mixed teacher/student rollout on real ALFWorld games with real (tiny) Qwen3 policies."""

import jax
import numpy as np
import pytest

from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.models import Qwen3Config, init_params
from gopd_jax.batch import training_batch
from gopd_jax.methods import owners_from_beta
from gopd_jax.records import STUDENT, TEACHER, Policy
from gopd_jax.rollout import RolloutConfig, RolloutRunner
from gopd_jax.tokenizer import render_chat
from tests.policies import alfworld_tokenizer, scripted_policy

pytest.importorskip("alfworld")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return alfworld_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pool():
    with EnvPool("alfworld", num_workers=2) as p:
        yield p


@pytest.fixture(scope="module")
def tasks():
    return list_tasks("alfworld", "valid_unseen")[:4]


def _random_policy(tokenizer, seed):
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return Policy(init_params(cfg, jax.random.key(seed)), cfg)


def _prompt_end_token(tokenizer):
    msgs = [{"role": "user", "content": "x"}]
    return render_chat(tokenizer, msgs, enable_thinking=False)[-1]


def test_scripted_policy_plays_real_alfworld(tokenizer, pool, tasks):
    policy = scripted_policy(tokenizer, "<action>look</action>", _prompt_end_token(tokenizer))
    cfg = RolloutConfig(env="alfworld", max_turns=3, max_new_tokens=12, temperature=0.0, think=False)
    runner = RolloutRunner(pool, tokenizer, cfg)
    episodes, stats = runner.run(tasks[:3], {STUDENT: policy, TEACHER: policy}, owners_from_beta(0.0),
                                 jax.random.key(0), progress=False)
    assert sorted(e.task.task_id for e in episodes) == sorted(t.task_id for t in tasks[:3])
    for ep in episodes:
        assert len(ep.turns) == 3 and ep.result.rounds == 3 and ep.result.invalid_actions == 0
        assert not ep.result.won and not ep.result.env_failed
        for turn in ep.turns:
            assert turn.owner == STUDENT and turn.action == "look"
            assert turn.result.observation.startswith("You are in the middle of a room")
            assert "look" in turn.result.admissible_actions
    assert stats["turns"] == 9 and stats["generate_s"] > 0

    turns = [t for e in episodes for t in e.turns]
    batch = training_batch(turns, row_multiple=4)
    assert batch["tokens"].shape[0] == 16 and batch["student_mask"][9:].sum() == 0
    for i, t in enumerate(turns):  # token in, token out: the masked targets are the sampled ids
        m = batch["student_mask"][i] > 0
        np.testing.assert_array_equal(batch["targets"][i][m], t.response_ids)
        np.testing.assert_allclose(batch["old_logprobs"][i][m], t.logprobs)
        np.testing.assert_array_equal(batch["tokens"][i][:len(t.prompt_ids)], t.prompt_ids)
    assert batch["teacher_mask"].sum() == 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_mixed_rollout_owner_counts_follow_beta(tokenizer, pool, tasks, beta):
    student, teacher = _random_policy(tokenizer, 1), _random_policy(tokenizer, 2)
    cfg = RolloutConfig(env="alfworld", max_turns=6, max_new_tokens=6)
    key = jax.random.key(7)
    episodes, _ = RolloutRunner(pool, tokenizer, cfg).run(tasks, {STUDENT: student, TEACHER: teacher},
                                                          owners_from_beta(beta), key, progress=False)
    owners = np.array([t.owner == TEACHER for e in episodes for t in e.turns])
    assert len(episodes) == 4 and len(owners) == sum(e.result.rounds for e in episodes)
    if beta in (0.0, 1.0):
        assert owners.all() == bool(beta) and owners.any() == bool(beta)
    else:
        assert 0 < owners.sum() < len(owners)
    for e in episodes:  # each turn's owner is the pre-drawn one for that episode and turn index
        idx = tasks.index(e.task)
        drawn = owners_from_beta(beta)(jax.random.fold_in(jax.random.fold_in(key, idx), 1_000_003), cfg.turn_limit,
                                       idx)
        assert [t.owner == TEACHER for t in e.turns] == list(drawn[:len(e.turns)])
        # random models rarely close an <action> tag: those turns are invalid actions, not crashes
        assert e.result.invalid_actions == sum(t.action is None for t in e.turns)


def test_tcod_owners_and_killed_worker_is_reported(tokenizer, tasks):
    policy = scripted_policy(tokenizer, "<action>look</action>", _prompt_end_token(tokenizer))
    cfg = RolloutConfig(env="alfworld", max_turns=4, max_new_tokens=12, temperature=0.0, think=False)
    with EnvPool("alfworld", num_workers=2) as pool:
        killed = []

        def owners_then_kill(key, n, index):  # runs as each episode starts: kill both workers once
            if not killed:
                for w in pool._workers:
                    w.process.kill()
                killed.append(True)
            return np.arange(n) >= 2

        episodes, _ = RolloutRunner(pool, tokenizer, cfg).run(tasks[:3], {STUDENT: policy, TEACHER: policy},
                                                              owners_then_kill, jax.random.key(0), progress=False)
        assert pool.restarts >= 2
    failed = [e for e in episodes if e.result.env_failed]
    assert len(episodes) == 3 and len(failed) == 2
    ok = [e for e in episodes if not e.result.env_failed][0]
    assert [t.owner for t in ok.turns] == [STUDENT, STUDENT, TEACHER, TEACHER]


def test_inadmissible_action_is_counted_and_answered_by_the_env(tokenizer, pool, tasks):
    from gopd_jax.evaluate import summarize

    policy = scripted_policy(tokenizer, "<action>dance</action>", _prompt_end_token(tokenizer))
    cfg = RolloutConfig(env="alfworld", max_turns=2, max_new_tokens=12, temperature=0.0, think=False)
    episodes, _ = RolloutRunner(pool, tokenizer, cfg).run(tasks[:1], {STUDENT: policy, TEACHER: policy},
                                                          owners_from_beta(0.0), jax.random.key(0), progress=False)
    (ep,) = episodes
    assert [t.action for t in ep.turns] == ["dance", "dance"]
    assert [t.result.observation for t in ep.turns] == ["Nothing happens.", "Nothing happens."]
    assert ep.result.invalid_actions == 0 and ep.result.inadmissible_actions == 2
    assert [t.valid for t in ep.turns] == [False, False]
    assert summarize([ep.result])["valid_action_rate"] == 0.0
