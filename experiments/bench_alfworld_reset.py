"""Where an ALFWorld reset spends its time, and what the adapter's engine caches save.

Times `load` + `reset`, the walkthrough's steps, and a second episode of `--random-steps` seeded picks among
the admissible actions (what a model that has not learnt the game does for 30 turns) of the same train games (a
seeded draw) twice, each in a fresh process: once on textworld's engine as shipped
(`AlfredDemangler(PddlEnv)`), once through `AlfWorldEnv` (one PDDL->SAS translation per episode instead of
four, memoized grammar and condition parses, shallow copies of the text generator's contexts). With
`--profile`, also prints the cProfile top of the adapter's resets and steps.

    python -m experiments.bench_alfworld_reset --games 12
"""
from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing as mp
import pstats
import statistics
import time

from gopd_jax.envs import list_tasks


def _draw(n: int, seed: int):
    import numpy as np

    tasks = list_tasks("alfworld", "train")
    return [tasks[i] for i in np.random.default_rng(seed).permutation(len(tasks))[:n]]


def _time_games(mode: str, n: int, seed: int, random_steps: int, profile: bool, out) -> None:
    import random

    from gopd_jax.envs.alfworld_env import AlfWorldEnv, split_intro

    tasks = _draw(n, seed)
    if mode == "textworld":
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.envs.pddl import PddlEnv

        env = AlfredDemangler(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True)), shuffle=False)

        def reset(task):  # -> (walkthrough, admissible actions)
            env.load(task.task_id)
            state = env.reset()
            split_intro(state.feedback)
            with open(task.task_id) as f:
                return json.load(f)["walkthrough"], state["admissible_commands"]

        def step(action):
            return env.step(action)[0]["admissible_commands"]
    else:
        adapter = AlfWorldEnv()

        def reset(task):
            admissible = adapter.reset(task)[1].admissible_actions
            return adapter.expert_actions(), admissible

        def step(action):
            return adapter.step(action).admissible_actions
    reset(tasks[0])  # warm-up: imports, first dlopen
    prof = cProfile.Profile() if profile else None
    resets, steps, random_times = [], [], []
    rng = random.Random(seed)
    for task in tasks:
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        actions, _ = reset(task)
        resets.append(time.perf_counter() - t0)
        for action in actions:
            t0 = time.perf_counter()
            step(action)
            steps.append(time.perf_counter() - t0)
        _, admissible = reset(task)
        for _ in range(random_steps):
            t0 = time.perf_counter()
            admissible = step(rng.choice(sorted(admissible)))
            random_times.append(time.perf_counter() - t0)
        if prof:
            prof.disable()
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    out.put({"mode": mode, "reset_mean_s": statistics.fmean(resets), "reset_min_s": min(resets),
             "reset_max_s": max(resets), "step_mean_s": statistics.fmean(steps), "games": len(tasks),
             "steps": len(steps), "random_step_mean_s": statistics.fmean(random_times) if random_times else 0.0})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--random-steps", type=int, default=30, help="random admissible actions per game")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")  # a fresh process per mode: the adapter's caches are process-wide
    rows = []
    for mode in ("textworld", "adapter"):
        q = ctx.Queue()
        p = ctx.Process(target=_time_games, args=(mode, args.games, args.seed, args.random_steps,
                                                    args.profile and mode == "adapter", q))
        p.start()
        rows.append(q.get())
        p.join()
    print("| engine | games | reset mean (s) | min | max | walkthrough step mean (s) | random step mean (s) |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['games']} | {r['reset_mean_s']:.2f} | {r['reset_min_s']:.2f} | "
              f"{r['reset_max_s']:.2f} | {r['step_mean_s']:.3f} | {r['random_step_mean_s']:.3f} |")
    base, ours = rows
    print(f"reset speed-up {base['reset_mean_s'] / ours['reset_mean_s']:.2f}x, "
          f"walkthrough step speed-up {base['step_mean_s'] / ours['step_mean_s']:.2f}x, "
          f"random step speed-up {base['random_step_mean_s'] / max(ours['random_step_mean_s'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
