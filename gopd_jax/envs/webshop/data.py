"""WebShop data: finding the upstream files, loading the catalogue into the engine's product records, and
building the goal list (synthetic or human instructions) with its splits.

Follows the original engine (`web_agent_site/engine/engine.py`, `goal.py` at princeton-nlp/WebShop 64fa2a5)
field by field. Two deliberate differences, both for reproducibility:

- A range price (`"$19.99$27.99"`) is charged at one draw of `uniform(low, high)`, as upstream, but the
  draw is seeded by the ASIN instead of coming from the unseeded global `random`.
- Each goal's price ceiling (the 2nd, 3rd or 4th multiple of 10 above the price, with probabilities
  1/6, 2/6, 3/6 as upstream) is seeded by the ASIN (synthetic goals: one ceiling per product, as upstream)
  or by (ASIN, record index) (human goals). So task k is the same task in every process and every run.

The goal order is upstream's: built in catalogue order, then `random.Random(233).shuffle` (upstream seeds
the global generator with 233 and shuffles; the order depends only on the list as built, not on prices).
verl-agent forks shuffle with their env seed (42 by default) instead, so their "goal k" differs.

Splits (one convention for both goal kinds): **test = goals 0-499, eval = 500-1499, train = 1500 onwards**.
Test = the first 500 goals is the test set of upstream's baselines and of verl-agent/GiGPO (the paper's
peers evaluate on these); eval 500-1499 is upstream's dev split, kept out of training so model selection
never touches test (verl-agent trains on everything from 500 on, ours from 1500 on).

Goal kinds: "synthetic" (default; the 1000-product catalogue with `items_ins_v2_1000.json`, about 6,910
goals, what verl-agent and AgentGym use) or "human" (`items_human_ins.json`; 12,087 instructions, but on
the 1000-product catalogue almost none of their target products exist, SPEC 3.3: use the full catalogue).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

GOAL_KINDS = ("synthetic", "human")
CATALOGUES = ("small", "full")
SPLITS = ("train", "eval", "test")
SPLIT_RANGES = {"test": (0, 500), "eval": (500, 1500), "train": (1500, None)}
GOAL_SHUFFLE_SEED = 233
PRICE_RANGE = [10.0 * i for i in range(1, 100)]
NO_CEILING = 1_000_000
DEFAULT_PRICE = 100.0

# file -> (what it holds, upstream size, Google Drive id from upstream setup.sh)
UPSTREAM_FILES = {
    "items_shuffle_1000.json": ("the 1000-product catalogue", "4.47 MB", "1EgHdxQ_YxqIQlvvq5iKlCrkEKR6-j0Ib"),
    "items_ins_v2_1000.json": ("attributes and synthetic instructions of those 1000 products", "147 KB",
                               "1IduG0xl544V_A_jv3tHXC0kyFi7PnyBu"),
    "items_human_ins.json": ("the 12,087 human instructions", "5.14 MB", "14Kb5SPBk_jfdLZ_CDBNitW98QLDlKR5O"),
    "items_shuffle.json": ("the full 1.18M-product catalogue", "about 5.2 GB", "1A2whVgOO0euk5O13n2iYDM0bQRkkRduB"),
    "items_ins_v2.json": ("attributes of the full catalogue", "size not documented",
                          "1s2j6NgHljiZzQNL3veZaAiyW_qDEgBNi"),
}
_CATALOGUE_FILES = {"small": ("items_shuffle_1000.json", "items_ins_v2_1000.json"),
                    "full": ("items_shuffle.json", "items_ins_v2.json")}
HUMAN_FILE = "items_human_ins.json"
_DROPPED_KEYS = ("product_information", "brand", "brand_url", "list_price", "availability_quantity",
                 "availability_status", "total_reviews", "total_answered_questions", "seller_id", "seller_name",
                 "fulfilled_by_amazon", "fast_track_message", "aplus_present", "small_description_old")


def required_files(catalogue: str = "small", goals: str = "synthetic") -> tuple[str, ...]:
    _check_choice("catalogue", catalogue, CATALOGUES)
    _check_choice("goals", goals, GOAL_KINDS)
    return _CATALOGUE_FILES[catalogue] + ((HUMAN_FILE,) if goals == "human" else ())


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown WebShop {what} {value!r}; choose one of {', '.join(choices)}")


def _missing_data_message(folder: Path | None, missing: tuple[str, ...]) -> str:
    where = f"{folder} lacks {', '.join(missing)}" if folder else "no WebShop data folder given"
    lines = [f"WebShop data not found: {where}.",
             "Set WEBSHOP_DATA (or pass data_dir / --data-dir) to a folder holding the upstream files:"]
    lines += [f"  {name}  ({what}, {size}; Google Drive id {drive})"
              for name, (what, size, drive) in UPSTREAM_FILES.items()]
    lines.append("They come from the WebShop repository's setup.sh (princeton-nlp/WebShop: `./setup.sh -d small` "
                 "downloads them into data/ with gdown, e.g. `gdown 1EgHdxQ_YxqIQlvvq5iKlCrkEKR6-j0Ib`). The 1000-"
                 "product set needs the first two; human goals need items_human_ins.json; the full catalogue "
                 "needs items_shuffle.json and items_ins_v2.json.")
    return "\n".join(lines)


def resolve_data_dir(data_dir: str | os.PathLike | None = None, catalogue: str = "small",
                     goals: str = "synthetic") -> Path:
    """The folder holding the upstream files: `data_dir`, else $WEBSHOP_DATA; every file the chosen
    catalogue and goal kind need must be there (the error lists all files, sizes and where to get them)."""
    needed = required_files(catalogue, goals)
    raw = data_dir if data_dir not in (None, "") else os.environ.get("WEBSHOP_DATA", "")
    if not raw:
        raise FileNotFoundError(_missing_data_message(None, needed))
    folder = Path(raw).expanduser().resolve()
    missing = tuple(name for name in needed if not (folder / name).is_file())
    if missing:
        raise FileNotFoundError(_missing_data_message(folder, missing))
    return folder


# --- products -----------------------------------------------------------------------------------------

def parse_pricing(pricing: str | None) -> tuple[list[float], str]:
    """Upstream's parse: '' -> [100.0], '$100.0'; '$1,299.99' -> [1299.99]; '$19.99$27.99' -> two values."""
    if not pricing:
        return [DEFAULT_PRICE], f"${DEFAULT_PRICE}"
    values = [float(re.sub(r"[^\d.]", "", piece)) for piece in pricing.split("$")[1:]]
    if len(values) == 1:
        return values, f"${values[0]}"
    return values[:2], f"${values[0]} to ${values[1]}"


