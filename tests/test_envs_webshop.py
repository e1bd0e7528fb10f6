"""WebShop: data loading, reward (against upstream's test vectors and 9 real MTurk logs), pages (against the
spec's verified renders), BM25 search, the session state machine, the oracle expert, and episodes through
the real rollout engine and the experiment runner.

The upstream sample data lives in the project's shared/data/webshop (SPEC.md, SOURCES.md); tests skip where
it is absent. End-to-end tests build a tiny catalogue from the 7 real sample records inside the test."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from gopd_jax.envs import EnvPool, list_tasks, make_env
from gopd_jax.envs.webshop import data, pages
from gopd_jax.envs.webshop.env import WebShopEnv, list_webshop_tasks, parse_task_id
from gopd_jax.envs.webshop.reward import (category_match, combine, fallback_nouns, fuzzy_score, get_reward,
                                          normalize_color, option_matches, type_reward)
from gopd_jax.envs.webshop.search import Analyzer, ProductSearch, document_text


def _shared_webshop() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared/data/webshop/SPEC.md").is_file():
            return parent / "shared/data/webshop"
    return None


SHARED = _shared_webshop()
needs_data = pytest.mark.skipif(SHARED is None, reason="shared/data/webshop (upstream WebShop samples) not found")
SAMPLE_ASINS = ["B06Y3VLDFB", "B08R3XSC65", "B09DG92LJL", "B07B6DVG41", "B087TR48KK", "B08ZRR3DZT", "B08T9KJJPZ"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A tiny shop folder: the 7 real sample records as the catalogue, the complete real items_ins_v2_1000."""
    if SHARED is None:
        pytest.skip("shared/data/webshop (upstream WebShop samples) not found")
    folder = tmp_path_factory.mktemp("webshop_data")
    shutil.copy(SHARED / "sample_items.json", folder / "items_shuffle_1000.json")
    shutil.copy(SHARED / "items_ins_v2_1000.json", folder / "items_ins_v2_1000.json")
    return folder


@pytest.fixture(scope="module")
def cat(shop):
    return data.load_catalogue(shop)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bm25"))


@pytest.fixture(scope="module")
def env(index_dir):
    env = make_env("webshop", index_cache_dir=index_dir)  # through the registry
    assert isinstance(env, WebShopEnv)
    return env


def _product(name="Red Wooden Console Table", query="console tables", category="a › b › c", attributes=(),
             bullets=(), description=""):
    return {"name": name, "Title": name, "query": query, "product_category": category,
            "Attributes": list(attributes), "BulletPoints": bullets if isinstance(bullets, str) else list(bullets),
            "Description": description}


def _goal(name="Red Wooden Console Table", query="console tables", category="a › b › c", attributes=(),
          options=(), price_upper=100.0):
    return {"name": name, "query": query, "product_category": category, "attributes": list(attributes),
            "goal_options": options if isinstance(options, dict) else list(options), "price_upper": price_upper}


# --- data ---------------------------------------------------------------------------------------------------

@needs_data
def test_products_are_derived_as_the_spec_verified(cat):
    expected = {  # SPEC 1.4, the verified table
        "B06Y3VLDFB": ("console tables", "$877.8", {}, ["console table", "solid wood"], 0),
        "B08R3XSC65": ("women's pumps", "$100.0", {}, [], 0),
        "B09DG92LJL": ("console tables", "$557.72", {}, ["console table", "metal legs", "sofa table"], 0),
        "B07B6DVG41": ("shampoo & conditioner", "$34.0", {}, 7, 1),
        "B087TR48KK": ("shave & hair removal", "$11.99", {}, ["hair trimmer", "non slip", "stainless steel"], 1),
        "B08ZRR3DZT": ("women's dresses", "$19.99 to $27.99", (5, 8), ["polyester spandex", "daily wear"], 40),
        "B08T9KJJPZ": ("eyes care", "$8.5", {}, ["dark circles"], 0),
    }
    assert [p["asin"] for p in cat.products] == SAMPLE_ASINS
    for asin, (query, price, options, attrs, n_goals) in expected.items():
        p = cat.by_asin[asin]
        assert (p["query"], p["Price"]) == (query, price)
        if isinstance(options, tuple):
            assert [len(v) for v in p["options"].values()] == list(options) and list(p["options"]) == ["size", "color"]
        else:
            assert p["options"] == options
        assert (len(p["Attributes"]) == attrs) if isinstance(attrs, int) else (p["Attributes"] == attrs)
        assert sum(g["asin"] == asin for g in cat.goals) == n_goals
        assert p["Reviews"] == [] and p["Rating"] == "N.A." and isinstance(p["BulletPoints"], list)
    assert cat.by_asin["B08ZRR3DZT"]["options"]["color"][1] == "light blue"
    assert data.parse_pricing("$1,299.99") == ([1299.99], "$1299.99")
    assert data.parse_pricing("") == ([100.0], "$100.0")


