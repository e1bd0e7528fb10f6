"""Evaluate a policy on an environment split: Score / Success Rate / Rounds, with per-task-type rows (ALFWorld's
task types, ScienceWorld's tasks, WebShop's product categories).

    python -m experiments.evaluate --env alfworld --split valid_unseen --policy expert --limit 12
    python -m experiments.evaluate --env scienceworld --split test --policy CHECKPOINT_DIR --limit 30
    python -m experiments.evaluate --env webshop --split test --policy expert --data-dir $WEBSHOP_DATA
A checkpoint is evaluated alone (beta = 0) at the eval temperature (default 0.4, the paper's).
"""

import argparse
import dataclasses
import json

from gopd_jax.evaluate import evaluate_checkpoint, evaluate_expert, format_table
from gopd_jax.experiment import ExperimentConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="alfworld")
    ap.add_argument("--split", default="valid_unseen")
    ap.add_argument("--policy", required=True, help="'expert' or a Hugging Face checkpoint directory")
    ap.add_argument("--limit", type=int, default=0, help="a seeded draw of N tasks stratified over task types (0: the whole split)")
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.4)
    ap.add_argument("--max-turns", type=int, default=0, help="0: the paper's per-environment limit")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--think", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    ap.add_argument("--tokenizer", default="", help="default: the checkpoint's own")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default="", help="also write the summary to this file")
    args = ap.parse_args(argv)
    if args.policy == "expert":
        summary = evaluate_expert(args.env, args.split, limit=args.limit or None, num_workers=args.num_workers,
                                  data_dir=args.data_dir or None)
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
