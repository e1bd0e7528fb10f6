"""Prompt format and action parsing (pure functions)."""
import pytest

from gopd_jax.envs import StepResult
from gopd_jax.envs.prompting import (INVALID_ACTION_FEEDBACK, MAX_TURNS, build_messages, fit_prompt,
                                     invalid_step_result, is_admissible, parse_action)


@pytest.mark.parametrize("reply, expected", [
    ("<think>go</think><action>go to desk 1</action>", "go to desk 1"),
    ("<action>  go   to\n desk 1 \n</action>", "go to desk 1"),
    ("<action>look</action> then <action>go to desk 2</action>", "go to desk 2"),
    ("<think>maybe <action>look</action></think><action>inventory</action>", "inventory"),
    ("<action>a <action>go to bed 1</action>", "go to bed 1"),
    ("<action>look</action><action>go to desk 2", "look"),
    ("go to desk 1", None),
    ("<think>no action</think>", None),
    ("<action>go to desk 1", None),
    ("<action>   </action>", None),
    ("<ACTION>look</ACTION>", None),
    ("", None),
])
def test_parse_action(reply, expected):
    assert parse_action(reply) == expected


def _messages(history, k=2, think=True):
    return build_messages("put a mug in the sink", history, "You see a sink 1.", ("go to sink 1", "look"),
                          "alfworld", k_history=k, think=think)


def test_messages_show_only_last_k_pairs():
    history = [(f"obs {i}", f"act {i}") for i in range(5)]
    system, user = _messages(history)
    assert system["role"] == "system" and user["role"] == "user"
    assert "<action>" in system["content"] and "<think>" in system["content"]
    text = user["content"]
    for i in range(3):
        assert f"obs {i}" not in text and f"act {i}" not in text
    assert "Step 4\nObservation: obs 3\nAction: act 3" in text
    assert "Step 5\nObservation: obs 4\nAction: act 4" in text
    assert text.index("act 4") < text.index("You see a sink 1.") < text.index("go to sink 1")
    assert "put a mug in the sink" in text and "5 steps so far" in text


def test_messages_first_turn_no_think_and_determinism():
    system, user = _messages([], think=False)
    assert "steps so far" not in user["content"] and "Step " not in user["content"]
    assert "<think>" not in system["content"] + user["content"]
    assert _messages([("a", "b")]) == _messages([("a", "b")])
    assert "Step" not in _messages([("a", "b")], k=0)[1]["content"]


def test_kept_first_observation_shows_once_it_leaves_the_last_k_and_is_cut_after_the_history():
    history = [("You see a cabinet 2, a cabinet 1 and a sink 1.", "go to cabinet 2")] + \
        [(f"obs {i}", f"act {i}") for i in range(1, 5)]
    def text(hist, k=2, keep=True):
        return build_messages("put a mug in the sink", hist, "now", ("look",), "alfworld", k_history=k,
                              keep_first=keep)[1]["content"]
    first = "First observation (step 1):\nYou see a cabinet 2, a cabinet 1 and a sink 1."
    assert first in text(history) and text(history).index(first) < text(history).index("Step 4")
    assert first not in text(history, keep=False)
    assert "First observation" not in text(history[:2])  # step 1 is still among the last 2: shown once
    assert first in text(history, k=0)
    with_first = _chars(build_messages("g", history, "now", ("look",), "alfworld", k_history=0, keep_first=True))
    without = _chars(build_messages("g", history, "now", ("look",), "alfworld", k_history=0))
    assert fit_prompt(_chars, "g", history, "now", ("look",), "alfworld", len(with_first), k_history=2,
                      keep_first=True) == with_first  # the history goes first
    assert fit_prompt(_chars, "g", history, "now", ("look",), "alfworld", len(with_first) - 1, k_history=2,
                      keep_first=True) == without  # then the first observation


