"""WebShop's purchase reward, as the original computes it (`web_agent_site/engine/goal.py`, SPEC section 8):

    R = r_type * (N_att + N_opt + r_price) / (|goal attributes| + |goal options| + 1)

Fuzzy matching is `thefuzz.fuzz.token_set_ratio` from thefuzz 0.19.0, upstream's pin, on its pure-Python
difflib backend (upstream installs no python-Levenshtein). thefuzz >= 0.20 and rapidfuzz compute an Indel
similarity instead of difflib's matching-blocks ratio, and rapidfuzz does not round to an integer, so
scores near the 85 threshold can differ. Measured on the real attribute strings (598 distinct ones in
items_ins_v2_1000.json, 101,586 pairs, 258 of them scoring 75-95): rapidfuzz with thefuzz's processing decides
every pair the same way as thefuzz 0.19/difflib. We refuse to run on thefuzz's python-Levenshtein backend rather
than silently change scores.

The type reward compares the nouns of the two product names. Upstream tags them with spaCy
(`en_core_web_sm` in goal.py; `en_core_web_lg` in its setup.sh and in AgentGym; spaCy 3.3.0). The official
model wheels are not on PyPI, so:

- if the spaCy model named by $WEBSHOP_SPACY_MODEL (default `en_core_web_sm`) is importable, its NOUN/PROPN
  tokens are used, as upstream (install it with `python -m spacy download en_core_web_sm`);
- otherwise a **fallback** takes every lowercase word token (spaCy-like split: letters and digits, broken at
  spaces, punctuation and hyphens) that is not a closed-class English word (articles, pronouns,
  prepositions, conjunctions, auxiliaries, a few adverbs) and not a pure number. It differs from spaCy in
  that adjectives, verbs and unit-bearing tokens ("64gb") count as nouns, so noun lists are longer and
  title scores usually differ. r_type agrees at the extremes (the same product -> 1.0; names sharing no
  content word -> 0); in between (the 0.1 / 0.2 thresholds) it can differ, how often is not measured.
  `reward_info["noun_tagger"]` says which one ran.
  Neither reproduces the 2022 logs' title scores exactly. A log's title_score is (shared nouns) / (goal noun
  count), so the goal's noun count must make it a whole number of shared nouns: measured on the 9 logs, the
  fallback's counts pass on 4 of 9 goal names, `en_core_web_sm` 3.8.0 (a PyPI re-upload) on 2 of 9.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
import warnings
from typing import Any


with warnings.catch_warnings():  # thefuzz 0.19 warns that it uses difflib: that is what we want
    warnings.simplefilter("ignore")
    from thefuzz import fuzz

MATCH_THRESHOLD = 85  # a fuzzy score must be strictly greater
NO_NOUN_TITLE_SCORE = 0.2

# normalize.py's COLOR_SET, in its order: the first entry that is a substring wins.
COLOR_SET = (
    "alabaster", "apricot", "aqua", "ash", "asphalt", "azure", "banana", "beige", "black", "blue", "blush",
    "bordeaux", "bronze", "brown", "burgundy", "camel", "camo", "caramel", "champagne", "charcoal", "cheetah",
    "chestnut", "chocolate", "christmas", "coffee", "cognac", "copper", "coral", "cranberry", "cream", "crystal",
    "dark", "denim", "eggplant", "elephant", "espresso", "fuchsia", "gold", "granite", "grape", "graphite",
    "grass", "gray", "green", "grey", "heather", "indigo", "ivory", "ivy", "khaki", "lavender", "lemon",
    "leopard", "light", "lilac", "lime", "magenta", "maroon", "mauve", "merlot", "midnight", "mint", "mocha",
    "multicolor", "mushroom", "mustard", "natural", "navy", "nude", "olive", "orange", "peach", "pewter", "pink",
    "plum", "purple", "rainbow", "red", "rose", "royal", "rust", "sand", "sapphire", "seashell", "silver",
    "skull", "slate", "steel", "stone", "stonewash", "sunflower", "tan", "taupe", "teal", "tiger", "turquoise",
    "violet", "walnut", "wheat", "white", "wine", "yellow")

if fuzz.SequenceMatcher is not difflib.SequenceMatcher:  # python-Levenshtein is installed
    raise ImportError("gopd_jax's WebShop reward needs thefuzz's difflib backend (upstream's scores); "
                      "uninstall python-Levenshtein from this environment")


def fuzzy_score(a: Any, b: Any) -> int:
    """token_set_ratio as upstream calls it (a tuple is scored as its str(), as thefuzz does)."""
    return fuzz.token_set_ratio(a, b)


def normalize_color(value: Any) -> Any:
    """The first colour word contained in `value` (substring test on str, element test on a tuple), else value."""
    for color in COLOR_SET:
        if color in value:
            return color
    return value


# --- nouns of a product name ------------------------------------------------------------------------------

_CLOSED_CLASS = frozenset("""
a an the this that these those some any each every no all both either neither such
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
who whom whose which what where when why how
and or but nor so yet if than as because while although though
of in on at by for with without within from to into onto upon over under above below between among
through during before after about against along around across behind beside besides beyond near off
out up down per via plus minus inside outside toward towards till until
is are was were be been being am do does did done have has had having can could will would shall should
may might must
not very too also just only more most less least much many few lot lots well even still
""".split())
_WORD_RE = re.compile(r"[a-z0-9]+")


def fallback_nouns(name: str) -> list[str]:
    """The fallback noun extractor (see the module docstring): open-class, non-numeric word tokens."""
    return [t for t in _WORD_RE.findall(name.lower()) if t not in _CLOSED_CLASS and not t.isdigit()]


@functools.lru_cache(maxsize=1)
def _spacy_model():
    name = os.environ.get("WEBSHOP_SPACY_MODEL", "en_core_web_sm")
    if importlib.util.find_spec(name) is None:  # checked first: importing spaCy itself takes seconds
        return None, "fallback"
    import spacy
    nlp = spacy.load(name)
    return nlp, f"spacy:{name}-{nlp.meta.get('version', '?')}"


def noun_tagger() -> str:
    """Which noun extractor the type reward uses: 'spacy:<model>-<version>' or 'fallback'."""
    return _spacy_model()[1]


def title_nouns(name: str) -> list[str]:
    nlp, _ = _spacy_model()
    if nlp is None:
        return fallback_nouns(name)
    return [t.text.lower() for t in nlp(name) if t.pos_ in ("PNOUN", "NOUN", "PROPN")]


# --- the reward terms ------------------------------------------------------------------------------------

def category_match(purchased_category: str, goal_category: str) -> bool:
    parts_p = {x.strip() for x in purchased_category.split("›")}
    parts_g = {x.strip() for x in goal_category.split("›")}
    return len(parts_p & parts_g) >= 2


def title_score(purchased_name: str, goal_name: str, nouns=title_nouns) -> float:
    goal_nouns = nouns(goal_name)
    if not goal_nouns:
        return NO_NOUN_TITLE_SCORE
    return len(set(nouns(purchased_name)) & set(goal_nouns)) / len(goal_nouns)


def type_reward(purchased: dict, goal: dict, nouns=title_nouns) -> dict[str, Any]:
    query_match = purchased["query"] == goal["query"]
    cat_match = category_match(purchased["product_category"], goal["product_category"])
    score = title_score(purchased["name"], goal["name"], nouns)
    r_type = 1.0
    if not (query_match or cat_match or score > 0.2):
        r_type = 0.5
    if score < 0.1:
        r_type = 0.1
    if score == 0.0:
        r_type = 0.0
    return {"r_type": r_type, "query_match": query_match, "category_match": cat_match, "title_score": score}


def attribute_matches(purchased: dict, goal_attributes: list[str]) -> int:
    """Goal attributes matched by a product attribute (fuzzy) or found in title, bullet points or description."""
    title = purchased["Title"].lower()
    bullets = " ".join(purchased["BulletPoints"]).lower()  # a str here is spaced out char by char, as upstream
    description = purchased["Description"].lower()
    n = 0
    for g in goal_attributes:
        if any(fuzzy_score(a, g) > MATCH_THRESHOLD for a in purchased["Attributes"]):
            n += 1
        elif g in title or g in bullets or g in description:
            n += 1
    return n


def option_matches(purchased_options: list[str], goal_options: list[Any]) -> int:
    """Goal options (str, or (name, value) tuples for synthetic goals) matched by a chosen option."""
    purchased = [normalize_color(o) for o in purchased_options]
    goal = [normalize_color(o) for o in goal_options]
    return sum(any(fuzzy_score(p, g) > MATCH_THRESHOLD for p in purchased) for g in goal)


def get_reward(purchased: dict, goal: dict, price: float, options: dict[str, str],
               nouns=title_nouns) -> tuple[float, dict[str, Any]]:
    """(reward, breakdown) for buying `purchased` at `price` with the chosen `options` {group: value}.
    The breakdown has upstream's verbose keys plus `noun_tagger`."""
    goal_options = goal["goal_options"]
    goal_options = list(goal_options.items()) if isinstance(goal_options, dict) else list(goal_options)
    n_att, n_opt = len(goal["attributes"]), len(goal_options)
    if n_att == 0:
        raise ValueError("a WebShop goal needs at least one attribute (upstream skips instructions without any)")
    denom = n_att + n_opt + 1
    types = type_reward(purchased, goal, nouns)
    att_hits = attribute_matches(purchased, goal["attributes"])
    opt_hits = option_matches(list(options.values()), goal_options)
    r_price = price <= goal["price_upper"]
    reward = combine(types["r_type"], att_hits, n_att, opt_hits, n_opt, r_price)
    info: dict[str, Any] = {"r_type": types["r_type"], "r_att": att_hits / n_att, "w_att": n_att / denom,
                            "query_match": types["query_match"], "category_match": types["category_match"],
                            "title_score": types["title_score"]}
    if n_opt:
        info["r_option"], info["w_option"] = opt_hits / n_opt, n_opt / denom
    info["r_price"], info["w_price"] = r_price, 1 / denom
    info["noun_tagger"] = "custom" if nouns is not title_nouns else noun_tagger()
    return reward, info


def combine(r_type: float, n_att_hit: int, n_att: int, n_opt_hit: int, n_opt: int, r_price: bool) -> float:
    """The reward from its counted parts, in upstream's order of float operations."""
    reward = (n_att_hit + n_opt_hit + r_price) / (n_att + n_opt + 1)
    reward *= r_type
    return reward
