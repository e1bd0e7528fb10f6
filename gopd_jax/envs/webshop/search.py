"""BM25 product search over the fields the original indexes (SPEC section 3), with `bm25s`.

Upstream ranks with pyserini's `LuceneSearcher` (Lucene BM25, Anserini's English analyzer), keeps the top
50 hits. Here:

- Documents: the lowercased space-join of Title, Description, the first bullet point and the option string
  `"name: v1, v2, and name2: v3"` (upstream `convert_product_file_format.py`), one per loaded product.
- Analyzer, after Lucene's English analyzer: lowercase; word tokens (letters/digits, keeping inner `.`
  and `'`, as Lucene's StandardTokenizer keeps "3.5" and "women's"); the English possessive `'s` removed;
  Lucene's 33 English stop words removed; the original Porter stemmer (PyStemmer "porter", which is
  Lucene's PorterStemFilter algorithm). StandardTokenizer implements Unicode UAX#29 word breaks, which
  this regex approximates [uncertain on unusual punctuation].
- Scoring: `bm25s` method "lucene" (Lucene's IDF `log(1 + (N - n + 0.5) / (n + 0.5))`) with k1 = 0.9,
  b = 0.4, Anserini's defaults [SPEC marks these defaults uncertain]. Lucene stores document lengths
  lossily (one byte), which can reorder near-ties; we use exact lengths.
- Ranking: documents with a positive score, by score, ties broken by catalogue order (Lucene breaks ties
  by document id, which follows the index order = catalogue order); top 50.

The index is built once per catalogue and cached under $GOPD_CACHE (default ~/.cache/gopd_jax)/webshop/,
keyed by a hash of the indexed documents and of this analyzer's settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SEARCH_RETURN_N = 50
K1, B = 0.9, 0.4
# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET
LUCENE_STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with".split())
_TOKEN_RE = re.compile(r"\w+(?:[.'’]\w+)*")
_ANALYZER_VERSION = "lucene-english-porter-v1"


def option_string(options: dict[str, list[str]]) -> str:
    return ", and ".join(f"{name}: {', '.join(values)}" for name, values in options.items())


def document_text(product: dict) -> str:
    first_bullet = product["BulletPoints"][0] if product["BulletPoints"] else ""
    return " ".join([product["Title"], product["Description"], first_bullet,
                     option_string(product["options"])]).lower()


class Analyzer:
    def __init__(self):
        import Stemmer
        self._stemmer = Stemmer.Stemmer("porter")

    def __call__(self, text: str) -> list[str]:
        tokens = []
        for token in _TOKEN_RE.findall(text.lower()):
            if token.endswith(("'s", "’s")):
                token = token[:-2]
            if token and token not in LUCENE_STOP_WORDS:
                tokens.append(token)
        return self._stemmer.stemWords(tokens)


def _cache_root() -> Path:
    return Path(os.environ.get("GOPD_CACHE", Path.home() / ".cache" / "gopd_jax")) / "webshop"


def index_key(documents: list[str]) -> str:
    h = hashlib.sha256(f"{_ANALYZER_VERSION}|k1={K1}|b={B}|".encode())
    for doc in documents:
        h.update(doc.encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


class ProductSearch:
    """BM25 search over a catalogue's products; `search(words) -> [asin, ...]` (at most 50)."""

    def __init__(self, products: list[dict], cache_dir: str | os.PathLike | None = None):
        self.asins = [p["asin"] for p in products]
        self.analyzer = Analyzer()
        documents = [document_text(p) for p in products]
        self.index_dir = Path(cache_dir or _cache_root()) / f"bm25-{index_key(documents)}"
        self.build_seconds = 0.0  # 0 when the index came from the cache
        self._retriever = self._load_or_build(documents)

    def _load_or_build(self, documents: list[str]):
        import bm25s
        if (self.index_dir / "done.json").is_file():
            return bm25s.BM25.load(self.index_dir, show_progress=False, verbosity=0)
        start = time.perf_counter()
        retriever = bm25s.BM25(k1=K1, b=B, method="lucene")
        retriever.index([self.analyzer(d) for d in documents], show_progress=False)
        self.build_seconds = time.perf_counter() - start
        # Written into a temp dir, then renamed: concurrent workers never read a half-written index.
        self.index_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".bm25-", dir=self.index_dir.parent))
        try:
            retriever.save(tmp, show_progress=False)
            (tmp / "done.json").write_text(json.dumps({"documents": len(documents), "k1": K1, "b": B}))
            try:
                os.rename(tmp, self.index_dir)
            except OSError:  # another process finished first
                if not (self.index_dir / "done.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return retriever

    def scores(self, query: str) -> np.ndarray:
        ids = self._retriever.get_tokens_ids(self.analyzer(query))
        if not ids:
            return np.zeros(len(self.asins), dtype=np.float32)
        return self._retriever.get_scores(ids)

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[str]:
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.asins[i] for i in order if scores[i] > 0]
