"""Text sources and token windows for calibration and perplexity.

A source is one of: a plain text file, a folder of text files (``*.txt``, ``*.md``, read in
sorted order), a JSONL file with a text field, or a built-in text: ``wikipedia`` (encyclopedia
articles) or ``news`` (news articles), each optionally with its split (``wikipedia:train``,
``news:test``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lrquant.data.news import news_split
from lrquant.data.wikipedia import SPLITS, wikipedia_split
from lrquant.errors import LrquantError

TEXT_SUFFIXES = (".txt", ".md", ".text")
BUILTIN_TEXTS = {"wikipedia": wikipedia_split, "news": news_split}


def load_documents(source: str, default_split: str = "train", text_field: str = "text") -> list[str]:
    """Read the documents of ``source``; built-in sources use ``default_split`` unless named.

    A source without any text is refused here, where its name is known.
    """
    name, _, split = source.partition(":")
    builtin = BUILTIN_TEXTS.get(name)
    if builtin is not None and not Path(source).exists():
        return builtin(split or default_split)
    path = Path(source).expanduser()
    if not path.exists():
        names = " or ".join(repr(n) for n in BUILTIN_TEXTS)
        raise LrquantError(
            f"data source '{source}' not found: give a text file, a folder of text files, a .jsonl file, "
            f"or a built-in text: {names} (split ':{'|:'.join(SPLITS)}')"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise LrquantError(f"folder '{source}' has no text files ({', '.join(TEXT_SUFFIXES)})")
        docs, wanted = [_read(p) for p in files], "files with text"
    elif path.suffix.lower() == ".jsonl":
        docs, wanted = _read_jsonl(path, text_field), f"records with text in their '{text_field}' field"
    else:
        docs, wanted = [_read(path)], "a file with text"
    if not any(doc.strip() for doc in docs):
        raise LrquantError(f"the text source is empty: '{source}' holds no text; give {wanted}")
    return docs


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LrquantError(f"'{path}' is not UTF-8 text (byte {err.start}): convert it to UTF-8") from None
    except OSError as err:
        raise LrquantError(f"cannot read '{path}': {err.strerror}") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    # only "\n" ends a record: str.splitlines() would also split at U+2028 etc. inside JSON strings
    for number, line in enumerate(_read(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LrquantError(f"'{path}' line {number} is not valid JSON: {err.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise LrquantError(
                f"'{path}' line {number} has no string field '{text_field}' (set --text-field)"
            )
        docs.append(record[text_field])
    return docs


def prepended_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one by default, else ``None``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("The")["input_ids"]
    return bos if ids and ids[0] == bos else None


def tokenize_documents(docs: list[str], tokenizer) -> torch.Tensor:
    """One long 1-D tensor of token ids: the documents joined by blank lines, no special tokens."""
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LrquantError("the text source is empty")
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i, doc_ids in enumerate(tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]):
        if i:
            ids.extend(separator)
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def _body_length(seqlen: int, bos: int | None) -> int:
    if seqlen < 2:  # a window of one token predicts nothing (perplexity would divide by zero)
        raise LrquantError(f"seqlen {seqlen} is too short: it must be at least 2")
    return seqlen - (bos is not None)


def _with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], dim=1)


def _too_short(ids: torch.Tensor, seqlen: int) -> LrquantError:
    return LrquantError(
        f"the text has {ids.numel()} tokens, too short for one window of {seqlen} tokens: "
        "use more text or a smaller --seqlen"
    )


def evaluation_windows(
    ids: torch.Tensor, seqlen: int, bos: int | None, max_windows: int | None = None
) -> torch.Tensor:
    """Consecutive, non-overlapping windows ``[n, seqlen]``, BOS first when given."""
    body = _body_length(seqlen, bos)
    count = ids.numel() // body
    if count == 0:
        raise _too_short(ids, seqlen)
    if max_windows is not None:
        count = min(count, max_windows)
    return _with_bos(ids[: count * body].view(count, body), bos)


def calibration_windows(
    ids: torch.Tensor, seqlen: int, bos: int | None, nsamples: int, seed: int
) -> torch.Tensor:
    """``nsamples`` windows ``[nsamples, seqlen]`` starting at seeded random positions."""
    body = _body_length(seqlen, bos)
    if ids.numel() < body:
        raise _too_short(ids, seqlen)
    if nsamples < 1:
        raise LrquantError(f"nsamples must be at least 1 (got {nsamples})")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body + 1, (nsamples,), generator=generator)
    return _with_bos(torch.stack([ids[s : s + body] for s in starts.tolist()]), bos)