def test_earlier_actions_list_the_steps_older_than_the_last_k():
    history = [("room", "look")] + [(f"obs {i}", f"act {i}") for i in range(1, 5)]
    text = build_messages("g", history, "now", ("look",), "alfworld", k_history=2,
                          earlier_actions=True)[1]["content"]
    assert "Earlier actions (steps 1-3):\nlook\nact 1\nact 2\n" in text and "obs 2" not in text and "room" not in text
    assert text.index("Earlier actions") < text.index("Step 4\nObservation: obs 3\nAction: act 3")
    assert "Earlier actions" not in build_messages("g", history[:2], "now", ("look",), "alfworld", k_history=2,
                                                   earlier_actions=True)[1]["content"]
    full = _chars(build_messages("g", history, "now", ("look",), "alfworld", k_history=0, earlier_actions=True))
    bare = _chars(build_messages("g", history, "now", ("look",), "alfworld", k_history=0))
    assert fit_prompt(_chars, "g", history, "now", ("look",), "alfworld", len(full), earlier_actions=True) == full
    assert fit_prompt(_chars, "g", history, "now", ("look",), "alfworld", len(full) - 1, earlier_actions=True) == bare


def test_unknown_env_prompt():
    with pytest.raises(ValueError, match="alfworld"):
        build_messages("g", [], "o", (), "nethack")


def test_invalid_step_result_keeps_env_state():
    prev = StepResult("You see a sink 1.", 0.0, 25.0, False, False, ("look",), {})
    result = invalid_step_result(prev, "scienceworld")
    assert result.observation == INVALID_ACTION_FEEDBACK["scienceworld"]
    assert result.info == {"invalid_action": True} and not result.done
    assert result.score == 25.0 and result.admissible_actions == ("look",) and result.reward == 0.0
    assert MAX_TURNS == {"alfworld": 30, "scienceworld": 30, "webshop": 15}


def _chars(messages):  # a character-level stand-in for the chat template: one "token" per character
    return [ord(ch) for m in messages for ch in m["content"]]


def test_fit_prompt_drops_history_then_actions_and_keeps_system_and_task():
    history = [(f"obs {i}", f"act {i}") for i in range(4)]
    actions = [f"examine object number {i}" for i in range(200)]
    full = _chars(build_messages("boil water", history, "You are in the kitchen.", actions, "scienceworld"))
    no_history = _chars(build_messages("boil water", history, "You are in the kitchen.", actions, "scienceworld",
                                       k_history=0))
    assert fit_prompt(_chars, "boil water", history, "You are in the kitchen.", actions, "scienceworld",
                      len(full)) == full
    assert fit_prompt(_chars, "boil water", history, "You are in the kitchen.", actions, "scienceworld",
                      len(no_history)) == no_history

    budget = len(no_history) // 3
    ids = fit_prompt(_chars, "boil water", history, "You are in the kitchen.", actions, "scienceworld", budget)
    text = "".join(map(chr, ids))
    assert len(ids) <= budget and text.startswith("You are an agent in ScienceWorld")
    assert "Task: boil water" in text and "You are in the kitchen." in text and "act 3" not in text
    shown = sum(f"examine object number {i}\n" in text for i in range(200))
    assert 0 < shown < 200 and f"(... {200 - shown} more admissible actions not shown)" in text
    # The longest action list that fits: one more action would not.
    one_more = _chars(build_messages("boil water", history, "You are in the kitchen.",
                                     actions[:shown + 1] + [f"(... {199 - shown} more admissible actions not shown)"],
                                     "scienceworld", k_history=0))
    assert len(one_more) > budget


def test_fit_prompt_cuts_the_start_only_when_nothing_else_fits():
    ids = fit_prompt(_chars, "g", [], "x" * 500, ["look"], "alfworld", 100)
    assert len(ids) == 100 and "".join(map(chr, ids)).endswith("Reply with <think>...</think><action>...</action>.")


def test_admissible_templates():
    offered = ["search[<your query>]", "click[back to search]"]
    assert is_admissible("click[back to search]", offered) and is_admissible("search[red shoes]", offered)
    assert not is_admissible("search[]", offered) and not is_admissible("click[buy now]", offered)
    assert not is_admissible("search[x]", ["click[buy now]"]) and is_admissible("look", ["look"])
