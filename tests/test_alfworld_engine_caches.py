"""The ALFWorld adapter's engine caches change speed only: every observation, admissible-action list and
result of a walkthrough equals what textworld's engine as shipped (a fresh process, no caches) produces."""
import multiprocessing as mp

import numpy as np
import pytest

pytest.importorskip("textworld", reason="textworld is not installed (pip install 'textworld[pddl]')")
pytest.importorskip("alfworld", reason="alfworld is not installed (pip install alfworld)")

from gopd_jax.envs import list_tasks, make_env  # noqa: E402


def _games():
    tasks = list_tasks("alfworld", "train")
    # Two games of different task types, replayed back to back in one engine (the caches carry over).
    return [tasks[i] for i in np.random.default_rng(3).permutation(len(tasks))[:2]]


def _plays(task_ids):
    """Per game the walkthrough then a command the engine does not know, and for the first game a second episode
    of 40 seeded picks among the admissible actions (every verb: its text templates are what the caches speed up)."""
    import json
    import random

    for i, task_id in enumerate(task_ids):
        yield task_id, json.load(open(task_id))["walkthrough"] + ["fly to the moon"]
        if i == 0:
            yield task_id, random.Random(7)


def _next_action(actions, step, admissible):
    return actions[step] if isinstance(actions, list) else actions.choice(sorted(admissible))


def _steps(actions):
    return len(actions) if isinstance(actions, list) else 40


def _replay_uncached(task_ids, queue):
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    from gopd_jax.envs.alfworld_env import split_intro

    env = AlfredDemangler(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True)), shuffle=False)
    out = []
    for task_id, actions in _plays(task_ids):
        env.load(task_id)
        state = env.reset()
        trace = [(split_intro(state.feedback)[1], tuple(state["admissible_commands"]), False)]
        for step in range(_steps(actions)):
            state, _, _ = env.step(_next_action(actions, step, state["admissible_commands"]))
            trace.append((state.feedback.strip(), tuple(state["admissible_commands"]), bool(state["won"])))
        out.append(trace)
    queue.put(out)


def test_cached_engine_replays_exactly_like_textworld():
    games = _games()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_replay_uncached, args=([t.task_id for t in games], queue))
    proc.start()
    reference = queue.get(timeout=600)
    proc.join()
    env = make_env("alfworld")
    by_id = {t.task_id: t for t in games}
    try:
        plays = list(_plays([t.task_id for t in games]))
        assert len(reference) == len(plays) == 3
        for (task_id, actions), want in zip(plays, reference):
            _, r = env.reset(by_id[task_id])
            got = [(r.observation, r.admissible_actions, False)]
            for step in range(_steps(actions)):
                r = env.step(_next_action(actions, step, r.admissible_actions))
                got.append((r.observation, r.admissible_actions, r.won))
            assert got == want
            if isinstance(actions, list):
                assert got[-2][2]  # the walkthrough won
            else:  # the random episode went places: many distinct observations
                assert len({o for o, _, _ in got}) > 10
    finally:
        env.close()
