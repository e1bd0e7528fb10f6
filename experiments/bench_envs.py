"""Environment throughput vs number of worker processes (expert actions replayed, so every step is valid).

    python -m experiments.bench_envs --env alfworld --workers 1 2 --steps 200
"""
from __future__ import annotations

import argparse
import itertools
import random
import time

from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.evaluate import replay_experts

DEFAULT_SPLIT = {"alfworld": "valid_unseen", "scienceworld": "dev"}


def bench(env_name: str, split: str, workers: int, steps: int, reset_rounds: int = 3) -> dict[str, float]:
    tasks = list_tasks(env_name, split)
    random.Random(0).shuffle(tasks)  # a mix of task types, the same for every worker count
    with EnvPool(env_name, num_workers=workers) as pool:  # start-up is not timed
        start = time.perf_counter()
        for r in range(reset_rounds):  # resets alone, all slots in parallel
            pool.reset({s: tasks[(r * workers + s) % len(tasks)] for s in pool.slots})
        resets_per_s = reset_rounds * workers / (time.perf_counter() - start)
        start = time.perf_counter()
        episodes = replay_experts(pool, list(itertools.islice(itertools.cycle(tasks), steps)), max_steps=steps)
        wall = time.perf_counter() - start
    return {"workers": workers, "episodes": len(episodes), "wall_s": wall, "steps_per_s": steps / wall,
            "resets_per_s": resets_per_s}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="alfworld")
    parser.add_argument("--split", default=None, help=f"default: {DEFAULT_SPLIT}")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    split = args.split or DEFAULT_SPLIT[args.env]
    print(f"env={args.env} split={split} steps={args.steps} (expert replay; a slot resets to the next task "
          "when its episode ends)")
    rows = [bench(args.env, split, n, args.steps) for n in args.workers]
    print("| workers | episodes done | wall s | steps/s (incl. resets) | speedup | resets/s alone | speedup |\n"
          "|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['episodes']} | {row['wall_s']:.1f} | {row['steps_per_s']:.1f} | "
              f"{row['steps_per_s'] / rows[0]['steps_per_s']:.2f}x | {row['resets_per_s']:.2f} | "
              f"{row['resets_per_s'] / rows[0]['resets_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
