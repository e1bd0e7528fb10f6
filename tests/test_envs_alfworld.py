"""ALFWorld adapter on the real TextWorld engine and the project's game files."""
import os
import tarfile

import pytest

pytest.importorskip("textworld", reason="textworld is not installed (pip install 'textworld[pddl]')")
pytest.importorskip("alfworld", reason="alfworld is not installed (pip install alfworld)")

from gopd_jax.envs import list_tasks, make_env  # noqa: E402
from gopd_jax.envs.alfworld_env import TASK_TYPES, _unpack_once, resolve_data_dir  # noqa: E402


@pytest.fixture(scope="module")
def valid_unseen():
    return list_tasks("alfworld", "valid_unseen")


@pytest.fixture(scope="module")
def env():
    env = make_env("alfworld")
    yield env
    env.close()


def test_valid_unseen_has_134_games_of_all_types(valid_unseen):
    assert len(valid_unseen) == 134
    assert {t.task_type for t in valid_unseen} == set(TASK_TYPES)
    assert all(t.task_id.endswith("game.tw-pddl") for t in valid_unseen)


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_walkthrough_wins_one_game_per_type(env, valid_unseen, task_type):
    task = next(t for t in valid_unseen if t.task_type == task_type)
    goal, first = env.reset(task)
    assert goal and goal in first.observation
    assert "Welcome to TextWorld" not in first.observation
    assert not first.done and first.admissible_actions
    actions, result = env.expert_actions(), first
    for i, action in enumerate(actions):
        assert action in result.admissible_actions
        result = env.step(action)
        assert result.done == (i == len(actions) - 1), (i, action, result.observation)
    assert result.won and result.score == 100.0 and result.reward == 1.0


def test_invalid_action_keeps_state(env, valid_unseen):
    _, first = env.reset(valid_unseen[0])
    result = env.step("fly to the moon")
    assert result.observation == "Nothing happens."
    assert not result.done and result.score == 0.0
    assert result.admissible_actions == first.admissible_actions


def test_bad_split_and_data_dir(tmp_path):
    with pytest.raises(ValueError, match="valid_unseen"):
        list_tasks("alfworld", "test")
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        resolve_data_dir(tmp_path)


def test_unpack_once_is_atomic_and_idempotent(tmp_path):
    src = tmp_path / "src" / "json_2.1.1" / "train"
    src.mkdir(parents=True)
    (src / "a.txt").write_text("x")
    archive = tmp_path / "data.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "src" / "json_2.1.1", arcname="json_2.1.1")
    dest = tmp_path / "cache" / "alfworld"
    _unpack_once(archive, dest)
    _unpack_once(archive, dest)  # second call finds the data and does nothing
    assert (dest / "json_2.1.1" / "train" / "a.txt").read_text() == "x"
    assert os.listdir(dest.parent) == ["alfworld"]  # no temp dirs left behind


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    import gopd_jax.envs.alfworld_env as alf

    monkeypatch.setenv("GOPD_CACHE", str(tmp_path))
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    monkeypatch.setattr(alf, "_find_archive", lambda: None)
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        resolve_data_dir()
