"""Evaluate a policy on an environment split: Score / Success Rate / Rounds, with per-task-type rows (ALFWorld's
task types, ScienceWorld's tasks, WebShop's product categories).

    python -m experiments.evaluate --env alfworld --split valid_unseen --policy expert --limit 12
    python -m experiments.evaluate --env alfworld --split valid_unseen --policy expert --expert handcoded --max-turns 30
    python -m experiments.evaluate --env scienceworld --split test --policy CHECKPOINT_DIR --limit 30
    python -m experiments.evaluate --env webshop --split test --policy expert --data-dir $WEBSHOP_DATA
A checkpoint is evaluated alone (beta = 0) at the eval temperature (default 0.4, the paper's).
"""

import argparse
import dataclasses
import json

from gopd_jax.envs import ENV_NAMES, env_splits
from gopd_jax.evaluate import evaluate_checkpoint, evaluate_expert, format_table
from gopd_jax.experiment import COMPUTE_DTYPES, ExperimentConfig, parse_bool


def _at_least(low, kind=int):
    """An argparse type: a number >= low (rejected at parse time, before any work)."""
    def parse(text):
        value = kind(text)
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="alfworld", choices=ENV_NAMES)
    ap.add_argument("--split", default="valid_unseen")
    ap.add_argument("--policy", required=True, help="'expert' or a Hugging Face checkpoint directory")
    ap.add_argument("--limit", type=_at_least(0), default=0, help="a seeded draw of N tasks stratified over task types (0: the whole split)")
    ap.add_argument("--num-workers", type=_at_least(1), default=4)
    ap.add_argument("--temperature", type=_at_least(0.0, float), default=0.4)
    ap.add_argument("--max-turns", type=_at_least(0), default=0,
                    help="0: the paper's per-environment limit for a model; for --policy expert, its whole plan")
    ap.add_argument("--max-new-tokens", type=_at_least(1), default=512)
    ap.add_argument("--think", type=parse_bool, default=True)
    ap.add_argument("--tokenizer", default="", help="default: the checkpoint's own")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--expert", default="", help="--policy expert: which expert where the env has several "
                                                 "(ALFWorld: walkthrough, handcoded)")
    ap.add_argument("--dtype", default="bfloat16", choices=COMPUTE_DTYPES)
    ap.add_argument("--json", default="", help="also write the summary to this file")
    args = ap.parse_args(argv)
    if args.split not in env_splits(args.env):
        ap.error(f"--split {args.split!r} is not a {args.env} split; choose one of {', '.join(env_splits(args.env))}")
    if args.policy == "expert":
        summary = evaluate_expert(args.env, args.split, limit=args.limit or None, num_workers=args.num_workers,
                                  data_dir=args.data_dir or None, expert=args.expert or None,
                                  **({"max_turns": args.max_turns} if args.max_turns else {}))
    else:
        cfg = dataclasses.replace(ExperimentConfig(), env=args.env, eval_split=args.split, eval_limit=args.limit,
                                  num_workers=args.num_workers, eval_temperature=args.temperature,
                                  max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, think=args.think,
                                  tokenizer=args.tokenizer, data_dir=args.data_dir, compute_dtype=args.dtype)
        summary = evaluate_checkpoint(cfg, args.policy)
    print(format_table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
