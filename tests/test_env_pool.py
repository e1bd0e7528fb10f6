"""EnvPool on real ALFWorld workers: parallel stepping, crash and hang recovery."""
import os
import signal

import pytest

pytest.importorskip("textworld", reason="textworld is not installed (pip install 'textworld[pddl]')")
pytest.importorskip("alfworld", reason="alfworld is not installed (pip install alfworld)")

from gopd_jax.envs import EnvPool, TaskSpec, list_tasks, make_env  # noqa: E402


@pytest.fixture(scope="module")
def tasks():
    by_type = {}
    for task in list_tasks("alfworld", "valid_unseen"):
        by_type.setdefault(task.task_type, task)
    return [by_type["look_at_obj_in_light"], by_type["pick_and_place_simple"]]


@pytest.fixture(scope="module")
def single_env_runs(tasks):
    """Per task: (expert actions, observations) from one in-process env, the reference."""
    env = make_env("alfworld")
    runs = []
    for task in tasks:
        env.reset(task)
        actions = env.expert_actions()
        runs.append((actions, [env.step(a).observation for a in actions]))
    env.close()
    return runs


def _worker_pid(pool, slot):
    return pool._workers[slot].process.pid


def test_parallel_steps_match_single_env(tasks, single_env_runs):
    with EnvPool("alfworld", num_workers=2) as pool:
        pool.reset(dict(enumerate(tasks)))
        assert [pool.expert_actions(s) for s in pool.slots] == [a for a, _ in single_env_runs]
        observations = {0: [], 1: []}
        for t in range(max(len(a) for a, _ in single_env_runs)):
            actions = {s: a[t] for s, (a, _) in enumerate(single_env_runs) if t < len(a)}
            pool.step_async(actions)
            for slot, result in pool.collect().items():
                observations[slot].append(result.observation)
                assert result.won == (t == len(single_env_runs[slot][0]) - 1)
        assert [observations[0], observations[1]] == [o for _, o in single_env_runs]
        assert pool.restarts == 0


def test_collect_modes(tasks):
    with EnvPool("alfworld", num_workers=2) as pool:
        pool.reset_async({0: tasks[0], 1: tasks[1]})
        first = pool.collect("any")
        assert first and pool.num_pending == 2 - len(first)
        rest = pool.collect("all")
        assert set(first) | set(rest) == {0, 1} and pool.num_pending == 0
        assert pool.collect("none") == {}
        pool.step_async({0: "look"})
        with pytest.raises(ValueError, match="pending"):
            pool.step_async({0: "look"})
        assert list(pool.step({1: "look"})) == [1]  # a sync call leaves other slots pending
        assert list(pool.collect()) == [0]


def test_killed_worker_fails_its_slot_and_is_restarted(tasks, single_env_runs):
    with EnvPool("alfworld", num_workers=2) as pool:
        pool.reset(dict(enumerate(tasks)))
        actions = [a for a, _ in single_env_runs]
        pool.step({0: actions[0][0], 1: actions[1][0]})
        old_pid = _worker_pid(pool, 1)
        os.kill(old_pid, signal.SIGKILL)
        results = pool.step({0: actions[0][1], 1: actions[1][1]})
        assert not results[0].info and results[0].observation == single_env_runs[0][1][1]
        failed = results[1]
        assert failed.done and not failed.won and failed.score == 0.0
        assert failed.info["env_failed"] and "died" in failed.info["reason"]
        assert pool.restarts == 1 and _worker_pid(pool, 1) != old_pid
        # The fresh worker plays a whole episode on the slot.
        goal, _ = pool.reset({1: tasks[1]})[1]
        assert goal
        for action in actions[1]:
            result = pool.step({1: action})[1]
        assert result.won


def test_hung_worker_times_out_and_is_restarted(tasks, single_env_runs):
    with EnvPool("alfworld", num_workers=2, step_timeout_s=2) as pool:
        pool.reset(dict(enumerate(tasks)))
        hung = pool._workers[0].process
        os.kill(hung.pid, signal.SIGSTOP)  # a real hang: the process stays alive but never answers
        results = pool.step({0: "look", 1: "look"})
        assert results[0].info["env_failed"] and "timed out" in results[0].info["reason"]
        assert not results[1].info
        assert pool.restarts == 1 and not hung.is_alive()
        _, first = pool.reset({0: tasks[0]})[0]
        assert not first.done and first.admissible_actions


def test_failed_reset_is_reported_not_raised():
    with EnvPool("alfworld", num_workers=1) as pool:
        goal, result = pool.reset({0: TaskSpec("alfworld", "valid_unseen", "/nonexistent/game.tw-pddl",
                                               "pick_and_place_simple")})[0]
        assert goal == "" and result.done and result.info["env_failed"]
        assert "nonexistent" in result.info["reason"] and pool.restarts == 1


def test_unknown_env_name_is_a_clear_error():
    with pytest.raises(ValueError, match="alfworld, scienceworld"):
        EnvPool("webshopp", num_workers=1)
    with pytest.raises(ValueError, match="alfworld, scienceworld"):
        make_env("nope")


def test_env_that_cannot_start_is_a_clear_error():
    with pytest.raises(RuntimeError, match="failed to start(.|\n)*unexpected keyword argument 'bogus'"):
        EnvPool("alfworld", {"bogus": 1}, num_workers=1)


def test_evaluate_expert_summary():
    from gopd_jax.evaluate import evaluate_expert, format_table

    # the expert through the rollout engine, on a seeded draw stratified over task types (not a list prefix)
    summary = evaluate_expert("alfworld", "valid_unseen", limit=3, num_workers=2)
    assert summary["n"] == 3 and summary["success_rate"] == 100.0 and summary["score"] == 100.0
    assert summary["env_failures"] == 0 and summary["rounds"] > 1
    assert len(summary["by_task_type"]) == 3 and all(m["n"] == 1 for m in summary["by_task_type"].values())
    table = format_table(summary)
    assert "| **all** | 3 | 100.00 | 100.00 |" in table
