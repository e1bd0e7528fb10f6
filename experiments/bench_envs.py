"""Environment throughput vs number of worker processes (expert actions replayed, so every step is valid).

    python -m experiments.bench_envs --env alfworld --workers 1 2 --episodes 24
    python -m experiments.bench_envs --env webshop --data-dir $WEBSHOP_DATA --workers 1 2 --episodes 400

WebShop also reports catalogue load, BM25 index build, search latency and in-process reset/step latency.
Without the upstream catalogue, `--webshop-samples DIR --webshop-products N` benchmarks on N products made by
repeating the real sample records of DIR (the project's shared/data/webshop) under fresh ASINs, in a temp
folder: realistic document lengths for timing only, not a shop anyone should evaluate on.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import jax

from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.evaluate import EXPERT_TURN_LIMIT
from gopd_jax.methods import owners_from_beta
from gopd_jax.records import EXPERT, STUDENT, TEACHER
from gopd_jax.reporting import markdown_table
from gopd_jax.rollout import RolloutConfig, RolloutRunner, env_kwargs

DEFAULT_SPLIT = {"alfworld": "valid_unseen", "scienceworld": "dev", "webshop": "test"}


def bench(env_name: str, split: str, workers: int, episodes: int, reset_rounds: int = 3,
          data_dir: str | None = None) -> dict[str, float]:
    tasks = list_tasks(env_name, split, data_dir=data_dir)
    random.Random(0).shuffle(tasks)  # a mix of task types, the same for every worker count
    with EnvPool(env_name, env_kwargs(env_name, expert=True), num_workers=workers) as pool:  # start-up not timed
        if env_name == "webshop":  # its workers load catalogue and index on their first reset: start-up too
            pool.reset({s: tasks[s % len(tasks)] for s in pool.slots})
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


def replicated_webshop_samples(samples: Path, n_products: int, out: Path) -> Path:
    """A timing-only catalogue: the sample records repeated under fresh ASINs (attributes and synthetic
    instructions copied from the real items_ins_v2_1000.json entry of the record they repeat)."""
    records = json.loads((samples / "sample_items.json").read_text())
    ins_v2 = json.loads((samples / "items_ins_v2_1000.json").read_text())
    products, attrs = [], {}
    for i in range(n_products):
        record = records[i % len(records)]
        asin = f"Z{i:09d}"
        products.append({**record, "asin": asin})
        attrs[asin] = ins_v2[record["asin"]]
    (out / "items_shuffle_1000.json").write_text(json.dumps(products))
    (out / "items_ins_v2_1000.json").write_text(json.dumps(attrs))
    return out


def bench_webshop_search(data_dir: str | None, queries: int = 200) -> dict[str, float]:
    """Catalogue load, BM25 index build (fresh cache) and reload, search latency, and in-process reset / step
    latency over expert episodes (no worker-pipe overhead)."""
    from gopd_jax.envs.webshop import WebShopEnv
    from gopd_jax.envs.webshop.data import load_catalogue, resolve_data_dir
    from gopd_jax.envs.webshop.search import ProductSearch

    start = time.perf_counter()
    cat = load_catalogue(resolve_data_dir(data_dir))
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        built = ProductSearch(cat.products, cache)
        start = time.perf_counter()
        ProductSearch(cat.products, cache)
        reload_s = time.perf_counter() - start
    latencies = []
    for goal in cat.goals[:queries]:
        start = time.perf_counter()
        built.search(goal["instruction_text"])
        latencies.append(time.perf_counter() - start)
    env, resets, steps = WebShopEnv(), [], []
    for task in list_tasks("webshop", "test", data_dir=data_dir)[:queries]:
        start = time.perf_counter()
        env.reset(task)
        resets.append(time.perf_counter() - start)
        for action in env.expert_actions():
            start = time.perf_counter()
            env.step(action)
            steps.append(time.perf_counter() - start)
    return {"products": len(cat.products), "goals": len(cat.goals), "load_s": load_s,
            "index_build_s": built.build_seconds, "index_reload_s": reload_s,
            "search_ms": 1000 * statistics.median(latencies), "reset_ms": 1000 * statistics.median(resets[1:]),
            "steps_per_s": len(steps) / sum(steps)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="alfworld")
    parser.add_argument("--split", default=None, help=f"default: {DEFAULT_SPLIT}")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--episodes", type=int, default=24, help="expert episodes per worker count")
    parser.add_argument("--data-dir", default=None, help="the environment's data (WebShop: the upstream files)")
    parser.add_argument("--webshop-samples", default=None, help="benchmark WebShop on the sample records of this "
                        "folder, repeated to --webshop-products products")
    parser.add_argument("--webshop-products", type=int, default=1000)
    args = parser.parse_args(argv)
    split = args.split or DEFAULT_SPLIT[args.env]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if args.env == "webshop" and args.webshop_samples:
            data_dir = str(replicated_webshop_samples(Path(args.webshop_samples), args.webshop_products, Path(tmp)))
        if args.env == "webshop":
            s = bench_webshop_search(data_dir)
            print(f"webshop: {s['products']} products, {s['goals']} goals; catalogue + goals load {s['load_s']:.2f} s, "
                  f"BM25 index build {s['index_build_s']:.2f} s, cached index load {s['index_reload_s']:.3f} s, "
                  f"search (instruction as query) median {s['search_ms']:.2f} ms; in one process: reset median "
                  f"{s['reset_ms']:.2f} ms, expert steps {s['steps_per_s']:.0f}/s")
        print(f"env={args.env} split={split} episodes={args.episodes} (the expert through the rollout engine; a "
              "slot resets to the next task when its episode ends)")
        rows = [bench(args.env, split, n, args.episodes, data_dir=data_dir) for n in args.workers]
    print(markdown_table(
        ["workers", "episodes done", "wall s", "steps/s (incl. resets)", "speedup", "resets/s alone", "speedup"],
        [[r["workers"], r["episodes"], f"{r['wall_s']:.1f}", f"{r['steps_per_s']:.1f}",
          f"{r['steps_per_s'] / rows[0]['steps_per_s']:.2f}x", f"{r['resets_per_s']:.2f}",
          f"{r['resets_per_s'] / rows[0]['resets_per_s']:.2f}x"] for r in rows]))

if __name__ == "__main__":
    main()
