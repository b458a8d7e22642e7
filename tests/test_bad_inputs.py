"""The bad-input corpus: every wrong thing a user has typed or handed lrquant, run through the
command line. Each must end with exit status 2, exactly one ``lrquant: error:`` line (the last
thing said), no traceback, and nothing written or deleted anywhere: not in the working folder,
not beside the model, not in the cache.

A case names its command line with placeholders ({model}, {text}, {out}, {vit}, {images}) and
may first build the bad input inside the working folder. New entry points add their cases here.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_cli import error_line, run
from test_output_safety import snapshot

from lrquant.models.tiny_vision import save_tiny_vision_model

RTN = (
    *("--method", "rtn", "--seqlen", "32", "--eval-windows", "2"),
    *("--calib-data", "{text}", "--eval-data", "{text}"),
)
QUANTIZE = ("quantize", "--model", "{model}", "--output", "{out}", *RTN)
LEARNED = (
    *("quantize", "--model", "{model}", "--output", "{out}", "--seqlen", "32", "--calib-data", "{text}"),
    *("--no-eval", "--preset", "fast", "--set", "epochs=1", "--set", "compile=false"),
)
EVAL = ("eval", "--model", "{model}", "--data", "{text}", "--seqlen", "32", "--eval-windows", "2")
VIT = ("quantize", "--model", "{vit}", "--output", "{out}", "--method", "rtn", "--no-eval")


@dataclass(frozen=True)
class Case:
    """One bad input: the command (placeholders filled in per run), fragments its error line must
    hold, and what to build in the working folder first (it may return a new ``{model}``)."""

    id: str
    argv: tuple[str, ...]
    expected: tuple[str, ...]
    setup: Callable[[Path, Path], Path | None] | None = None


# --- builders of bad inputs (work folder, the good tiny model) -> the model to use, if another ---


def copy_model(work: Path, model: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(model, work / name))


def truncated_weights(work: Path, model: Path) -> Path:
    copy = copy_model(work, model)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    return copy


def empty_weights(work: Path, model: Path) -> Path:
    copy = copy_model(work, model)
    (copy / "model.safetensors").write_bytes(b"")
    return copy


def overwritten_header(work: Path, model: Path) -> Path:
    copy = copy_model(work, model)
    with (copy / "model.safetensors").open("r+b") as fh:
        fh.write(b"\xff" * 8)
    return copy


def edit_config(**changes) -> Callable[[Path, Path], Path]:
    def make(work: Path, model: Path) -> Path:
        copy = copy_model(work, model)
        config = json.loads((copy / "config.json").read_text())
        config.update(changes)
        (copy / "config.json").write_text(json.dumps(config))
        return copy

    return make


def write_file(name: str, content: bytes) -> Callable[[Path, Path], Path]:
    """A copy of the model whose file ``name`` holds ``content``."""

    def make(work: Path, model: Path) -> Path:
        copy = copy_model(work, model)
        (copy / name).write_bytes(content)
        return copy

    return make


def missing_tensor(work: Path, model: Path) -> Path:
    copy = copy_model(work, model)
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def bin_only(work: Path, model: Path) -> Path:
    copy = copy_model(work, model)
    torch.save(load_file(copy / "model.safetensors"), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    return copy


def no_tokenizer(work: Path, model: Path) -> Path:
    copy = copy_model(work, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    return copy


def no_config(work: Path, model: Path) -> Path:
    copy = copy_model(work, model)
    (copy / "config.json").unlink()
    return copy


def bert(work: Path, model: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    BertForMaskedLM(config).save_pretrained(work / "bert")
    return work / "bert"


def gguf_file(content: bytes) -> Callable[[Path, Path], Path]:
    def make(work: Path, model: Path) -> Path:
        (work / "model.gguf").write_bytes(content)
        return work / "model.gguf"

    return make


def not_gguf(work: Path, model: Path) -> Path:
    (work / "weights.txt").write_text("not a model")
    return work / "weights.txt"


def plain_file(name: str, content: bytes) -> Callable[[Path, Path], None]:
    def make(work: Path, model: Path) -> None:
        (work / name).write_bytes(content)

    return make


def folder(name: str, files: dict[str, bytes]) -> Callable[[Path, Path], None]:
    def make(work: Path, model: Path) -> None:
        (work / name).mkdir()
        for file, content in files.items():
            (work / name / file).write_bytes(content)

    return make


def lrquant_output(work: Path, model: Path, *extra: str) -> None:
    """A real output folder at ``work/out`` (what --overwrite may replace), made before the case."""
    code = _cli(work, model, *QUANTIZE, "--no-eval", *extra)
    assert code == 0


def output_without_integers(work: Path, model: Path) -> None:
    """An output as an older lrquant wrote it: no integer codes, and its quant file names none."""
    output_lacking_integers(work, model)
    quant = json.loads((work / "out" / "lrquant_quant.json").read_text())
    del quant["integer_weights"]
    (work / "out" / "lrquant_quant.json").write_text(json.dumps(quant))


def output_lacking_integers(work: Path, model: Path) -> None:
    """An output copied without the integer codes its quant file names."""
    lrquant_output(work, model)
    (work / "out" / "integer_weights.safetensors").unlink()


def output_and_file(work: Path, model: Path) -> None:
    lrquant_output(work, model)
    (work / "mine.gguf").write_bytes(b"GGUF but mine")


def output_with_note(work: Path, model: Path) -> None:
    lrquant_output(work, model)
    (work / "out" / "notes.txt").write_text("mine")


def damaged_quant_file(work: Path, model: Path) -> Path:
    lrquant_output(work, model)
    (work / "out" / "lrquant_quant.json").write_text("{")
    return work / "out"


def damaged_resume(work: Path, model: Path) -> None:
    resume = work / ".out.resume"
    resume.mkdir()
    (resume / "progress.json").write_text('{"fingerprint": ')


def symlinked_output(work: Path, model: Path) -> None:
    lrquant_output(work, model)
    (work / "link").symlink_to(work / "out")


def bad_image(work: Path, model: Path) -> None:
    (work / "images").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(work / "images" / "good.png")
    (work / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def _cli(work: Path, model: Path, *argv: str) -> int:
    from lrquant import cli

    values = {"model": model, "out": work / "out", "text": work.parent / "corpus.txt"}
    return cli.main([a.format(**values) for a in argv])


GGUF_HEADER_ONLY = struct.pack("<4sI", b"GGUF", 3)
GGUF_NO_TENSOR_DATA = struct.pack("<4sIQQ", b"GGUF", 3, 1, 0) + struct.pack("<Q", 4) + b"w.0\x00"

CASES = [
    # numbers and names on the command line
    Case("wbits-9", (*QUANTIZE, "--wbits", "9"), ("invalid weight quantization", "bits must be 2 to 8, or 16", "(got 9)")),
    Case("wbits-1", (*QUANTIZE, "--wbits", "1"), ("bits must be 2 to 8, or 16", "(got 1)")),
    Case("wbits-word", (*QUANTIZE, "--wbits", "four"), ("argument --wbits: invalid int value: 'four'",)),
    Case("abits-17", (*QUANTIZE, "--abits", "17"), ("invalid activation quantization", "(got 17)")),
    Case("qkv-bits-1", (*QUANTIZE, "--abits", "8", "--qkv-bits", "1"), ("invalid qkv quantization", "(got 1)")),
    Case("softmax-bits-9", (*QUANTIZE, "--softmax-bits", "9"), ("(got 9)",)),
    Case("post-act-bits-1", (*QUANTIZE, "--abits", "8", "--post-act-bits", "1"), ("(got 1)",)),
    Case("group-size-0", (*QUANTIZE, "--group-size", "0"), ("group_size must be at least 1 (got 0)",)),
    Case("group-size-negative", (*QUANTIZE, "--group-size", "-4"), ("group_size must be at least 1 (got -4)",)),
    Case("a-clip-0.2", (*QUANTIZE, "--abits", "4", "--a-clip", "0.2"), ("clip_ratio must be between 0.5 and 1",)),
    Case("a-clip-without-abits", (*QUANTIZE, "--a-clip", "0.9"), ("only changes quantized linear inputs", "--abits")),
    Case("rotate-qkv-without-abits", (*QUANTIZE, "--rotate-qkv"), ("only changes how they are quantized", "--abits")),
    Case("nsamples-0", (*LEARNED, "--nsamples", "0"), ("--nsamples must be at least 1 (got 0)",)),
    Case("nsamples-negative", (*LEARNED, "--nsamples", "-3"), ("--nsamples must be at least 1 (got -3)",)),
    Case("seqlen-0", (*QUANTIZE, "--seqlen", "0"), ("seqlen 0 is too short: it must be at least 2",)),
    Case("seqlen-1", (*QUANTIZE, "--seqlen", "1"), ("seqlen 1 is too short: it must be at least 2",)),
    Case("seqlen-past-context", (*QUANTIZE, "--seqlen", "513"), ("longer than the model's context of 512 tokens",)),
    Case("eval-windows-0", (*QUANTIZE, "--eval-windows", "0"), ("argument --eval-windows: must be at least 1 (got 0)",)),
    Case("eval-windows-word", (*QUANTIZE, "--eval-windows", "many"), ("expected a number or 'all', got 'many'",)),
    Case("batch-size-0", (*QUANTIZE, "--batch-size", "0"), ("--batch-size must be at least 1 (got 0)",)),
    Case("image-size-4", (*VIT, "--image-size", "4"), ("--image-size must be at least 8 pixels (got 4)",)),
    Case("image-size-on-a-language-model", (*QUANTIZE, "--image-size", "224"), ("--image-size sets a vision model's", "is a language model")),
    Case("method-unknown", (*QUANTIZE, "--method", "magic"), ("unknown method 'magic'; available: auto, rtn",)),
    Case("preset-unknown", (*LEARNED, "--preset", "huge"), ("unknown preset 'huge'",)),
    Case("set-unknown-field", (*LEARNED, "--set", "bogus=1"), ("bogus Extra inputs are not permitted",)),
    Case("set-negative-epochs", (*LEARNED, "--set", "epochs=-1"), ("epochs Input should be greater than or equal to 0",)),
    Case("set-word-epochs", (*LEARNED, "--set", "epochs=many"), ("epochs",)),
    Case("set-without-value", (*LEARNED, "--set", "epochs"), ("--set expects key=value, got 'epochs'",)),
    Case("set-retired-field", (*LEARNED, "--set", "gptq=true", "--set", "gptq_target=fp"), ("gptq_target was retired",)),
    Case("set-retired-gptq-sequential", (*LEARNED, "--set", "gptq=true", "--set", "gptq_sequential=true"), ("gptq_sequential was retired",)),
    Case("set-retired-schedule", (*LEARNED, "--set", "schedule=cosine"), ("the recipe setting schedule was retired",)),
    Case("set-retired-holdout", (*LEARNED, "--set", "holdout=8"), ("holdout was retired",)),
    Case("set-retired-e2e-norms", (*LEARNED, "--set", "e2e_epochs=1", "--set", "e2e_norms=true"), ("e2e_norms was retired",)),
    Case("set-retired-down-smoothing", (*LEARNED, "--set", "down_smoothing=true"), ("down_smoothing was retired",)),
    Case("device-unknown", (*QUANTIZE, "--device", "tpu"), ("unknown device 'tpu'",)),
    Case("device-missing-gpu", (*QUANTIZE, "--device", "cuda:7"), ("cuda:7",)),
    Case("unknown-flag", (*EVAL, "--bogus-flag"), ("unrecognized arguments: --bogus-flag",)),
    Case("no-command", (), ("required: command",)),
    # the output
    Case("output-empty", ("quantize", "--model", "{model}", "--output", "", *RTN), ("the output path is empty",)),
    Case("output-is-a-file", (*QUANTIZE, "--overwrite"), ("already exists as a file: choose another path",), plain_file("out", b"keep me")),
    Case("output-under-a-file", ("quantize", "--model", "{model}", "--output", "{out}/x", *RTN), ("is not writable",), plain_file("out", b"keep me")),
    Case("output-exists", QUANTIZE, ("already exists as a folder: pass --overwrite",), lrquant_output),
    Case("overwrite-a-user-folder", (*QUANTIZE, "--overwrite"), ("was not written by lrquant",), folder("out", {"a.jpg": b"photo"})),
    Case("overwrite-with-a-foreign-file", (*QUANTIZE, "--overwrite"), ("holds files lrquant did not write (notes.txt)",), output_with_note),
    Case("overwrite-the-input-model", ("quantize", "--model", "{out}", "--output", "{out}", "--overwrite", *RTN), ("which this run reads or runs in",), lrquant_output),
    Case("overwrite-the-current-folder", ("quantize", "--model", "{model}", "--output", ".", "--overwrite", *RTN), ("which this run reads or runs in",)),
    Case("overwrite-a-symlink", ("quantize", "--model", "{model}", "--output", "link", "--overwrite", *RTN), ("is a symbolic link",), symlinked_output),
    Case("overwrite-the-data", ("quantize", "--model", "{model}", "--output", "{out}", "--overwrite", *RTN[:-4], "--calib-data", "{out}/lrquant_quant.json", "--eval-data", "{text}"), ("which this run reads or runs in",), lrquant_output),
    Case("resume-folder-damaged", (*LEARNED, "--nsamples", "2"), (".out.resume", "delete"), damaged_resume),
    # model files
    Case("model-missing", (*QUANTIZE[:2], "nowhere/model", *QUANTIZE[3:]), ("model 'nowhere/model' not found", "built-in name")),
    Case("model-unknown-name", (*QUANTIZE[:2], "no-such-model", *QUANTIZE[3:]), ("model 'no-such-model' not found",)),
    Case("model-not-gguf-file", QUANTIZE, ("is a file but not .gguf",), not_gguf),
    Case("model-unsupported-architecture", QUANTIZE, ("unsupported architecture 'bert'", "supported:"), bert),
    Case("model-without-config", QUANTIZE, ("has no config.json",), no_config),
    Case("model-bin-only", QUANTIZE, ("no .safetensors weights (pytorch_model.bin)", "only safetensors"), bin_only),
    Case("weights-truncated", QUANTIZE, ("model.safetensors' is not a valid safetensors file (incomplete metadata, file not fully covered)", "truncated or damaged"), truncated_weights),
    Case("weights-empty", QUANTIZE, ("model.safetensors' is not a valid safetensors file (header too small)",), empty_weights),
    Case("weights-header-overwritten", QUANTIZE, ("model.safetensors' is not a valid safetensors file",), overwritten_header),
    Case("weights-truncated-eval", EVAL, ("model.safetensors' is not a valid safetensors file",), truncated_weights),
    Case("weights-shapes-differ-from-config", QUANTIZE, ("do not match its config.json: model.embed_tokens.weight is [512, 64] in the checkpoint but [512, 128] by the config",), edit_config(hidden_size=128)),
    Case("weights-missing-a-tensor", QUANTIZE, ("lack model.layers.1.mlp.up_proj.weight (1 tensor missing)",), missing_tensor),
    Case("config-not-json", QUANTIZE, ("config.json' is not valid JSON",), write_file("config.json", b"{not json")),
    Case("config-not-an-object", QUANTIZE, ("config.json' is not a model config: it holds an array",), write_file("config.json", b"[1, 2]")),
    Case("config-without-model-type", QUANTIZE, ("config.json' has no model_type",), write_file("config.json", b'{"hidden_size": 4}')),
    Case("tokenizer-not-json", QUANTIZE, ("tokenizer.json' is not valid JSON",), write_file("tokenizer.json", b"{bad")),
    Case("tokenizer-empty", EVAL, ("tokenizer.json' is not valid JSON (the file is empty)",), write_file("tokenizer.json", b"")),
    Case("tokenizer-incomplete", QUANTIZE, ("cannot load the tokenizer of '", "from tokenizer.json, tokenizer_config.json"), write_file("tokenizer.json", b'{"version": "1.0"}')),
    Case("tokenizer-files-missing", EVAL, ("has no tokenizer files", "copy them from the original"), no_tokenizer),
    Case("tokenizer-config-not-json", QUANTIZE, ("tokenizer_config.json' is not valid JSON",), write_file("tokenizer_config.json", b"{bad")),
    Case("gguf-random-bytes", QUANTIZE, ("model.gguf' is not a valid GGUF file",), gguf_file(bytes(range(256)) * 4)),
    Case("gguf-header-only", QUANTIZE, ("model.gguf' is not a valid GGUF file",), gguf_file(GGUF_HEADER_ONLY)),
    Case("gguf-cut-in-the-tensor-table", QUANTIZE, ("model.gguf' is not a valid GGUF file",), gguf_file(GGUF_NO_TENSOR_DATA)),
    Case("gguf-empty", EVAL, ("model.gguf' is not a valid GGUF file",), gguf_file(b"")),
    Case("quantized-output-damaged", EVAL, ("lrquant_quant.json' is damaged",), damaged_quant_file),
    # text data
    Case("text-missing", (*QUANTIZE, "--eval-data", "missing.txt"), ("data source 'missing.txt' not found", "wikipedia")),
    Case("text-empty", (*QUANTIZE, "--eval-data", "empty.txt"), ("empty.txt", "is empty"), plain_file("empty.txt", b"")),
    Case("text-only-blank", (*QUANTIZE, "--calib-data", "blank.txt", "--method", "omniquant"), ("blank.txt", "is empty"), plain_file("blank.txt", b" \n\n\t\n")),
    Case("text-not-utf8", (*QUANTIZE, "--eval-data", "latin1.txt"), ("'latin1.txt' is not UTF-8 text",), plain_file("latin1.txt", "café".encode("latin-1"))),
    Case("text-too-short", (*QUANTIZE, "--eval-data", "short.txt", "--seqlen", "512"), ("too short for one window of 512 tokens",), plain_file("short.txt", b"A few words.")),
    Case("text-folder-empty", (*QUANTIZE, "--eval-data", "texts"), ("has no text files",), folder("texts", {})),
    Case("text-folder-without-text", (*QUANTIZE, "--eval-data", "texts"), ("has no text files",), folder("texts", {"a.jpg": b"x"})),
    Case("jsonl-bad-line", (*QUANTIZE, "--eval-data", "d.jsonl"), ("line 2 is not valid JSON",), plain_file("d.jsonl", b'{"text": "a"}\n{oops\n')),
    Case("jsonl-missing-field", (*QUANTIZE, "--eval-data", "d.jsonl"), ("line 1 has no string field 'text'",), plain_file("d.jsonl", b'{"body": "a"}\n')),
    Case("wikipedia-unknown-split", (*EVAL[:4], "wikipedia:dev"), ("unknown wikipedia split 'dev'",)),
    # export
    Case("export-unknown-format", ("export", "{out}", "--format", "onnx"), ("unknown export format 'onnx'; available: compressed-tensors, gguf",), lrquant_output),
    Case("export-without-format", ("export", "{out}"), ("the following arguments are required: --format",), lrquant_output),
    Case("export-missing-source", ("export", "nowhere", "--format", "gguf"), ("output folder 'nowhere' not found",)),
    Case("export-not-an-output", ("export", "{model}", "--format", "gguf"), ("is not an lrquant output folder",)),
    Case("export-without-integers", ("export", "{out}", "--format", "gguf"), ("has no integer weights", "lrquant quantize --model"), output_without_integers),
    Case("export-lacking-integers", ("export", "{out}", "--format", "gguf"), ("lacks integer_weights.safetensors", "copy the whole folder"), output_lacking_integers),
    Case("export-16-bit-weights", ("export", "{out}", "--format", "gguf"), ("has no quantized weights (W16A8)",), lambda w, m: lrquant_output(w, m, "--wbits", "16", "--abits", "8")),
    Case("export-into-its-source", ("export", "{out}", "--format", "compressed-tensors", "--output", "{out}/packed"), ("is inside the quantized output",), lrquant_output),
    Case("export-onto-its-source", ("export", "{out}", "--format", "compressed-tensors", "--output", "{out}", "--overwrite"), ("which this run reads or runs in",), lrquant_output),
    Case("export-over-a-file", ("export", "{out}", "--format", "gguf", "--output", "mine.gguf"), ("already exists as a file: pass --overwrite",), output_and_file),
    Case("export-over-a-foreign-file", ("export", "{out}", "--format", "gguf", "--output", "mine.gguf", "--overwrite"), ("is not a GGUF file lrquant wrote",), output_and_file),
    Case("quantize-unknown-format", (*QUANTIZE, "--format", "onnx"), ("unknown export format 'onnx'",)),
    Case("quantize-format-over-a-file", (*QUANTIZE, "--format", "gguf"), ("out.gguf' already exists as a file: pass --overwrite",), plain_file("out.gguf", b"mine")),
    Case("quantize-format-over-a-foreign-file", (*QUANTIZE, "--format", "gguf", "--overwrite"), ("out.gguf': it is not a GGUF file lrquant wrote",), plain_file("out.gguf", b"mine")),
    Case("quantize-ct-ragged-groups", (*QUANTIZE, "--group-size", "48", "--format", "compressed-tensors"), ("group size 48 leaves a ragged last group on rows of 64 columns",)),
    Case("quantize-gguf-activations", (*QUANTIZE, "--abits", "8", "--format", "gguf"), ("W4A8 quantizes activations, but GGUF holds weights only",)),
    Case("quantize-gguf-type-without-format", (*QUANTIZE, "--gguf-type", "Q4_K"), ("give it with --format gguf",)),
    Case("quantize-gguf-type-unknown", (*QUANTIZE, "--format", "gguf", "--gguf-type", "Q4_K_XL"), ("unknown GGUF type 'Q4_K_XL'",)),
    Case("export-gguf-type-other-format", ("export", "{out}", "--format", "compressed-tensors", "--gguf-type", "Q4_K"), ("the format is compressed-tensors",), lrquant_output),
    Case("export-gguf-type-no-match", ("export", "{out}", "--format", "gguf", "--gguf-type", "blk.*.attn_qkv=Q8_0"), ("pattern 'blk.*.attn_qkv' matches no matrix",), lrquant_output),
    # running outputs
    Case("eval-unknown-backend", (*EVAL, "--backend", "gpu"), ("unknown backend 'gpu'; available: auto, packed, fake",)),
    Case("eval-packed-full-precision", (*EVAL, "--backend", "packed"), ("is not a quantized output: --backend packed has nothing to pack",)),
    Case("generate-no-prompt", ("generate", "--model", "{model}"), ("the following arguments are required: --prompt",)),
    Case("generate-empty-prompt", ("generate", "--model", "{model}", "--prompt", ""), ("the prompt is empty",)),
    Case("generate-zero-tokens", ("generate", "--model", "{model}", "--prompt", "Hi", "--max-new-tokens", "0"), ("--max-new-tokens must be at least 1 (got 0)",)),
    Case("generate-a-vision-model", ("generate", "--model", "{vit}", "--prompt", "Hi"), ("is a vision model: generate is for language models",)),
    # image data
    Case("images-folder-empty", (*VIT, "--calib-data", "images", "--method", "omniquant"), ("no images",), folder("images", {})),
    Case("images-broken-file", (*VIT, "--calib-data", "images", "--method", "omniquant"), ("broken.png",), bad_image),
    Case("images-unknown-set", (*VIT, "--calib-data", "pictures", "--method", "omniquant"), ("image source 'pictures' not found",)),
]  # fmt: skip


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vision_model("vit", tmp_path_factory.mktemp("vit") / "model", classifier=True)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(
    case: Case,
    tmp_path: Path,
    tiny_llama: Path,
    vit: Path,
    text_file: Path,
    private_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(text_file, tmp_path / "corpus.txt")
    monkeypatch.chdir(work)
    model = (case.setup(work, tiny_llama) if case.setup else None) or tiny_llama
    values = {"model": model, "vit": vit, "text": tmp_path / "corpus.txt", "out": work / "out"}
    argv = [arg.format(**values) for arg in case.argv]
    capsys.readouterr()
    watched = {"work": work, "model": tiny_llama, "vit": vit, "cache": private_cache}
    before = {name: snapshot(path) for name, path in watched.items()}

    line = error_line(*run(capsys, *argv))

    for fragment in case.expected:
        assert fragment in line
    assert {name: snapshot(path) for name, path in watched.items()} == before


def test_the_corpus_is_large_and_names_each_case_once() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 100  # README, "Reliability"
