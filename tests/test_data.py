"""Text sources (files, folders, JSONL, built-in Wikipedia) and token windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from lrquant.data.text import (
    calibration_windows,
    evaluation_windows,
    load_documents,
    prepended_bos,
    tokenize_documents,
)
from lrquant.data.wikipedia import wikipedia_split
from lrquant.errors import LrquantError
from lrquant.models.tiny import tiny_tokenizer

# --- sources ------------------------------------------------------------------------------------


def test_plain_text_file(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_text("Hello world.\nSecond line, café.\n", encoding="utf-8")
    assert load_documents(str(path)) == ["Hello world.\nSecond line, café.\n"]


def test_file_with_other_suffix_is_read_as_text(tmp_path: Path) -> None:
    path = tmp_path / "notes.log"
    path.write_text("plain words", encoding="utf-8")
    assert load_documents(str(path)) == ["plain words"]


def test_folder_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.TXT").write_text("third", encoding="utf-8")
    (tmp_path / "d.json").write_text('{"text": "ignored"}', encoding="utf-8")
    (tmp_path / "e.py").write_text("ignored = True", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert load_documents(str(tmp_path)) == ["first", "second", "third"]


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(LrquantError, match=r"has no text files \(\.txt, \.md"):
        load_documents(str(tmp_path))


def test_folder_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(LrquantError, match="has no text files"):
        load_documents(str(tmp_path))


def test_jsonl_default_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "alpha one", "id": 1}, {"text": "beta two"}, {"text": "gamma\nthree"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_documents(str(path)) == ["alpha one", "beta two", "gamma\nthree"]


def test_jsonl_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(
        json.dumps({"body": "first body", "text": 3}) + "\n" + json.dumps({"body": "second body"}) + "\n",
        encoding="utf-8",
    )
    assert load_documents(str(path), text_field="body") == ["first body", "second body"]
    with pytest.raises(LrquantError, match="line 1 has no string field 'text'"):
        load_documents(str(path))


def test_jsonl_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    # JSON allows raw U+2028/U+2029/U+0085 inside strings; only "\n" ends a JSONL record.
    path = tmp_path / "docs.jsonl"
    texts = ["one\u2028two", "three\u2029four\x85five"]
    path.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts), encoding="utf-8")
    assert load_documents(str(path)) == texts


def test_jsonl_bad_line_names_line_number(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(LrquantError, match=r"line 3 is not valid JSON"):
        load_documents(str(path))


@pytest.mark.parametrize(
    "record, line",
    [('{"title": "no text"}', 2), ('["a", "list"]', 2), ('{"text": null}', 2), ('"just a string"', 2)],
)
def test_jsonl_missing_field_names_line_number(tmp_path: Path, record: str, line: int) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n' + record + "\n", encoding="utf-8")
    with pytest.raises(LrquantError, match=rf"line {line} has no string field 'text' \(set --text-field\)"):
        load_documents(str(path))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("naïve café".encode("latin-1"))
    with pytest.raises(LrquantError, match=r"is not UTF-8 text \(byte 2\): convert it to UTF-8"):
        load_documents(str(path))


def test_non_utf8_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(LrquantError, match="is not UTF-8 text"):
        load_documents(str(path))


def test_non_utf8_file_in_folder(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LrquantError, match=r"b\.txt' is not UTF-8"):
        load_documents(str(tmp_path))


def test_missing_path_lists_accepted_kinds(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(LrquantError) as info:
        load_documents(str(missing))
    message = str(info.value)
    assert f"'{missing}' not found" in message
    for kind in ("text file", "folder of text files", ".jsonl", "wikipedia", ":train", ":test"):
        assert kind in message


def test_empty_text_source(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("  \n\n\t\n", encoding="utf-8")
    with pytest.raises(LrquantError, match="text source is empty"):
        tokenize_documents(load_documents(str(path)), tiny_tokenizer())


# --- built-in Wikipedia ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wiki() -> dict[str, list[str]]:
    pytest.importorskip("gensim")
    return {split: wikipedia_split(split) for split in ("train", "test")}


def test_wikipedia_splits_disjoint_and_non_empty(wiki: dict[str, list[str]]) -> None:
    train, test = wiki["train"], wiki["test"]
    assert len(train) >= 50 and len(test) >= 10
    assert all(doc.strip() for doc in train + test)
    assert not set(train) & set(test)
    # no article straddles the two: compare the opening of every article too
    assert not {d[:200] for d in train} & {d[:200] for d in test}
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert 3.5 < len(train) / len(test) < 4.5  # every fifth article is a test article


def test_wikipedia_is_deterministic(wiki: dict[str, list[str]]) -> None:
    from lrquant.data import wikipedia

    wikipedia.articles.cache_clear()
    assert wikipedia_split("test") == wiki["test"]
    assert wikipedia_split("train") == wiki["train"]


def test_wikipedia_test_split_is_large_enough(wiki: dict[str, list[str]]) -> None:
    chars = sum(len(d) for d in wiki["test"])
    assert chars / 4 >= 16_000  # rough tokens: enough for 32 windows of 512
    assert "[[" not in "".join(wiki["test"])  # wiki markup is cleaned


def test_wikipedia_via_load_documents(wiki: dict[str, list[str]]) -> None:
    assert load_documents("wikipedia:test") == wiki["test"]
    assert load_documents("wikipedia", default_split="test") == wiki["test"]
    assert load_documents("wikipedia", default_split="train") == wiki["train"]
    assert load_documents("wikipedia:train", default_split="test") == wiki["train"]


def test_wikipedia_unknown_split() -> None:
    with pytest.raises(LrquantError, match="unknown wikipedia split 'validation'; use one of: train, test"):
        load_documents("wikipedia:validation")


def test_news_splits_are_disjoint_and_hold_32_windows() -> None:
    """The second built-in text: news articles, every fourth one in ``test``, enough of it for
    32 windows of 512 tokens of SmolLM2's tokenizer (a byte-level BPE like the tiny models')."""
    pytest.importorskip("gensim")
    from lrquant.data.news import news_split

    train, test = news_split("train"), news_split("test")
    assert (len(train), len(test)) == (225, 75)
    assert not set(train) & set(test) and all(doc.strip() for doc in train + test)
    assert load_documents("news:test") == test and load_documents("news", default_split="train") == train
    assert sum(len(d) for d in test) / 4.5 >= 32 * 511  # rough tokens at 4.5 characters each
    with pytest.raises(LrquantError, match="unknown news split 'dev'; use one of: train, test"):
        load_documents("news:dev")
    with pytest.raises(LrquantError, match="or a built-in text: 'wikipedia' or 'news'"):
        load_documents("no-such-source")


# --- windows --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def documents(make_text) -> list[str]:
    return [make_text(6_000), make_text(3_000)]


@pytest.fixture(scope="module")
def stream(documents: list[str]) -> torch.Tensor:
    return tokenize_documents(documents, tiny_tokenizer())


def _tokenizer_without_bos() -> PreTrainedTokenizerFast:
    raw = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    raw.post_processor = None
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_tokenize_documents_joins_with_blank_line() -> None:
    tok = tiny_tokenizer()
    ids = tokenize_documents(["first doc", "   ", "second doc"], tok)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    expected = (
        tok("first doc", add_special_tokens=False)["input_ids"]
        + sep
        + tok("second doc", add_special_tokens=False)["input_ids"]
    )
    assert ids.dtype == torch.long and ids.tolist() == expected
    assert tok.bos_token_id not in ids.tolist()


def test_prepended_bos() -> None:
    tok = tiny_tokenizer()
    assert tok.bos_token_id == 1 and prepended_bos(tok) == 1
    assert prepended_bos(_tokenizer_without_bos()) is None

    class NoBosToken:
        bos_token_id = None

        def __call__(self, text: str) -> dict:  # pragma: no cover - must not be needed
            raise AssertionError("not called when there is no BOS token")

    assert prepended_bos(NoBosToken()) is None


def test_evaluation_windows_with_bos(stream: torch.Tensor) -> None:
    bos = prepended_bos(tiny_tokenizer())
    seqlen = 32
    windows = evaluation_windows(stream, seqlen, bos)
    body = seqlen - 1
    n = stream.numel() // body
    assert windows.shape == (n, seqlen) and n > 20
    assert (windows[:, 0] == bos).all()
    assert torch.equal(windows[:, 1:].reshape(-1), stream[: n * body])


def test_evaluation_windows_without_bos(stream: torch.Tensor, documents: list[str]) -> None:
    tok = _tokenizer_without_bos()
    ids = tokenize_documents(documents, tok)
    assert torch.equal(ids, stream)  # same vocabulary, no special tokens either way
    bos = prepended_bos(tok)
    assert bos is None
    windows = evaluation_windows(ids, 32, bos)
    n = ids.numel() // 32
    assert windows.shape == (n, 32)
    assert torch.equal(windows.reshape(-1), ids[: n * 32])
    assert not (windows[:, 0] == 1).all()


def test_evaluation_windows_max_windows(stream: torch.Tensor) -> None:
    full = evaluation_windows(stream, 16, 1)
    capped = evaluation_windows(stream, 16, 1, max_windows=3)
    assert capped.shape == (3, 16)
    assert torch.equal(capped, full[:3])
    assert evaluation_windows(stream, 16, 1, max_windows=10**6).shape == full.shape


def test_evaluation_windows_exact_fit() -> None:
    ids = torch.arange(10, 22)  # 12 tokens
    windows = evaluation_windows(ids, 4, None)
    assert windows.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21]]
    windows = evaluation_windows(ids, 5, 1)
    assert windows.tolist() == [[1, 10, 11, 12, 13], [1, 14, 15, 16, 17], [1, 18, 19, 20, 21]]


def test_calibration_windows_seeded_and_contiguous(stream: torch.Tensor) -> None:
    seqlen, body = 24, 23
    a = calibration_windows(stream, seqlen, 1, nsamples=8, seed=0)
    b = calibration_windows(stream, seqlen, 1, nsamples=8, seed=0)
    c = calibration_windows(stream, seqlen, 1, nsamples=8, seed=1)
    assert a.shape == (8, seqlen) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a[:, 0] == 1).all()
    windows = stream.unfold(0, body, 1)  # every contiguous slice of the stream
    for row in torch.cat([a, c])[:, 1:]:
        assert (windows == row).all(dim=1).any()
    # different windows for different rows (the stream is long enough for that)
    assert len({tuple(r) for r in a.tolist()}) > 1


def test_calibration_windows_without_bos(stream: torch.Tensor) -> None:
    a = calibration_windows(stream, 16, None, nsamples=4, seed=3)
    assert a.shape == (4, 16)
    windows = stream.unfold(0, 16, 1)
    for row in a:
        assert (windows == row).all(dim=1).any()


def test_calibration_windows_whole_stream() -> None:
    ids = torch.arange(100, 107)  # exactly one body of 7
    out = calibration_windows(ids, 8, 1, nsamples=3, seed=5)
    assert out.tolist() == [[1, *range(100, 107)]] * 3


def test_calibration_windows_nsamples(stream: torch.Tensor) -> None:
    with pytest.raises(LrquantError, match="nsamples must be at least 1"):
        calibration_windows(stream, 16, 1, nsamples=0, seed=0)


@pytest.mark.parametrize("make", [evaluation_windows, calibration_windows])
def test_too_short_mentions_seqlen(make) -> None:
    ids = torch.arange(10)
    args = (1, 2, 0) if make is calibration_windows else (1,)
    with pytest.raises(LrquantError, match=r"has 10 tokens, too short for one window of 512 .*--seqlen"):
        make(ids, 512, *args)
    # 11 tokens with BOS make one window of 12; 10 do not
    with pytest.raises(LrquantError, match="--seqlen"):
        make(ids, 12, *args)
    assert make(ids, 11, *args).shape[1] == 11


@pytest.mark.parametrize("seqlen, bos", [(1, 1), (1, None), (0, None), (-5, 1)])
def test_seqlen_too_small(seqlen: int, bos: int | None) -> None:
    # a one-token window predicts nothing, with or without BOS
    ids = torch.arange(100)
    with pytest.raises(LrquantError, match=rf"seqlen {seqlen} is too short: it must be at least 2"):
        evaluation_windows(ids, seqlen, bos)
    with pytest.raises(LrquantError, match=rf"seqlen {seqlen} is too short: it must be at least 2"):
        calibration_windows(ids, seqlen, bos, 2, 0)


def test_seqlen_two() -> None:
    ids = torch.arange(5, 10)
    assert evaluation_windows(ids, 2, 1).tolist() == [[1, 5], [1, 6], [1, 7], [1, 8], [1, 9]]
    assert evaluation_windows(ids, 2, None).tolist() == [[5, 6], [7, 8]]