def charged_price(asin: str, pricing: list[float]) -> float:
    """The price the shop charges: the single price, or one draw from a range seeded by the ASIN."""
    if len(pricing) == 1:
        return pricing[0]
    return random.Random(f"webshop-price:{asin}").uniform(pricing[0], pricing[1])


def build_product(raw: dict, ins_v2: dict) -> dict:
    """One catalogue record -> the engine's product record (SPEC 1.4)."""
    p = {k: v for k, v in raw.items() if k not in _DROPPED_KEYS}
    asin = p["asin"]
    p["Title"], p["Description"] = p["name"], p["full_description"]
    bullets = p.get("small_description", [])
    p["BulletPoints"] = [bullets] if isinstance(bullets, str) else bullets
    p["Reviews"], p["Rating"] = [], "N.A."
    p["pricing"], p["Price"] = parse_pricing(p.get("pricing"))
    options: dict[str, list[str]] = {}
    option_to_image: dict[str, Any] = {}
    for name, values in (p.get("customization_options") or {}).items():
        if values is None:
            continue
        group = options.setdefault(name.lower(), [])
        for value in values:
            text = value["value"].strip().replace("/", " | ").lower()
            group.append(text)
            option_to_image[text] = value.get("image")
    p["options"], p["option_to_image"] = options, option_to_image
    entry = ins_v2.get(asin, {})
    p["Attributes"] = entry["attributes"] if "attributes" in entry else ["DUMMY_ATTR"]
    p["instruction_text"] = entry.get("instruction")
    p["instruction_attributes"] = entry.get("instruction_attributes")
    p["MainImage"] = (p.get("images") or [None])[0]
    p["query"] = p["query"].lower().strip()
    return p


