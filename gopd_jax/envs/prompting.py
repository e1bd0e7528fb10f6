"""Prompt format and action parsing shared by every environment.

Each turn is one self-contained prompt (system + user message): the task, optionally the episode's first
observation and the actions of the steps older than the last K, the last K (observation, action) pairs, the
current observation and the admissible actions. The model answers
`<think>...</think><action>...</action>`; only the action tag is required.
"""
from __future__ import annotations

import dataclasses
import re

from gopd_jax.envs.base import StepResult

MAX_TURNS = {"alfworld": 30, "scienceworld": 30, "webshop": 15}

# What each environment itself answers to an action it cannot execute; a reply without a valid
# action tag gets the same text, so the model sees one consistent signal.
INVALID_ACTION_FEEDBACK = {
    "alfworld": "Nothing happens.",
    "scienceworld": "No known action matches that input.",
    "webshop": "Invalid action.",
}

_ENV_DESCRIPTIONS = {
    "alfworld": "You are an agent in ALFWorld, a text-based simulation of a household. You move between "
                "receptacles and manipulate objects (take, move, open, clean, heat, cool, use) to complete "
                "a household task.",
    "scienceworld": "You are an agent in ScienceWorld, a text-based simulation of an elementary-school "
                    "science lab and its surroundings. You move between rooms and use objects, devices "
                    "and substances to complete a science task.",
    "webshop": "You are shopping in WebShop, a text-based online store. You search, open product pages, "
               "choose options and buy the product that best matches the instruction.",
}

# What the history shows for a turn whose reply carried no action.
INVALID_HISTORY_ACTION = "(invalid)"

_ACTION_RE = re.compile(r"<action>(.*?)</action>", re.DOTALL)


def system_prompt(env_name: str, think: bool = True) -> str:
    if env_name not in _ENV_DESCRIPTIONS:
        raise ValueError(f"no prompt for environment {env_name!r}; known: {', '.join(_ENV_DESCRIPTIONS)}")
    answer = ("First reason briefly inside <think>...</think>, then give exactly one action inside "
              "<action>...</action>." if think else "Give exactly one action inside <action>...</action>.")
    return (f"{_ENV_DESCRIPTIONS[env_name]}\n\nEach turn you see your task, your most recent steps, the current "
            f"observation and the list of admissible actions. {answer} The action must be copied exactly "
            "from the admissible actions; anything else is an invalid action and wastes a turn.")


def build_messages(goal: str, history: list[tuple[str, str]], observation: str,
                   admissible_actions: tuple[str, ...] | list[str], env_name: str,
                   k_history: int = 2, think: bool = True, keep_first: bool = False,
                   earlier_actions: bool = False) -> list[dict[str, str]]:
    """Chat messages for one turn. `history` holds every earlier (observation, action) pair of the
    episode, oldest first; only the last `k_history` are shown, numbered by their step in the episode.
    keep_first: the first observation stays shown once it leaves the last K (ALFWorld's lists the room's
    receptacles in the order a systematic search visits them; no later observation does).
    earlier_actions: the actions of the steps older than the last K, one per line (a cheap memory of where
    the agent has been)."""
    parts = [f"Task: {goal}"]
    recent = history[-k_history:] if k_history > 0 else []
    older = history[:len(history) - len(recent)]
    if keep_first and older:
        parts.append(f"First observation (step 1):\n{older[0][0]}")
    if earlier_actions and older:
        steps = "step 1" if len(older) == 1 else f"steps 1-{len(older)}"
        parts.append(f"Earlier actions ({steps}):\n" + "\n".join(act for _, act in older))
    if recent:
        first = len(history) - len(recent) + 1
        steps = "\n\n".join(f"Step {first + i}\nObservation: {obs}\nAction: {act}"
                            for i, (obs, act) in enumerate(recent))
        parts.append(f"You have taken {len(history)} steps so far. The most recent:\n\n{steps}")
    parts.append(f"Current observation (step {len(history) + 1}):\n{observation}")
    parts.append("Admissible actions:\n" + "\n".join(admissible_actions))
    parts.append("Reply with <think>...</think><action>...</action>." if think
                 else "Reply with <action>...</action>.")
    return [{"role": "system", "content": system_prompt(env_name, think)},
            {"role": "user", "content": "\n\n".join(parts)}]


def fit_prompt(render, goal: str, history: list[tuple[str, str]], observation: str,
               admissible_actions: tuple[str, ...] | list[str], env_name: str, max_tokens: int,
               k_history: int = 2, think: bool = True, keep_first: bool = False,
               earlier_actions: bool = False) -> list[int]:
    """Token ids of the longest prompt within `max_tokens`; `render(messages) -> ids` is the chat template.

    Cuts in order of what matters least: history pairs first, then the kept first observation and earlier
    actions, then the tail of the admissible-action list
    (replaced by a line saying how many are hidden), and only as a last resort the start of the token ids.
    The system prompt and the task survive whenever the observation alone fits (ScienceWorld lists 100-440
    admissible actions, which alone can exceed a small tokenizer's budget)."""
    def ids_for(k, older, n_actions):
        actions = list(admissible_actions[:n_actions])
        if n_actions < len(admissible_actions):
            actions.append(f"(... {len(admissible_actions) - n_actions} more admissible actions not shown)")
        return render(build_messages(goal, history, observation, actions, env_name, k_history=k, think=think,
                                     keep_first=keep_first and older, earlier_actions=earlier_actions and older))

    extra = keep_first or earlier_actions
    for k, older in [(k, True) for k in range(k_history, -1, -1)] + [(0, False)] * extra:
        ids = ids_for(k, older, len(admissible_actions))
        if len(ids) <= max_tokens:
            return ids
    lo, hi = 0, len(admissible_actions)  # most actions that fit: ids_for(0, False, lo) fits or lo == 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(ids_for(0, False, mid)) <= max_tokens else (lo, mid - 1)
    return ids_for(0, False, lo)[-max_tokens:]


def parse_action(reply_text: str) -> str | None:
    """The content of the last complete `<action>...</action>` tag, whitespace collapsed to single
    spaces (environments match commands exactly); None if there is none or it is empty."""
    matches = _ACTION_RE.findall(reply_text)
    if not matches:
        return None
    # A reply like "<action>a <action>b</action>" matches from the first opening tag: keep the last one.
    action = " ".join(matches[-1].rpartition("<action>")[2].split())
    return action or None


_TEMPLATE_RE = re.compile(r"^(\w+)\[<[^>]*>\]$")


def is_admissible(action: str, admissible: list[str]) -> bool:
    """Whether `action` is one of the offered actions. An offered template such as WebShop's
    `search[<your query>]` admits any `search[...]` with a non-empty argument."""
    if action in admissible:
        return True
    for offer in admissible:
        m = _TEMPLATE_RE.match(offer)
        if m and action.startswith(m.group(1) + "[") and action.endswith("]") and len(action) > len(m.group(1)) + 2:
            return True
    return False


def invalid_step_result(prev: StepResult, env_name: str) -> StepResult:
    """The turn's result when the reply had no parsable action: the env is not stepped, so its state,
    score and admissible actions stay as they were (and so does a state-dependent expert's next action);
    the model sees the env's own invalid feedback."""
    kept = {"expert_action": prev.info["expert_action"]} if "expert_action" in prev.info else {}
    return dataclasses.replace(prev, observation=INVALID_ACTION_FEEDBACK[env_name], reward=0.0,
                               done=False, won=False, info={"invalid_action": True, **kept})
