"""Built-in text: the news articles that ship inside the ``gensim`` wheel.

``lee_background.cor``: 300 Australian Broadcasting Corporation news articles, one per line
(the background corpus of Lee, Pincombe and Welsh, 2005), another kind of English than the
encyclopedia articles of ``wikipedia``, so a recipe chosen on one can be checked on the other.
Every fourth article goes to ``test`` (75 articles, about 19k SmolLM2 tokens), the rest to
``train``.
"""

from __future__ import annotations

from functools import lru_cache

from lrquant.data.wikipedia import gensim_file, split_by_position

_CORPUS = "test/test_data/lee_background.cor"
_TEST_EVERY = 4


@lru_cache(maxsize=1)
def articles() -> tuple[str, ...]:
    """All articles, in file order."""
    text = gensim_file(_CORPUS, "news").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def news_split(split: str) -> list[str]:
    """The articles of one split, ``train`` or ``test``."""
    return split_by_position(articles(), split, _TEST_EVERY, "news")
