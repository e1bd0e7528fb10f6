"""The WebShop text environment behind gopd_jax's TextEnv protocol, and its oracle expert.

Session state and transitions follow upstream `web_agent_site/envs/web_agent_text_env.py` (SPEC 4, 6):
`search[words]` is accepted on every page (upstream does; admissible actions offer it only on the search
page, as verl-agent does); `click[x]` needs x to be a clickable of the current page; anything else changes
nothing and returns the same page (flagged `info["rejected_action"]`). `click[buy now]` ends the episode
with the reward, its breakdown in `info["reward_info"]`; Score = 100 x reward, won = (reward == 1.0).
The turn limit (15) is the rollout's, as in verl-agent.

A task id is `<catalogue file>#<goal kind>:<goal index>`: it names the data, so workers need no data_dir.
The task type is the goal product's shop `category` (beauty, electronics, fashion, garden, grocery), the
only coarse product field upstream carries into a goal.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from gopd_jax.envs.base import StepResult, TaskSpec
from gopd_jax.envs.webshop import pages
from gopd_jax.envs.webshop.data import (CATALOGUES, GOAL_KINDS, Catalogue, load_catalogue, required_files,
                                        resolve_data_dir, split_indices)
from gopd_jax.envs.webshop.reward import fuzzy_score, get_reward, normalize_color
from gopd_jax.envs.webshop.search import ProductSearch

ENV_NAME = "webshop"
_ACTION_RE = re.compile(r"(.+)\[(.+)\]")


def task_id(catalogue_path: Path, goal_kind: str, index: int) -> str:
    return f"{catalogue_path}#{goal_kind}:{index}"


def parse_task_id(tid: str) -> tuple[Path, str, str, int]:
    """-> (data folder, catalogue size, goal kind, goal index)."""
    path, _, rest = tid.rpartition("#")
    kind, _, index = rest.partition(":")
    path = Path(path)
    catalogue = next((c for c in CATALOGUES if path.name == required_files(c)[0]), None)
    if not path.name or catalogue is None or kind not in GOAL_KINDS or not index.isdigit():
        raise ValueError(f"not a WebShop task id: {tid!r} (expected '<folder>/items_shuffle_1000.json#synthetic:7')")
    return path.parent, catalogue, kind, int(index)


def _setting(value: str | None, env_var: str, default: str) -> str:
    return value or os.environ.get(env_var) or default


def list_webshop_tasks(split: str, data_dir: str | None = None, goals: str | None = None,
                       catalogue: str | None = None) -> list[TaskSpec]:
    """The goals of `split` (test = 0-499, eval = 500-1499, train = 1500-, see data.py) in goal order.
    `goals` ("synthetic"/"human") and `catalogue` ("small"/"full") default to $WEBSHOP_GOALS / $WEBSHOP_CATALOGUE,
    else synthetic goals on the 1000-product catalogue (verl-agent's default)."""
    goals = _setting(goals, "WEBSHOP_GOALS", "synthetic")
    catalogue = _setting(catalogue, "WEBSHOP_CATALOGUE", "small")
    cat = load_catalogue(resolve_data_dir(data_dir, catalogue, goals), catalogue, goals)
    return [TaskSpec(ENV_NAME, split, task_id(cat.catalogue_path, goals, i), cat.goals[i]["category"])
            for i in split_indices(split, len(cat.goals))]


class WebShopEnv:
    """One shopping session at a time. Catalogue, goals and search index load on the first reset of a
    catalogue (cached per process); `index_cache_dir` overrides where the BM25 index is kept."""

    def __init__(self, index_cache_dir: str | None = None):
        self._index_cache_dir = index_cache_dir
        self._searches: dict[Path, ProductSearch] = {}
        self.catalogue: Catalogue | None = None
        self.search_engine: ProductSearch | None = None
        self.goal: dict | None = None
        self.done = True  # no episode until reset

    # --- protocol ------------------------------------------------------------------------------------

    def reset(self, task: TaskSpec) -> tuple[str, StepResult]:
        folder, catalogue, kind, index = parse_task_id(task.task_id)
        self.catalogue = load_catalogue(resolve_data_dir(folder, catalogue, kind), catalogue, kind)
        if not 0 <= index < len(self.catalogue.goals):
            raise ValueError(f"goal index {index} out of range: this catalogue has {len(self.catalogue.goals)} goals")
        path = self.catalogue.catalogue_path
        if path not in self._searches:
            self._searches[path] = ProductSearch(self.catalogue.products, self._index_cache_dir)
        self.search_engine = self._searches[path]
        self.goal = self.catalogue.goals[index]
        self._new_session()
        return self.goal["instruction_text"], self._result()

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError("no WebShop episode is running (none started, or it ended with buy now): call reset")
        match = _ACTION_RE.match(action.strip())
        name, arg = (match.group(1), match.group(2).lower()) if match else ("", "")
        if name == "search" and arg:
            self._do_search(arg)
        elif name == "click" and arg in self.clickables and arg != "search":
            return self._click(arg)
        else:
            return self._result(rejected_action=True)
        return self._result()

    def expert_actions(self) -> list[str]:
        return oracle_actions(self.goal, self.catalogue, self.search_engine)

    def close(self) -> None:
        self._searches.clear()

    # --- session state -------------------------------------------------------------------------------

    def _new_session(self) -> None:
        self.page, self.keywords, self.hits, self.page_num = "search", "", [], 1
        self.asin, self.options, self.visited, self.done = None, {}, set(), False
        self.observation, self.clickables = pages.search_page(self.goal["instruction_text"])

    def _show(self, page: str) -> None:
        instruction, product = self.goal["instruction_text"], self.catalogue.by_asin.get(self.asin or "")
        self.page = page
        if page == "search":
            self.observation, self.clickables = pages.search_page(instruction)
        elif page == "results":
            self.observation, self.clickables = pages.results_page(instruction, self.hits, self.page_num,
                                                                   self.catalogue.by_asin)
        elif page == "item":
            self.observation, self.clickables = pages.item_page(instruction, product)
        else:
            self.observation, self.clickables = pages.sub_page(instruction, product, page)

    def _do_search(self, words: str) -> None:
        self.keywords = words
        self.hits = [a for a in self.search_engine.search(self.keywords) if a in self.catalogue.by_asin]
        self.page_num = 1
        self._to_results()

    def _to_results(self) -> None:
        self.asin, self.options = None, {}
        self._show("results")

    def _click(self, target: str) -> StepResult:
        if target == "back to search":
            self._new_session()
        elif target == "next >":
            self.page_num += 1
            self._to_results()
        elif target == "< prev":
            if self.page == "results":
                self.page_num -= 1
                self._to_results()
            elif self.page == "item":
                self._to_results()
            else:
                self._show("item")
        elif target in ("description", "features", "reviews"):
            self._show(target)
        elif target == "buy now":
            return self._buy()
        elif self.page == "results":  # a product link
            self.asin = target.upper()
            self.visited.add(self.asin)
            self._show("item")
        else:  # an option value on the item page
            self.options[pages.option_clickables(self.catalogue.by_asin[self.asin])[target]] = target
            self._show("item")
        return self._result()

    def _buy(self) -> StepResult:
        product = self.catalogue.by_asin[self.asin]
        reward, info = get_reward(product, self.goal, self.catalogue.prices[self.asin], self.options)
        self.done = True
        self.observation, self.clickables = pages.done_page(self.asin, self.options, reward)
        return StepResult(self.observation, reward, 100.0 * reward, True, reward == 1.0, (),
                          {"reward_info": info, "asin": self.asin, "options": dict(self.options)})

    def _result(self, **info) -> StepResult:
        return StepResult(self.observation, 0.0, 0.0, False, False, pages.admissible_actions(self.clickables),
                          dict(info))


# --- the oracle expert ---------------------------------------------------------------------------------

def expert_query_candidates(goal: dict, product: dict) -> list[str]:
    """What the oracle tries to search, in order: the goal's query (the product's scrape query, which a
    goal carries), the instruction without its price clause, the product title."""
    instruction = goal["instruction_text"].split(", and price lower than")[0]
    # Brackets would end the action's argument early: `search[...]` is parsed by a regex.
    return [" ".join(re.sub(r"[\[\]]", " ", q).lower().split())
            for q in (goal["query"], instruction, product["Title"])]


def choose_options(goal: dict, product: dict) -> list[str]:
    """The product's option values that satisfy the goal options, one per group where one does."""
    chosen: dict[str, str] = {}
    if isinstance(goal["goal_options"], dict):
        for group, value in goal["goal_options"].items():
            if value in product["options"].get(group, []):
                chosen[group] = value
        return list(chosen.values())
    for wanted in goal["goal_options"]:  # human goals: bare values, matched as the reward matches them
        best = [(fuzzy_score(normalize_color(v), normalize_color(wanted)), group, v)
                for group, values in product["options"].items() if group not in chosen for v in values]
        best = [b for b in best if b[0] > 85]
        if best:
            _, group, value = max(best, key=lambda b: b[0])
            chosen[group] = value
    return list(chosen.values())


def oracle_actions(goal: dict, catalogue: Catalogue, search: ProductSearch) -> list[str]:
    """Search a query that finds the goal's product, page to it, click the goal's options, buy. If no
    candidate query finds the product, the plan searches the first query and buys its top hit."""
    product = catalogue.by_asin[goal["asin"]]
    queries = expert_query_candidates(goal, product)
    for query in queries:
        hits = [a for a in search.search(query) if a in catalogue.by_asin]
        if goal["asin"] in hits:
            position = hits.index(goal["asin"])
            actions = [f"search[{query}]"] + ["click[next >]"] * (position // pages.PRODUCT_WINDOW)
            actions.append(f"click[{goal['asin'].lower()}]")
            actions += [f"click[{v}]" for v in choose_options(goal, product)]
            return actions + ["click[buy now]"]
    hits = search.search(queries[0])
    return [f"search[{queries[0]}]"] + ([f"click[{hits[0].lower()}]", "click[buy now]"] if hits else [])
