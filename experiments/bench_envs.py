"""Environment throughput vs number of worker processes (expert actions replayed, so every step is valid).

    python -m experiments.bench_envs --env alfworld --workers 1 2 --episodes 24
"""
from __future__ import annotations

import argparse
import random
import time

import jax

from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.evaluate import EXPERT_TURN_LIMIT
from gopd_jax.methods import owners_from_beta
from gopd_jax.records import EXPERT, STUDENT, TEACHER
from gopd_jax.reporting import markdown_table
from gopd_jax.rollout import RolloutConfig, RolloutRunner, env_kwargs

DEFAULT_SPLIT = {"alfworld": "valid_unseen", "scienceworld": "dev"}


def bench(env_name: str, split: str, workers: int, episodes: int, reset_rounds: int = 3) -> dict[str, float]:
    tasks = list_tasks(env_name, split)
    random.Random(0).shuffle(tasks)  # a mix of task types, the same for every worker count
    with EnvPool(env_name, env_kwargs(env_name, expert=True), num_workers=workers) as pool:  # start-up not timed
        start = time.perf_counter()
        for r in range(reset_rounds):  # resets alone, all slots in parallel
            pool.reset({s: tasks[(r * workers + s) % len(tasks)] for s in pool.slots})
        resets_per_s = reset_rounds * workers / (time.perf_counter() - start)
        runner = RolloutRunner(pool, None, RolloutConfig(env=env_name, max_turns=EXPERT_TURN_LIMIT))
        start = time.perf_counter()
        done, stats = runner.run([tasks[i % len(tasks)] for i in range(episodes)], {STUDENT: EXPERT, TEACHER: EXPERT},
                                 owners_from_beta(1.0), jax.random.PRNGKey(0), progress=False)
        wall = time.perf_counter() - start
    return {"workers": workers, "episodes": len(done), "wall_s": wall, "steps_per_s": stats["turns"] / wall,
            "resets_per_s": resets_per_s}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="alfworld")
    parser.add_argument("--split", default=None, help=f"default: {DEFAULT_SPLIT}")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--episodes", type=int, default=24, help="expert episodes per worker count")
    args = parser.parse_args(argv)
    split = args.split or DEFAULT_SPLIT[args.env]
    print(f"env={args.env} split={split} episodes={args.episodes} (the expert through the rollout engine; a slot "
          "resets to the next task when its episode ends)")
    rows = [bench(args.env, split, n, args.episodes) for n in args.workers]
    print(markdown_table(
        ["workers", "episodes done", "wall s", "steps/s (incl. resets)", "speedup", "resets/s alone", "speedup"],
        [[r["workers"], r["episodes"], f"{r['wall_s']:.1f}", f"{r['steps_per_s']:.1f}",
          f"{r['steps_per_s'] / rows[0]['steps_per_s']:.2f}x", f"{r['resets_per_s']:.2f}",
          f"{r['resets_per_s'] / rows[0]['resets_per_s']:.2f}x"] for r in rows]))

if __name__ == "__main__":
    main()