@needs_data
def test_prices_ceilings_and_goal_order_are_seeded(shop, cat):
    assert cat.prices["B06Y3VLDFB"] == 877.8
    assert 19.99 <= cat.prices["B08ZRR3DZT"] <= 27.99
    data.load_catalogue.cache_clear()
    again = data.load_catalogue(shop)  # a fresh load (another process) gives the same tasks
    assert again.prices == cat.prices and again.goals == cat.goals
    dresses = [g for g in cat.goals if g["asin"] == "B08ZRR3DZT"]
    assert len({g["price_upper"] for g in dresses}) == 1 and dresses[0]["price_upper"] in (30.0, 40.0, 50.0, 60.0)
    assert {tuple(g["goal_options"]) for g in dresses} == {("color", "size")}
    texts = {g["instruction_text"] for g in dresses}
    upper = dresses[0]["price_upper"]
    assert (f"Find me women's dresses with polyester spandex for daily wear with color: black, and size: x-small, "
            f"and price lower than {upper:.2f} dollars") in texts
    shampoo = next(g for g in cat.goals if g["asin"] == "B07B6DVG41")
    assert shampoo["goal_options"] == {} and " with " not in shampoo["instruction_text"].split("hair loss")[1]
    # Ceilings: 2nd-4th multiple of 10 above the price, larger of two draws (P = 1/6, 2/6, 3/6).
    import random
    draws = [data.price_ceiling(11.99, random.Random(i))[0] for i in range(3000)]
    freq = [draws.count(v) / len(draws) for v in (30.0, 40.0, 50.0)]
    assert np.allclose(freq, [1 / 6, 2 / 6, 3 / 6], atol=0.03) and set(draws) == {30.0, 40.0, 50.0}
    assert data.price_ceiling(985.0, random.Random(0)) == (data.NO_CEILING, "")


def test_splits_follow_the_stated_convention():
    assert data.split_indices("test", 6910) == range(0, 500)
    assert data.split_indices("eval", 6910) == range(500, 1500)
    assert data.split_indices("train", 6910) == range(1500, 6910)
    assert data.split_indices("train", 42) == range(42, 42) and data.split_indices("test", 42) == range(0, 42)


