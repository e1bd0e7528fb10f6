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


def _replay_uncached(task_ids, queue):
    import json

    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    from gopd_jax.envs.alfworld_env import split_intro

    env = AlfredDemangler(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True)), shuffle=False)
    out = []
    for task_id in task_ids:
        env.load(task_id)
        state = env.reset()
        trace = [(split_intro(state.feedback)[1], tuple(state["admissible_commands"]), False)]
        for action in json.load(open(task_id))["walkthrough"] + ["fly to the moon"]:
            state, _, _ = env.step(action)
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
    try:
        for task, want in zip(games, reference):
            _, first = env.reset(task)
            got = [(first.observation, first.admissible_actions, False)]
            for action in env.expert_actions() + ["fly to the moon"]:
                r = env.step(action)
                got.append((r.observation, r.admissible_actions, r.won))
            assert got == want
            assert got[-2][2]  # the walkthrough won
    finally:
        env.close()
