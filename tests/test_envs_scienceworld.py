"""ScienceWorld adapter on the real (JVM) simulator."""
import pytest

pytest.importorskip("scienceworld", reason="scienceworld is not installed (pip install scienceworld)")

from gopd_jax.envs import TaskSpec, list_tasks, make_env  # noqa: E402

# Short gold paths of different kinds: find, lifespan comparison, electrical, measurement.
TASKS = ("find-non-living-thing", "lifespan-longest-lived", "power-component", "use-thermometer")


@pytest.fixture(scope="module")
def env():
    env = make_env("scienceworld")
    yield env
    env.close()


@pytest.fixture(scope="module")
def test_split():
    return list_tasks("scienceworld", "test")


def test_splits_cover_all_30_tasks(test_split):
    assert len({t.task_type for t in test_split}) == 30
    assert all(t.task_id == f"{t.task_type}:{t.task_id.rsplit(':', 1)[1]}" for t in test_split)


@pytest.mark.parametrize("task_name", TASKS)
def test_gold_path_reaches_score_100(env, test_split, task_name):
    task = next(t for t in test_split if t.task_type == task_name)  # first test variation
    goal, first = env.reset(task)
    assert goal.startswith("Your task is to") and first.admissible_actions and not first.done
    for action in env.expert_actions():
        result = env.step(action)
        assert 0.0 <= result.score <= 100.0
    assert result.done and result.won and result.score == 100.0


def test_invalid_action_and_failure_score(env):
    env.reset(TaskSpec("scienceworld", "train", "find-living-thing:0", "find-living-thing"))
    invalid = env.step("fly to the moon")
    assert invalid.observation == "No known action matches that input." and not invalid.done
    # Focusing on the wrong object fails the task: the simulator's -100 becomes score 0, done, lost.
    failed = env.step("focus on air")
    assert failed.done and not failed.won and failed.score == 0.0


def test_bad_split():
    with pytest.raises(ValueError, match="dev"):
        list_tasks("scienceworld", "valid")