@dataclasses.dataclass
class Catalogue:
    products: list[dict]  # loaded products, in file order
    by_asin: dict[str, dict]
    prices: dict[str, float]  # the price charged per ASIN
    goals: list[dict]  # shuffled goal list; task k of every split is goals[k]
    goal_kind: str
    catalogue_path: Path


def load_products(catalogue_path: Path, ins_v2_path: Path, human_path: Path | None = None) -> list[dict]:
    with open(catalogue_path) as f:
        raw_products = json.load(f)
    with open(ins_v2_path) as f:
        ins_v2 = json.load(f)
    human = None
    if human_path is not None:
        with open(human_path) as f:
            human = json.load(f)
    products, seen = [], set()
    for raw in raw_products:
        asin = raw.get("asin")
        if asin is None or asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        product = build_product(raw, ins_v2)
        if human is not None and asin in human:
            product["instructions"] = human[asin]
        products.append(product)
    return products


def price_ceiling(price: float, rng: random.Random) -> tuple[float, str]:
    """Upstream's ceiling: two of the first four multiples of 10 above the price, keep the larger."""
    above = [p for p in PRICE_RANGE if p > price][:4]
    if len(above) < 2:
        return NO_CEILING, ""
    upper = max(rng.sample(above, 2))
    return upper, f", and price lower than {upper:.2f} dollars"


def synthetic_goals(products: list[dict], prices: dict[str, float]) -> list[dict]:
    goals = []
    for p in products:
        if p["instruction_text"] is None:
            continue
        upper, price_text = price_ceiling(prices[p["asin"]], random.Random(f"webshop-ceiling:{p['asin']}"))
        names = sorted(p["options"])
        for combo in itertools.product(*(p["options"][n] for n in names)):
            goal_options = dict(zip(names, combo))
            option_text = ", and ".join(f"{k}: {v}" for k, v in goal_options.items())
            text = p["instruction_text"] + (f" with {option_text}" if option_text else "") + price_text
            goals.append({"asin": p["asin"], "category": p["category"], "query": p["query"], "name": p["name"],
                          "product_category": p["product_category"], "instruction_text": text,
                          "attributes": p["instruction_attributes"], "price_upper": upper,
                          "goal_options": goal_options})
    counts: dict[str, int] = defaultdict(int)
    for g in goals:
        for a in g["attributes"]:
            counts[a] += 1
    for g in goals:
        g["weight"] = sum(1.0 / counts[a] for a in g["attributes"]) / len(g["attributes"])
    return goals


def human_goals(products: list[dict], prices: dict[str, float]) -> list[dict]:
    goals = []
    for p in products:
        for i, record in enumerate(p.get("instructions", [])):
            if not record["instruction_attributes"]:
                continue  # upstream skips (and counts) these
            upper, price_text = price_ceiling(prices[p["asin"]], random.Random(f"webshop-ceiling:{p['asin']}:{i}"))
            goals.append({"asin": p["asin"], "category": p["category"], "query": p["query"], "name": p["name"],
                          "product_category": p["product_category"],
                          "instruction_text": record["instruction"].strip(".") + price_text,
                          "attributes": record["instruction_attributes"], "price_upper": upper,
                          "goal_options": record["instruction_options"], "weight": 1})
    return goals


@functools.lru_cache(maxsize=4)
def load_catalogue(folder: Path, catalogue: str = "small", goals: str = "synthetic") -> Catalogue:
    """Products, prices and the shuffled goal list; cached per process (workers load once)."""
    names = required_files(catalogue, goals)
    paths = [folder / n for n in names]
    products = load_products(paths[0], paths[1], paths[2] if goals == "human" else None)
    prices = {p["asin"]: charged_price(p["asin"], p["pricing"]) for p in products}
    goal_list = (synthetic_goals if goals == "synthetic" else human_goals)(products, prices)
    random.Random(GOAL_SHUFFLE_SEED).shuffle(goal_list)
    return Catalogue(products, {p["asin"]: p for p in products}, prices, goal_list, goals, paths[0])


def split_indices(split: str, num_goals: int) -> range:
    _check_choice("split", split, SPLITS)
    lo, hi = SPLIT_RANGES[split]
    return range(min(lo, num_goals), num_goals if hi is None else min(hi, num_goals))

