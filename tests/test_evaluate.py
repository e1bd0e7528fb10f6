"""Evaluation subsets (seeded draws stratified over task types, never a prefix of the task list) and the
per-episode summaries: success by turn, the action profile."""

import collections

import numpy as np

from gopd_jax.envs import StepResult, TaskSpec
from gopd_jax.evaluate import NO_ACTION, action_profile, stratified_draw, success_by_turn
from gopd_jax.records import STUDENT, Episode, EpisodeResult, Turn


def _tasks():
    # a list sorted by type, like ALFWorld's splits: any prefix covers few types
    sizes = {"clean": 31, "cool": 25, "heat": 23, "look": 18, "pick_two": 24, "put": 13}
    return [TaskSpec("alfworld", "valid_unseen", f"{t}/{i}", t) for t, n in sizes.items() for i in range(n)]


def test_stratified_draw_spreads_over_types_and_is_seeded():
    tasks = _tasks()
    draw = stratified_draw(tasks, 30, seed=3)
    counts = collections.Counter(t.task_type for t in draw)
    assert len(draw) == 30 == len(set(draw)) and set(counts.values()) == {5}
    assert draw == stratified_draw(tasks, 30, seed=3) and draw != stratified_draw(tasks, 30, seed=4)
    assert draw != tasks[:30]
    small = collections.Counter(t.task_type for t in stratified_draw(tasks, 8, seed=0))
    assert len(small) == 6 and max(small.values()) == 2
    assert stratified_draw(tasks, 0, seed=0) == tasks == stratified_draw(tasks, 500, seed=0)


def test_stratified_draw_takes_all_of_a_small_type_then_fills_from_the_others():
    tasks = _tasks()
    draw = stratified_draw(tasks, 100, seed=1)
    counts = collections.Counter(t.task_type for t in draw)
    assert counts["put"] == 13 and sum(counts.values()) == 100 and max(counts.values()) - 13 <= 5


def test_success_by_turn():
    t = TaskSpec("alfworld", "valid_unseen", "x", "y")
    results = [EpisodeResult(t, True, 100, 2), EpisodeResult(t, False, 0, 5), EpisodeResult(t, True, 100, 4)]
    assert success_by_turn(results, 5) == [0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3]


def _episode(actions_valid):
    task = TaskSpec("alfworld", "valid_unseen", "x", "y")
    empty = np.zeros(0, np.int32)
    turns = [Turn(STUDENT, empty, empty, np.zeros(0, np.float32), action, StepResult("", 0.0, 0.0, False, False),
                  index=i, valid=valid) for i, (action, valid) in enumerate(actions_valid)]
    return Episode(0, task, "", turns, EpisodeResult(task, False, 0.0, len(turns)))


def test_action_profile_counts_verbs_validity_and_repeats_within_an_episode():
    first = _episode([("go to desk 1", True), ("Examine desk 1", True), ("go to bed 1", True),
                      ("go to desk 1", True), (None, False), ("examine desk 1", True), ("take pen 2", False)])
    second = _episode([("examine desk 1", True), ("go to desk 1", False)])  # a new episode: nothing repeats yet
    got = action_profile([first, second])
    assert list(got) == sorted(got) == [NO_ACTION, "examine", "go", "take"]  # "Examine" counts as "examine"
    assert got["go"] == {"turns": 4, "valid": 3, "repeats": 1}
    assert got["examine"] == {"turns": 3, "valid": 3, "repeats": 0}  # actions repeat only when identical
    assert got[NO_ACTION] == {"turns": 1, "valid": 0, "repeats": 0}
    assert got["take"] == {"turns": 1, "valid": 0, "repeats": 0}
    assert action_profile([]) == {}
