"""What a mini-scale ScienceWorld teacher would have to learn (issue 12, item 6), measured from a seeded sample of
gold-path episodes replayed through the real environment (`gopd_jax.expert_corpus`).

    python -m gopd_jax.expert_corpus --env scienceworld --split train --out runs/sw_feasibility/corpus --limit 60
    python experiments/results/mini_repro/scienceworld/feasibility.py runs/sw_feasibility/corpus \
        runs/mini_repro/tokenizer [QWEN3_TOKENIZER_DIR] \
        > experiments/results/mini_repro/scienceworld/feasibility.md

Prompts are rendered exactly as the mini preset renders ALFWorld's (`build_messages` + `render_chat`, the full
preset's prompt memory) but without a token cap, so the numbers show what a cap would cut.
"""

import statistics
import sys
from collections import defaultdict

import numpy as np

from experiments.bench_step import qwen3_tokenizer
from experiments.mini_repro import PRESETS
from gopd_jax import expert_corpus as ec
from gopd_jax.envs import list_tasks
from gopd_jax.envs.prompting import build_messages, fit_prompt
from gopd_jax.tokenizer import load_tokenizer, render_chat

MINI = PRESETS["full"]
# The mini preset's prompt memory, as the ALFWorld teacher and students see it.
PROMPT = dict(k_history=MINI.k_history, think=False, keep_first=MINI.keep_first_observation,
              earlier_actions=MINI.earlier_actions)
CAPS = (MINI.max_prompt_tokens, 4096)  # the mini preset's cap; a ~4x larger one
CAP_SAMPLE_EVERY = 10


def _q(values, q):
    return float(np.percentile(np.asarray(values, np.float64), q))


def gold_shown(tok, turn, max_tokens: int) -> bool:
    """Whether the gold action is still on the admissible-action list of the prompt capped at max_tokens."""
    ids = fit_prompt(lambda msgs: render_chat(tok, msgs, enable_thinking=False), turn.goal, list(turn.history),
                     turn.observation, turn.admissible_actions, "scienceworld", max_tokens, **PROMPT)
    listed = tok.decode(ids).split("Admissible actions:\n", 1)[-1].split("\n")
    return turn.action in listed


def main(corpus_dir, mini_tokenizer_dir, qwen_dir=None):
    records = ec.load_corpus(corpus_dir)
    all_turns = list(ec.iter_turns(records))
    tokenizers = {"mini BPE (ALFWorld-trained)": load_tokenizer(mini_tokenizer_dir),
                  "Qwen3": qwen3_tokenizer(qwen_dir)}
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task_type"]].append(r)
    turns = [len(r["turns"]) for r in records]
    actions = [len(t["admissible_actions"]) for r in records for t in r["turns"]]
    print(f"# ScienceWorld at mini scale: gold-path sample\n\n{len(records)} train games (seeded shuffle of all "
          f"{len(list_tasks('scienceworld', 'train'))} train variations), {len(by_task)} task types, "
          f"{sum(turns)} gold turns.\n")
    print(f"- gold path won: {sum(r['won'] for r in records)}/{len(records)}; mean final Score "
          f"{statistics.fmean(r['score'] for r in records):.1f}")
    print(f"- turns per game: mean {statistics.fmean(turns):.1f}, median {statistics.median(turns):.0f}, "
          f"p90 {_q(turns, 90):.0f}, max {max(turns)}")
    print(f"- admissible actions per turn: median {statistics.median(actions):.0f}, p90 {_q(actions, 90):.0f}, "
          f"max {max(actions)}")
    for name, tok in tokenizers.items():
        prompt_tokens, obs_tokens = [], []
        for turn in all_turns:
            msgs = build_messages(turn.goal, list(turn.history), turn.observation, turn.admissible_actions,
                                  "scienceworld", **PROMPT)
            prompt_tokens.append(len(render_chat(tok, msgs, enable_thinking=False)))
            obs_tokens.append(len(tok.encode(turn.observation)))
        print(f"- {name}: observation tokens median {statistics.median(obs_tokens):.0f}, p90 "
              f"{_q(obs_tokens, 90):.0f}; full prompt (admissible actions included) median "
              f"{statistics.median(prompt_tokens):.0f}, p90 {_q(prompt_tokens, 90):.0f}, max {max(prompt_tokens)}; "
              f"{100 * statistics.fmean(p > CAPS[0] for p in prompt_tokens):.0f}% of prompts over the mini preset's "
              f"{CAPS[0]}-token cap")
        sample = all_turns[::CAP_SAMPLE_EVERY]
        for cap in CAPS:
            shown = statistics.fmean(gold_shown(tok, t, cap) for t in sample)
            print(f"  - prompt capped at {cap} tokens (`fit_prompt`): the gold action is on the shown "
                  f"admissible-action list in {100 * shown:.0f}% of turns (every {CAP_SAMPLE_EVERY}th turn, "
                  f"n={len(sample)})")
    print("\n| task type | games | turns per game (mean) | admissible actions (median) | gold Score |\n"
          "|---|---|---|---|---|")
    for task, rs in sorted(by_task.items()):
        acts = [len(t["admissible_actions"]) for r in rs for t in r["turns"]]
        print(f"| {task} | {len(rs)} | {statistics.fmean(len(r['turns']) for r in rs):.1f} | "
              f"{statistics.median(acts):.0f} | {statistics.fmean(r['score'] for r in rs):.0f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
