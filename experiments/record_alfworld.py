"""Record real ALFWorld episodes for `alfworld_replay_bench` (gopd_jax.envs.replay), a benchmark tool.

Plays a handful of valid_unseen games on the real TextWorld engine: at every state of the walkthrough it also
sends a few actions that leave the state unchanged ("look", "inventory", an impossible command), so the replay
answers the engine's own text to those too. Every step's wall time is recorded, so a replay can wait as long
as the engine did.

    python -m experiments.record_alfworld --per-type 1 --out experiments/data/alfworld_replay.json
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from gopd_jax.envs import list_tasks, make_env
from gopd_jax.envs.alfworld_env import TASK_TYPES

# Commands that never change an ALFWorld state: the engine describes the room / inventory, or says
# "Nothing happens." to an impossible command.
STATE_PRESERVING = ("look", "inventory", "take unicorn 1 from moon 1")


def _result(res, seconds: float, action: str | None = None) -> dict:
    out = {"observation": res.observation, "won": res.won, "done": res.done,
           "admissible": list(res.admissible_actions), "seconds": round(seconds, 4)}
    return out if action is None else {"action": action, **out}


def record_game(env, task) -> dict:
    t0 = time.perf_counter()
    goal, first = env.reset(task)
    reset_s = time.perf_counter() - t0
    states = [{**_result(first, reset_s), "other": []}]
    for action in env.expert_actions():
        for probe in STATE_PRESERVING:
            t0 = time.perf_counter()
            res = env.step(probe)
            states[-1]["other"].append(_result(res, time.perf_counter() - t0, probe))
            if res.admissible_actions != tuple(states[-1]["admissible"]):
                raise RuntimeError(f"{probe!r} changed the admissible actions of {task.task_id}")
        t0 = time.perf_counter()
        res = env.step(action)
        states.append({**_result(res, time.perf_counter() - t0, action), "other": []})
        if res.done:
            break
    if not states[-1]["won"]:
        raise RuntimeError(f"the walkthrough of {task.task_id} did not win")
    # Task ids are stored relative to the split folder: the recording carries no machine paths.
    rel = "/".join(Path(task.task_id).parts[-3:-1])
    return {"game": rel, "split": task.split, "task_type": task.task_type, "goal": goal, "states": states}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="valid_unseen")
    ap.add_argument("--per-type", type=int, default=1, help="games per ALFWorld task type (seeded draw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="experiments/data/alfworld_replay.json")
    args = ap.parse_args(argv)
    tasks = list_tasks("alfworld", args.split)
    rng = random.Random(args.seed)
    chosen = [t for tt in TASK_TYPES for t in rng.sample([t for t in tasks if t.task_type == tt], args.per_type)]
    env = make_env("alfworld")
    try:
        games = []
        for task in chosen:
            games.append(record_game(env, task))
            print(f"{games[-1]['game']}: {len(games[-1]['states']) - 1} walkthrough steps", flush=True)
    finally:
        env.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": "alfworld", "games": games}, separators=(",", ":")))
    print(f"wrote {len(games)} games to {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
