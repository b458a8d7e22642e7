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


def gensim_file(relative: str, what: str) -> Path:
    """The file ``relative`` inside the installed gensim package (built-in text ``what``)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LrquantError(f"the built-in '{what}' text needs gensim: pip install gensim")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise LrquantError(f"gensim is installed but its {what} sample is missing ({path})")
    return path


def split_by_position(texts: tuple[str, ...], split: str, every: int, name: str) -> list[str]:
    """Every ``every``-th text (the last of each run of ``every``) for ``test``, the rest for
    ``train``: disjoint and deterministic."""
    if split not in SPLITS:
        raise LrquantError(f"unknown {name} split '{split}'; use one of: {', '.join(SPLITS)}")
    test = split == "test"
    return [text for i, text in enumerate(texts) if (i % every == every - 1) == test]


@lru_cache(maxsize=1)
def articles() -> tuple[str, ...]:
    """All non-redirect articles, cleaned to plain text, in dump order."""
    from gensim.corpora.wikicorpus import filter_wiki

    texts = []
    with bz2.open(gensim_file(_DUMP, "Wikipedia")) as stream:
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
    return split_by_position(articles(), split, _TEST_EVERY, "wikipedia")
