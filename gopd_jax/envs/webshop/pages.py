"""The shop's pages as text observations and their clickables (SPEC sections 4-6).

Upstream renders HTML templates and converts them to text ("simple" text mode): every visible text node,
stripped, joined with " [SEP] ". Each function here returns the same segments directly, in page order,
with the clickables in upstream's order (`btn` elements in page order, then product links, then option
values). Observations match the renders SPEC 5.1 verified with the real templates.
"""
from __future__ import annotations

import json

SEP = " [SEP] "
PRODUCT_WINDOW = 10  # results per page
# The done page's hidden MTurk block: printed with unset variables (sic "instuction", as upstream).
_DONE_TARGET = ("Target", "asin", "options", "attrs", "price upper", "instuction text", "category",
                "product category", "query", "Goal", "None")


def _page(segments: list[str], clickables: list[str]) -> tuple[str, list[str]]:
    return SEP.join(segments), clickables


def search_page(instruction: str) -> tuple[str, list[str]]:
    return _page(["WebShop", "Instruction:", instruction, "Search"], ["search"])


def results_page(instruction: str, hits: list[str], page: int, products: dict[str, dict]) -> tuple[str, list[str]]:
    """Page `page` (1-based) of the hits; `Next >` is always offered, even past the last hit (upstream)."""
    segments = ["Instruction:", instruction, "Back to Search", f"Page {page} (Total results: {len(hits)})"]
    clickables = ["back to search"]
    if page > 1:
        segments.append("< Prev")
        clickables.append("< prev")
    segments.append("Next >")
    clickables.append("next >")
    for asin in hits[(page - 1) * PRODUCT_WINDOW: page * PRODUCT_WINDOW]:
        product = products[asin]
        segments += [asin, product["Title"], product["Price"]]
        clickables.append(asin.lower())
    return _page(segments, clickables)


def option_clickables(product: dict) -> dict[str, str]:
    """Option value -> its group, in page order; a value shared by two groups maps to the later group
    (upstream builds a dict) but keeps its first position."""
    mapping: dict[str, str] = {}
    for group, values in product["options"].items():
        for value in values:
            mapping[value] = group
    return mapping


def item_page(instruction: str, product: dict) -> tuple[str, list[str]]:
    """Selected options are not marked in this text mode (as upstream)."""
    segments = ["Instruction:", instruction, "Back to Search", "< Prev"]
    for group, values in product["options"].items():
        segments += [group, *values]
    segments += [product["Title"], f"Price: {product['Price']}", f"Rating: {product['Rating']}",
                 "Description", "Features", "Reviews", "Buy Now"]
    clickables = ["back to search", "< prev", "description", "features", "reviews", "buy now",
                  *option_clickables(product)]
    return _page(segments, clickables)


def sub_page(instruction: str, product: dict, which: str) -> tuple[str, list[str]]:
    """Description / Features / Reviews of the current product. An empty description shows nothing; each
    bullet point is one segment (an empty one stays an empty segment); reviews are always empty upstream."""
    segments = ["Instruction:", instruction, "Back to Search", "< Prev"]
    if which == "description":
        segments += [product["Description"].strip()] if product["Description"].strip() else []
    elif which == "features":
        segments += [b.strip() for b in product["BulletPoints"]]
    elif which != "reviews":
        raise ValueError(f"no sub-page {which!r}")
    return _page(segments, ["back to search", "< prev"])


def done_page(asin: str, options: dict[str, str], reward: float) -> tuple[str, list[str]]:
    segments = ["Thank you for shopping with us!", "Your code:", "None", "(Paste it in your MTurk interface.)",
                "Purchased", "asin", asin, "options", json.dumps(options), "attrs", "None", "category", "None",
                "query", "None", "product category", "None", *_DONE_TARGET, "Reward",
                "Your score (min 0.0, max 1.0)", str(reward), "Reward Details", "None"]
    return _page(segments, [])


def admissible_actions(clickables: list[str]) -> tuple[str, ...]:
    """The actions offered to a policy, as verl-agent lists them: `search[<your query>]` only where the page
    has a search box, then `click[x]` for every clickable but the search button."""
    actions = ["search[<your query>]"] if "search" in clickables else []
    return tuple(actions + [f"click[{c}]" for c in clickables if c != "search"])
