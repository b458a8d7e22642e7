"""Built-in text: the English Wikipedia articles that ship inside the ``gensim`` wheel.

106 real articles (CC BY-SA), cleaned of wiki markup with gensim's ``filter_wiki``. Articles are
split by position into disjoint, deterministic parts: every fifth article goes to ``test``, the
rest to ``train``.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

from lrquant.errors import LrquantError

SPLITS = ("train", "test")
_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_TEST_EVERY = 5


def _tidy(text: str) -> str:
    # filter_wiki keeps bold/italic quote marks and leaves "()" where templates were removed.
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r" ?\(\s*[,;]?\s*\)", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _dump_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LrquantError("the built-in 'wikipedia' text needs gensim: pip install gensim")
    path = Path(spec.submodule_search_locations[0]) / _DUMP
    if not path.is_file():
        raise LrquantError(f"gensim is installed but its Wikipedia sample is missing ({path})")
    return path


@lru_cache(maxsize=1)
def articles() -> tuple[str, ...]:
    """All non-redirect articles, cleaned to plain text, in dump order."""
    from gensim.corpora.wikicorpus import filter_wiki

    texts = []
    with bz2.open(_dump_path()) as stream:
        for _, elem in ET.iterparse(stream):
            if (
                elem.tag.endswith("}text")
                and elem.text
                and not elem.text.lstrip().upper().startswith("#REDIRECT")
            ):
                cleaned = _tidy(filter_wiki(elem.text))
                if cleaned:
                    texts.append(cleaned)
            if elem.tag.endswith("}page"):
                elem.clear()
    return tuple(texts)


def wikipedia_split(split: str) -> list[str]:
    """The articles of one split, ``train`` or ``test``."""
    if split not in SPLITS:
        raise LrquantError(f"unknown wikipedia split '{split}'; use one of: {', '.join(SPLITS)}")
    test = split == "test"
    return [text for i, text in enumerate(articles()) if (i % _TEST_EVERY == _TEST_EVERY - 1) == test]