def test_missing_data_names_the_files_sizes_and_source(tmp_path, monkeypatch):
    monkeypatch.delenv("WEBSHOP_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=r"(?s)WEBSHOP_DATA.*items_shuffle_1000.json.*4.47 MB.*setup.sh"):
        list_tasks("webshop", "test")
    (tmp_path / "items_shuffle_1000.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match=r"lacks items_ins_v2_1000.json\."):
        list_tasks("webshop", "test", data_dir=str(tmp_path))
    monkeypatch.setenv("WEBSHOP_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere lacks items_shuffle_1000.json, items_ins_v2_1000.json"):
        list_tasks("webshop", "test")
    with pytest.raises(ValueError, match="unknown WebShop goals 'robot'"):
        data.required_files("small", "robot")


# --- reward ---------------------------------------------------------------------------------------------------

def test_fuzzy_matcher_and_colour_normalisation_match_upstream():
    # SPEC 8.4, verified with thefuzz 0.19.0
    assert fuzzy_score("medium", ("size", "medium")) == 100
    assert fuzzy_score("large", ("size", "x-large")) == 100
    assert fuzzy_score("x-large", ("size", "large")) == 83
    assert fuzzy_score("wood", "solid wood") == 100
    assert normalize_color("navy blue") == normalize_color("light blue") == "blue"
    assert (normalize_color("standard"), normalize_color("washable"), normalize_color("hundred")) == ("tan", "ash", "red")
    assert normalize_color(("color", "black")) == "black" and normalize_color(("size", "medium")) == ("size", "medium")


@pytest.mark.parametrize("purchased,expected", [
    ("b › c › a", True), ("d › e › f", False), ("a › d › b", True), ("a › a › b", True), ("a › a › d", False)])
def test_category_match_vectors(purchased, expected):
    assert category_match(purchased, "a › b › c") is expected


def test_type_reward_every_branch():
    nouns = fallback_nouns
    goal = _goal(name="red wooden console table lamp shelf desk chair sofa bench")  # 10 fallback nouns
    def r(name, query="x", category="q › r › s"):
        return type_reward(_product(name=name, query=query, category=category), goal, nouns)
    full = r("red wooden console table lamp shelf desk chair sofa bench", "console tables", "a › b › c")
    assert (full["r_type"], full["title_score"], full["query_match"], full["category_match"]) == (1.0, 1.0, True, True)
    assert r("console table lamp")["r_type"] == 1.0  # title score 0.3 > 0.2 alone suffices
    assert r("console table")["title_score"] == 0.2 and r("console table")["r_type"] == 0.5  # no match at all
    assert r("console table", query="console tables")["r_type"] == 1.0  # query match rescues 0.2
    assert r("console table", category="b › c › z")["r_type"] == 1.0  # category match rescues 0.2
    assert r("console table", category="b › z › y")["r_type"] == 0.5  # one shared part is not a match
    # Below 0.1 the title decides, whatever query and category say.
    few = type_reward(_product(name="console"), _goal(name=" ".join(f"w{i}x" for i in range(11)) + " console"), nouns)
    assert few["title_score"] == pytest.approx(1 / 12) and few["r_type"] == 0.1
    matched = type_reward(_product(name="console", query="q", category="a › b › c"),
                          _goal(name=" ".join(f"w{i}x" for i in range(11)) + " console", query="q"), nouns)
    assert matched["query_match"] and matched["category_match"] and matched["r_type"] == 0.1
    zero = type_reward(_product(name="eyebrow tweezers", query="q"), _goal(name="cabinet knob", query="q"), nouns)
    assert zero["title_score"] == 0.0 and zero["r_type"] == 0.0
    # A goal name without nouns scores 0.2: kept by a query match, else halved.
    assert type_reward(_product(), _goal(name="the of and"), nouns)["title_score"] == 0.2
    assert type_reward(_product(), _goal(name="the of and"), nouns)["r_type"] == 1.0
    assert type_reward(_product(query="z", category="x › y"), _goal(name="the of and"), nouns)["r_type"] == 0.5
    # The denominator counts the goal's nouns with duplicates.
    dup = type_reward(_product(name="table"), _goal(name="table table lamp"), nouns)
    assert dup["title_score"] == pytest.approx(1 / 3)


def test_fallback_nouns_drop_closed_class_words_and_numbers():
    assert fallback_nouns("A Set of 2 Red X-Large T-Shirts for Men, 64GB") == [
        "set", "red", "x", "large", "t", "shirts", "men", "64gb"]


def test_spacy_nouns_where_a_model_is_installed():
    """Upstream's tagger path; runs only where the spaCy model ($WEBSHOP_SPACY_MODEL, default en_core_web_sm)
    is installed (its official wheels are not on PyPI, so CI uses the fallback)."""
    from gopd_jax.envs.webshop.reward import noun_tagger, title_nouns

    if noun_tagger() == "fallback":
        pytest.skip("no spaCy English model installed (python -m spacy download en_core_web_sm)")
    nouns = title_nouns("Red Wooden Console Table for the Living Room")
    assert {"table", "room"} <= set(nouns) and "the" not in nouns and "for" not in nouns
    assert get_reward(_product(), _goal(attributes=["wood"]), 1.0, {})[1]["noun_tagger"].startswith("spacy:")


def test_attribute_option_and_full_reward_vectors():
    """SPEC 8.7, upstream test_goal.py's cases, as facts."""
    goal_attrs = ["tea tree", "essential oils", "natural ingredients"]
    def att(**kw):
        return get_reward(_product(**kw), _goal(attributes=goal_attrs), 1.0, {}, fallback_nouns)[1]["r_att"]
    assert att(attributes=["tea tree", "essential oil", "natural ingredients"]) == 1.0
    assert att(attributes=["essential oil", "natural ingredients"]) == pytest.approx(2 / 3)
    assert att(bullets=["with essential oils inside"], description="only natural ingredients") == pytest.approx(2 / 3)
    assert att(attributes=["metal legs"], bullets=["steel"]) == 0.0
    assert option_matches(["pack of 12", "grey", "XL"], ["grey", "XL", "pack of 12"]) == 3
    assert option_matches(["pack of 12", "blue", "XL"], ["grey", "XL", "pack of 12"]) == 2
    assert option_matches(["powder snow"], ["cool powder snow"]) == 1
    assert option_matches([], ["grey"]) == 0
    assert "r_option" not in get_reward(_product(), _goal(attributes=["wood"]), 1.0, {}, fallback_nouns)[1]
    with pytest.raises(ValueError, match="at least one attribute"):
        get_reward(_product(), _goal(), 1.0, {}, fallback_nouns)

    attrs = ["tea tree", "essential oils", "natural ingredients"]
    options = {"color": "grey", "size": "xl"}
    product = _product(bullets=["tea tree and essential oils"], description="natural ingredients")
    goal = _goal(attributes=attrs, options=options)
    reward, info = get_reward(product, goal, 10.0, dict(options), fallback_nouns)
    assert reward == 1.0 and info["r_type"] == 1.0
    product_str = _product(bullets="tea tree and essential oils", description="natural ingredients")
    assert get_reward(product_str, goal, 10.0, dict(options), fallback_nouns)[0] == pytest.approx(4 / 6)
    goal3 = _goal(attributes=attrs, options={**options, "pack": "pack of 3"})
    assert get_reward(product_str, goal3, 10.0, dict(options), fallback_nouns)[0] == pytest.approx(4 / 7)
    half = _goal(name=" ".join(f"w{i}x" for i in range(17)) + " red wooden console", query="z",
                 category="x › y", attributes=attrs, options={**options, "pack": "pack of 3"})
    reward, info = get_reward(product_str, half, 10.0, dict(options), fallback_nouns)
    assert info["title_score"] == pytest.approx(0.15) and info["r_type"] == 0.5
    assert reward == pytest.approx(0.5 * 4 / 7)  # ~0.286
    assert get_reward(product, goal, 100.01, dict(options), fallback_nouns)[1]["r_price"] is False


def _human_logs():
    if SHARED is None:
        return []
    return sorted((SHARED / "human_trajs").glob("*.jsonl"))


@needs_data
@pytest.mark.parametrize("log", _human_logs(), ids=lambda p: p.stem)
def test_human_session_breakdowns_are_reproduced(log):
    """Each real MTurk log's final line records the purchase and upstream's reward breakdown. What the log
    determines is recomputed: the option matches, the price term, which keys the breakdown has, and the total
    from its parts (exact float); the purchased product's record is not in the logs, except in _1_7 (the
    target itself), where the whole reward is recomputed from the goal's own product fields."""
    done = json.loads(log.read_text().splitlines()[-1])
    goal, bought, info = done["goal"], done["content"], done["reward_info"]
    n_att, n_opt = len(goal["attributes"]), len(goal["goal_options"])
    opt_hits = option_matches(list(bought["options"].values()), goal["goal_options"])
    assert ("r_option" in info) == (n_opt > 0)
    if n_opt:
        assert opt_hits / n_opt == info["r_option"]
    r_price = bought["price"] <= goal["price_upper"]
    assert r_price == info["r_price"]
    att_hits = round(info["r_att"] * n_att)
    assert att_hits / n_att == info["r_att"]
    assert combine(info["r_type"], att_hits, n_att, opt_hits, n_opt, r_price) == done["reward"]

    if bought["asin"] == goal["asin"]:  # _1_7: the target product, so its fields are the goal's
        product = _product(name=goal["name"], query=goal["query"], category=goal["product_category"])
        reward, ours = get_reward(product, goal, bought["price"], bought["options"], fallback_nouns)
        assert reward == done["reward"] == 1.0
        for key in ("r_type", "r_att", "query_match", "category_match", "r_price"):
            assert ours[key] == info[key], key
        assert set(info) <= set(ours)


def test_human_logs_cover_both_breakdown_shapes():
    logs = [json.loads(p.read_text().splitlines()[-1]) for p in _human_logs()]
    if not logs:
        pytest.skip("shared/data/webshop (upstream WebShop samples) not found")
    assert len(logs) == 9 and {("r_option" in d["reward_info"]) for d in logs} == {True, False}
    assert sorted(d["reward"] for d in logs) == pytest.approx([1 / 3, 0.5, 0.5, 0.5, 2 / 3, 2 / 3, 0.75, 1.0, 1.0])


# --- pages ---------------------------------------------------------------------------------------------------

@needs_data
def test_observations_match_the_spec_renders(cat):
    instr = "INSTR"
    assert pages.search_page(instr) == ("WebShop [SEP] Instruction: [SEP] INSTR [SEP] Search", ["search"])
    hits = (SAMPLE_ASINS * 8)[:50]
    obs, clickables = pages.results_page(instr, hits, 1, cat.by_asin)
    title2 = cat.by_asin["B08R3XSC65"]["Title"]
    assert title2.endswith(",Wine red,40")
    assert obs.startswith("Instruction: [SEP] INSTR [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] "
                          "Next > [SEP] B06Y3VLDFB [SEP] Vhomes Lights Reclaimed Wood Console Table The Genessis "
                          f"Collection Sofa-Tables [SEP] $877.8 [SEP] B08R3XSC65 [SEP] {title2} [SEP] $100.0 [SEP] ")
    assert clickables[:3] == ["back to search", "next >", "b06y3vldfb"] and len(clickables) == 12
    obs2, clickables2 = pages.results_page(instr, hits, 2, cat.by_asin)
    assert "[SEP] Page 2 (Total results: 50) [SEP] < Prev [SEP] Next > [SEP] " in obs2
    assert clickables2[:3] == ["back to search", "< prev", "next >"]
    assert pages.results_page(instr, hits, 6, cat.by_asin)[0].endswith("Page 6 (Total results: 50) [SEP] < Prev [SEP] Next >")

    dress = cat.by_asin["B08ZRR3DZT"]
    obs, clickables = pages.item_page(instr, dress)
    assert obs == ("Instruction: [SEP] INSTR [SEP] Back to Search [SEP] < Prev [SEP] size [SEP] x-small [SEP] small "
                   "[SEP] medium [SEP] large [SEP] x-large [SEP] color [SEP] black [SEP] light blue [SEP] pink [SEP] "
                   "plain black [SEP] red [SEP] white [SEP] chocolate brown [SEP] khaki [SEP] SheIn Women's Sexy One "
                   "Shoulder Sleeveless Cutout Mini Club Pencil Bodycon Dress [SEP] Price: $19.99 to $27.99 [SEP] "
                   "Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now")
    assert clickables[:6] == ["back to search", "< prev", "description", "features", "reviews", "buy now"]
    assert clickables[6:] == [*dress["options"]["size"], *dress["options"]["color"]]
    base = "Instruction: [SEP] INSTR [SEP] Back to Search [SEP] < Prev"
    assert pages.sub_page(instr, dress, "description")[0] == base  # empty description: nothing
    assert pages.sub_page(instr, dress, "reviews") == (base, ["back to search", "< prev"])
    features = pages.sub_page(instr, dress, "features")[0]
    assert features == base + "".join(" [SEP] " + b.strip() for b in dress["BulletPoints"])
    table = cat.by_asin["B06Y3VLDFB"]
    assert pages.sub_page(instr, table, "description")[0] == f"{base} [SEP] {table['Description'].strip()}"

    done = ("Thank you for shopping with us! [SEP] Your code: [SEP] None [SEP] (Paste it in your MTurk interface.) "
            "[SEP] Purchased [SEP] asin [SEP] B08ZRR3DZT [SEP] options [SEP] {\"size\": \"medium\"} [SEP] attrs [SEP] "
            "None [SEP] category [SEP] None [SEP] query [SEP] None [SEP] product category [SEP] None [SEP] Target "
            "[SEP] asin [SEP] options [SEP] attrs [SEP] price upper [SEP] instuction text [SEP] category [SEP] "
            "product category [SEP] query [SEP] Goal [SEP] None [SEP] Reward [SEP] Your score (min 0.0, max 1.0) "
            "[SEP] 0.75 [SEP] Reward Details [SEP] None")
    assert pages.done_page("B08ZRR3DZT", {"size": "medium"}, 0.75) == (done, [])
    assert pages.admissible_actions(["search"]) == ("search[<your query>]",)
    assert pages.admissible_actions(["back to search", "b06y3vldfb"]) == ("click[back to search]", "click[b06y3vldfb]")


def test_shared_option_value_maps_to_the_later_group():
    product = {"options": {"color": ["black", "one size"], "size": ["one size", "small"]}}
    assert pages.option_clickables(product) == {"black": "color", "one size": "size", "small": "size"}


# --- search ---------------------------------------------------------------------------------------------------

def test_analyzer_follows_lucene_english():
    assert Analyzer()("The Women's Dresses and 3.5 Inch Heels, for running!") == ["women", "dress", "3.5", "inch",
                                                                               "heel", "run"]


@needs_data
def test_bm25_ranks_like_lucene_and_caches_the_index(cat, tmp_path):
    search = ProductSearch(cat.products, tmp_path)
    assert search.build_seconds > 0
    # Independent reference: Lucene's BM25 (k1 0.9, b 0.4) over the same analyzed documents.
    analyzer = Analyzer()
    docs = [analyzer(document_text(p)) for p in cat.products]
    avgdl = sum(map(len, docs)) / len(docs)
    for query in ("console table", "women's dresses polyester", "hair trimmer stainless steel", "eye cream"):
        ref = np.zeros(len(docs))
        for term in analyzer(query):
            df = sum(term in d for d in docs)
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            for i, d in enumerate(docs):
                tf = d.count(term)
                ref[i] += idf * tf / (tf + 0.9 * (1 - 0.4 + 0.4 * len(d) / avgdl))
        got = search.scores(query)
        np.testing.assert_allclose(got / got.max(), ref / ref.max(), rtol=1e-4, atol=1e-6)
        expected = [cat.products[i]["asin"] for i in np.argsort(-ref, kind="stable") if ref[i] > 0]
        assert search.search(query) == expected
    assert set(search.search("console table")[:2]) == {"B06Y3VLDFB", "B09DG92LJL"}
    assert search.search("zzzz qqqq") == [] and search.search("the of") == []
    cached = ProductSearch(cat.products, tmp_path)
    assert cached.build_seconds == 0 and cached.search("women's dresses") == search.search("women's dresses")
    assert ProductSearch(cat.products[:3], tmp_path).index_dir != search.index_dir
    many = [dict(p, asin=f"X{i:09d}") for i, p in enumerate(cat.products * 10)]
    assert len(ProductSearch(many, tmp_path).search("console table")) == 20  # 20 docs match
    assert len(ProductSearch(many, tmp_path).search("the table with hair and dress")) == 50  # top 50 only


# --- the environment ------------------------------------------------------------------------------------------

@needs_data
def test_session_transitions(shop, env):
    tasks = list_tasks("webshop", "test", data_dir=str(shop))
    assert len(tasks) == 42 and {t.task_type for t in tasks} == {"fashion", "beauty"}
    assert parse_task_id(tasks[3].task_id)[1:] == ("small", "synthetic", 3)
    goal, first = env.reset(tasks[0])
    assert first.observation == f"WebShop [SEP] Instruction: [SEP] {goal} [SEP] Search"
    assert first.admissible_actions == ("search[<your query>]",)
    bad = env.step("click[buy now]")  # not clickable here: nothing changes
    assert bad.observation == first.observation and bad.info == {"rejected_action": True} and not bad.done
    assert env.step("jump").info == {"rejected_action": True}
    res = env.step("search[Women's Dresses]")
    assert "Page 1 (Total results: " in res.observation and "click[b08zrr3dzt]" in res.admissible_actions
    assert env.step("search[]").info == {"rejected_action": True}
    res = env.step("click[next >]")
    assert "Page 2" in res.observation and res.observation.endswith("< Prev [SEP] Next >")  # past the last hit
    res = env.step("click[< prev]")
    assert "Page 1" in res.observation
    res = env.step("click[b08zrr3dzt]")
    assert "Price: $19.99 to $27.99" in res.observation and "click[khaki]" in res.admissible_actions
    env.step("click[small]")
    env.step("click[medium]")  # same group: overwrites
    env.step("click[pink]")
    assert env.options == {"size": "medium", "color": "pink"}
    res = env.step("click[features]")
    assert res.admissible_actions == ("click[back to search]", "click[< prev]")
    res = env.step("click[< prev]")  # back to the item, options kept
    assert res.observation.startswith("Instruction:") and env.options == {"size": "medium", "color": "pink"}
    res = env.step("search[women's pumps]")  # upstream accepts a search on any page
    assert env.page == "results" and env.options == {} and env.asin is None
    env.step("click[b08r3xsc65]")
    env.step("click[< prev]")
    assert env.page == "results" and env.page_num == 1
    res = env.step("click[back to search]")
    assert res.observation == first.observation
    env.step("search[women's dresses]")
    env.step("click[b08zrr3dzt]")
    env.step("click[x-large]")
    res = env.step("click[Buy Now]")  # the argument is lowercased
    assert res.done and res.score == pytest.approx(100 * res.reward) and res.admissible_actions == ()
    assert res.info["asin"] == "B08ZRR3DZT" and res.info["options"] == {"size": "x-large"}
    info = res.info["reward_info"]
    assert info["r_type"] == 1.0 and info["r_att"] == 1.0 and info["r_option"] == 0.5 and info["r_price"] is True
    assert res.reward == pytest.approx(0.8) and not res.won  # (2 + 1 + 1) / 5
    assert res.observation.endswith(f"[SEP] {res.reward} [SEP] Reward Details [SEP] None")
    with pytest.raises(RuntimeError, match="no WebShop episode is running"):
        env.step("click[back to search]")


@needs_data
def test_oracle_wins_every_attainable_goal(shop, env):
    tasks = list_tasks("webshop", "test", data_dir=str(shop))
    for task in tasks:
        goal, _ = env.reset(task)
        actions = env.expert_actions()
        assert actions[0].startswith("search[") and actions[-1] == "click[buy now]"
        for action in actions:
            res = env.step(action)
        assert res.done and res.won and res.score == 100.0, (goal, actions, res.info)


@needs_data
def test_human_goals_and_their_oracle(shop, tmp_path, env):
    """Human-instruction goals (items_human_ins.json's schema; the real file's targets are not among the 7
    sample products, so the records are written here): empty-attribute records skipped, '.' stripped, options
    as bare values matched the reward's way."""
    folder = tmp_path / "human"
    shutil.copytree(shop, folder)
    def record(instruction, attrs, options):
        return {"asin": "B08ZRR3DZT", "instruction": instruction, "attributes": [], "options": [],
                "instruction_attributes": attrs, "instruction_options": options}
    human = {"B08ZRR3DZT": [record("i want a navy blue dress, size medium.", ["polyester spandex"],
                                   ["navy blue", "medium"]),
                            record("a dress", [], ["pink"])],
             "B0NOTINSHOP": [record("something else", ["x"], [])]}
    (folder / "items_human_ins.json").write_text(json.dumps(human))
    tasks = list_webshop_tasks("test", data_dir=str(folder), goals="human")
    assert len(tasks) == 1 and tasks[0].task_id.endswith("#human:0") and tasks[0].task_type == "fashion"
    goal, _ = env.reset(tasks[0])
    assert goal.startswith("i want a navy blue dress, size medium, and price lower than ")
    actions = env.expert_actions()
    assert actions[-3:] == ["click[light blue]", "click[medium]", "click[buy now]"]  # "blue" normalises both
    for action in actions:
        res = env.step(action)
    assert res.won and res.info["reward_info"]["r_option"] == 1.0


@needs_data
def test_expert_evaluation_through_the_worker_pool(shop, tmp_path, monkeypatch, capsys):
    from experiments.evaluate import main

    monkeypatch.setenv("GOPD_CACHE", str(tmp_path))
    main(["--env", "webshop", "--split", "test", "--policy", "expert", "--limit", "6", "--num-workers", "2",
          "--data-dir", str(shop)])
    out = capsys.readouterr().out
    assert "| **all** | 6 | 100.00 | 100.00 |" in out


# --- through the rollout engine and the runner ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from gopd_jax.envs.prompting import build_messages
    from gopd_jax.tokenizer import train_bpe_tokenizer

    text = [m["content"] for m in build_messages("Find me women's dresses", [], "WebShop [SEP] Search",
                                                 ["search[<your query>]", "click[buy now]"], "webshop")]
    text.append("<action>search[women's dresses]</action><action>click[b08zrr3dzt]</action>")
    return train_bpe_tokenizer(text * 10, 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def smoke_config(shop, tokenizer, tmp_path_factory):
    """One tiny random student and one config for both the rollout and the runner test (shared compiles)."""
    from experiments.mini_repro import _dense
    from tests.policies import random_checkpoint
    from gopd_jax.experiment import ExperimentConfig

    root = tmp_path_factory.mktemp("webshop_run")
    student = random_checkpoint(_dense(len(tokenizer), 32, 1), tokenizer, root / "student", seed=1)
    return ExperimentConfig(name="webshop_smoke", out_dir=str(root / "run"), env="webshop", train_split="test",
                            eval_split="test", data_dir=str(shop), method="sft", student=student, teacher=student,
                            steps=1, batch_tasks=2, max_turns=2, max_new_tokens=4, think=False, k_history=1,
                            learning_rate=1e-3, compute_dtype="float32", micro_batch_rows=2, num_workers=2,
                            eval_limit=2, eval_every=1, checkpoint_every=1, progress=False)


@needs_data
def test_episodes_through_the_rollout_engine(smoke_config, tokenizer, index_dir):
    import jax

    from gopd_jax.methods import owners_from_beta
    from gopd_jax.models import load_hf_checkpoint
    from gopd_jax.records import EXPERT, STUDENT, TEACHER, Policy
    from gopd_jax.rollout import RolloutConfig, RolloutRunner

    student = Policy(*load_hf_checkpoint(smoke_config.student, dtype=np.float32))
    tasks = list_tasks("webshop", "test", data_dir=smoke_config.data_dir)[:3]
    with EnvPool("webshop", {"index_cache_dir": index_dir}, num_workers=2) as pool:
        runner = RolloutRunner(pool, tokenizer, RolloutConfig.from_experiment(smoke_config, evaluation=True))
        episodes, stats = runner.run(tasks, {STUDENT: student, TEACHER: student}, owners_from_beta(0.0),
                                     jax.random.key(0), progress=False)
        assert sorted(e.task.task_id for e in episodes) == sorted(t.task_id for t in tasks)
        for ep in episodes:  # a random model: two turns, no purchase
            assert ep.result.rounds == 2 and not ep.result.won and not ep.result.env_failed
            prompt = tokenizer.decode([int(t) for t in ep.turns[0].prompt_ids])
            assert f"WebShop [SEP] Instruction: [SEP] {ep.goal} [SEP] Search" in prompt and ep.goal.startswith("Find me")
        expert_runner = RolloutRunner(pool, tokenizer, RolloutConfig(env="webshop", max_turns=15, max_new_tokens=8))
        experts, _ = expert_runner.run(tasks, {STUDENT: student, TEACHER: EXPERT}, owners_from_beta(1.0),
                                       jax.random.key(0), progress=False)
        # The oracle's replies, tokenized and parsed back by the rollout, buy the right product.
        for e in experts:  # search, product, (colour, size: the dresses), buy
            assert e.result.won and e.result.score == 100.0
            assert e.result.invalid_actions == 0 == e.result.inadmissible_actions  # search[...] fits its template
            assert e.result.rounds == (5 if e.task.task_type == "fashion" else 3)
        assert all(e.turns[0].action.startswith("search[") for e in experts)


@needs_data
def test_runner_trains_on_webshop(smoke_config, tmp_path, monkeypatch):
    from gopd_jax.runner import run_experiment

    monkeypatch.setenv("GOPD_CACHE", str(tmp_path / "cache"))
    final = run_experiment(smoke_config)
    train = [json.loads(line) for line in (Path(smoke_config.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train] == [0] and np.isfinite(train[0]["loss"])
    assert train[0]["n_teacher_tokens"] > 0 and train[0]["teacher_turn_frac"] == 1.0  # SFT: expert turns only
    assert final["n"] == 2 and set(final["by_task_type"]) <= {"fashion", "beauty"}
