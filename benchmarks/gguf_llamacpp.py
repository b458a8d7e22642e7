"""lrquant's GGUF files against llama.cpp's own quantizer, measured by llama.cpp (not part of CI).

For each llama.cpp type (Q4_0, Q4_K_M, Q3_K_M, Q2_K) three files are made and scored with
``llama-perplexity`` on the same text: llama.cpp's quantization of the full-precision GGUF, the
same with an importance matrix (``llama-imatrix`` over lrquant's calibration windows), and
lrquant's own, ``lrquant quantize --format gguf --gguf-type RULES``, where RULES copies the
per-tensor types of llama.cpp's file (so both files have the same types and size) and each linear
learns the grid of its type (Q5_0: 5-bit symmetric groups of 32, Q6_K: 6-bit symmetric groups of
16, ...; the other weights start from :data:`BASE`, 4-bit symmetric groups of 32).

Evaluation text: lrquant's default evaluation documents (``wikipedia:test``) joined as
``tokenize_documents`` joins them, cut where llama.cpp reads ``--eval-tokens`` tokens. llama.cpp's
protocol (``llama-perplexity -c 512 -b 512``): the tokens split into consecutive chunks of 512,
BOS first when the vocabulary adds one, and only the second half of each chunk scored. The same
protocol runs in PyTorch, on llama.cpp's token ids (the transformers tokenizer splits some runs of
blank space differently; its count is recorded), for the full-precision model, transformers' load
of every GGUF file and lrquant's simulated output; a file that holds lrquant's grid exactly
("exact") should get the same perplexity from all of them within 0.5%, and the run ends with an
error when it does not. Each file's vocabulary is checked too: a file whose pre-tokenizer makes
llama.cpp read the text as other tokens is marked in the table (its perplexity is then not
comparable), and PyTorch is checked on that file's tokens. transformers loads GGUF files only
with ``accelerate`` installed, and llama.cpp's converter needs ``sentencepiece``:
``pip install -e ".[bench]"``.

    python benchmarks/gguf_llamacpp.py --llama-cpp DIR --smoke          # plumbing only, ~3 minutes
    python benchmarks/gguf_llamacpp.py --llama-cpp DIR --method rtn --types Q4_0
    python benchmarks/gguf_llamacpp.py --llama-cpp DIR                  # lrquant_plus, preset fast

DIR holds llama.cpp's tools (``llama-quantize``, ``llama-perplexity``, ``llama-imatrix``,
``llama-tokenize``; default: the environment's ``LLAMA_CPP_BIN``); its converter is taken from
``DIR/../../convert_hf_to_gguf.py`` unless ``--convert`` names it. Every intermediate file (texts,
GGUF files, lrquant outputs, the importance matrix, timings and perplexities) is kept in
``--work``, and a rerun skips what is there. Writes ``benchmarks/results/gguf_llamacpp.md`` and
``.json`` (``gguf_llamacpp_smoke`` for ``--smoke``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llm_ppl import RESULTS, code_version, cpu_name

TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")  # llama.cpp's file types compared
BASE = ("--wbits", "4", "--w-symmetric", "--group-size", "32")  # lrquant's scheme before the types
BUILD = (
    "llama.cpp tools not found: pass --llama-cpp DIR or set LLAMA_CPP_BIN; to build them: "
    "pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 "
    "&& tar xzf llama_cpp_python-0.3.36.tar.gz "
    "&& cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "
    "-DLLAMA_CURL=OFF && cmake --build build -j2 --target llama-quantize llama-perplexity llama-imatrix "
    "llama-tokenize (about 12 minutes on 2 cores); DIR is then "
    "llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
)
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-tokenize")
AGREEMENT = 0.005  # the largest relative spread of perplexities of one exact file
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks")


@dataclass(frozen=True)
class LlamaCpp:
    """llama.cpp's tools in ``bin`` and its converter script, run with ``threads`` threads."""

    bin: Path
    convert: Path
    threads: int

    def run(self, tool: str, *args: str, stdin: str | None = None) -> str:
        """Run a tool; its stdout and stderr together, or exit with their end when it fails."""
        cmd = [str(self.bin / tool), *args]
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
        return out.stdout + out.stderr

    def version(self) -> str:
        """The version line the tools print (build number and commit)."""
        text = self.run("llama-perplexity", "--version")
        return next((line for line in text.splitlines() if line.startswith("version")), "unknown")


class Cache:
    """Measurements kept in ``work/cache.json``; keys name the files they were made from."""

    def __init__(self, work: Path) -> None:
        self.path = work / "cache.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def file_key(path: Path) -> str:
    """A key that changes whenever the file is written again."""
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def find_llama_cpp(bin_dir: str | None, convert: str | None, threads: int) -> LlamaCpp:
    """The tools, or exit with how to build them."""
    if not bin_dir or not all((Path(bin_dir) / tool).exists() for tool in TOOLS):
        sys.exit(BUILD)
    path = Path(bin_dir).resolve()
    script = Path(convert) if convert else path.parent.parent / "convert_hf_to_gguf.py"
    if not script.exists():
        sys.exit(f"convert_hf_to_gguf.py not found at {script}: give --convert PATH")
    return LlamaCpp(path, script, threads)


def timed(cache: Cache, target: Path, make) -> float:
    """Seconds ``make()`` took to write ``target``; made (and timed) only when it is missing."""
    seconds = cache.get(f"seconds:{target.name}")
    if target.exists() and seconds is not None:
        return seconds
    start = time.perf_counter()
    make()
    seconds = round(time.perf_counter() - start, 1)
    cache.put(f"seconds:{target.name}", seconds)
    return seconds


def strip_newline(text: str) -> str:
    """The text llama.cpp's ``-f`` reads from a file: one trailing newline removed."""
    return text[:-1] if text.endswith("\n") else text


def write_eval_text(loaded, tools: LlamaCpp, model: Path, eval_tokens: int, path: Path) -> None:
    """lrquant's evaluation documents joined as :func:`tokenize_documents` joins them, cut at the
    first end of a token where llama.cpp reads at least ``eval_tokens`` tokens (the transformers
    tokenizer finds the cuts; llama.cpp's can split runs of blank space differently)."""
    from lrquant.api import DataSettings
    from lrquant.data.text import load_documents

    source = DataSettings().for_model(loaded).eval
    text = "\n\n".join(doc for doc in load_documents(source, "test") if doc.strip())
    encoded = loaded.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in encoded["offset_mapping"]]
    count = eval_tokens
    while count <= len(ends):
        path.write_text(text[: ends[count - 1]] + "\n")  # llama.cpp drops one final newline
        read = len(llama_tokens(tools, model, path))
        if read >= eval_tokens:
            return
        count += eval_tokens - read
    path.unlink(missing_ok=True)
    sys.exit(f"{source} has fewer than --eval-tokens {eval_tokens} tokens")


def write_calibration_text(loaded, nsamples: int, seed: int, path: Path) -> None:
    """lrquant's calibration windows (as ``lrquant quantize`` draws them), decoded, one paragraph each."""
    from lrquant.api import DataSettings, calibration_data

    windows = calibration_data(loaded, DataSettings(seed=seed), nsamples)
    texts = [loaded.tokenizer.decode(window, skip_special_tokens=True) for window in windows]
    path.write_text("\n\n".join(texts) + "\n")


def gguf_add_bos(path: Path) -> bool:
    """Whether llama.cpp puts BOS first for this file's vocabulary."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def gguf_pre_tokenizer(path: Path) -> str | None:
    """The file's ``tokenizer.ggml.pre``: how llama.cpp splits text before BPE."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def gguf_types(path: Path) -> dict[str, str]:
    """Each tensor's GGML type name, by tensor name."""
    import gguf

    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


def type_counts(types: dict[str, str]) -> str:
    """ "Q5_0 x166, F32 x61": how many tensors of each type, most first."""
    return ", ".join(f"{name} x{n}" for name, n in Counter(types.values()).most_common())


def type_rules(types: dict[str, str]) -> str:
    """``--gguf-type`` rules that give every weight matrix of a GGUF file the type it has there.

    The default is the most common type of the blocks' matrices; each kind of block matrix whose
    most common type differs gets a ``blk.*.KIND`` pattern, then the matrices that differ from
    their kind's type are named one by one (a later rule overrides an earlier one).
    """
    weights = {
        name.removesuffix(".weight"): kind
        for name, kind in types.items()
        if name.endswith(".weight") and "norm" not in name
    }
    blocks = {name: kind for name, kind in weights.items() if name.startswith("blk.")}
    default = Counter(blocks.values()).most_common(1)[0][0]
    by_role: dict[str, Counter] = {}
    for name, kind in blocks.items():
        by_role.setdefault(name.split(".", 2)[2], Counter())[kind] += 1
    rules, exceptions = [default], []
    for role, kinds in sorted(by_role.items()):
        common = kinds.most_common(1)[0][0]
        if common != default:
            rules.append(f"blk.*.{role}={common}")
        exceptions += [
            f"{name}={kind}" for name, kind in blocks.items() if name.endswith(f".{role}") and kind != common
        ]
    rules += sorted(exceptions, key=lambda rule: [int(p) if p.isdigit() else p for p in rule.split(".")])
    rules += [f"{name}={kind}" for name, kind in sorted(weights.items()) if name not in blocks]
    return ",".join(rules)


def exact_file(types: dict[str, str]) -> bool:
    """Whether a GGUF file of lrquant's holds its output as lrquant simulates it: every block
    matrix in a legacy type (which copies the learned codes) or a float type, the embeddings (not
    quantized by lrquant) in 8 bits or more (Q8_0, F16, F32)."""
    for name, kind in types.items():
        if not name.endswith(".weight") or "norm" in name:
            continue
        lossless = {"F16", "F32", "Q8_0"}
        if name.startswith("blk."):
            lossless |= {"Q4_0", "Q4_1", "Q5_0", "Q5_1"}
        if kind not in lossless:
            return False
    return True


def llama_tokens(tools: LlamaCpp, model: Path, text_path: Path) -> list[int]:
    """The token ids llama.cpp reads the text file as (BOS included when the vocabulary adds it)."""
    text = strip_newline(text_path.read_text())
    args = ["-m", str(model), "--stdin", "--ids", "--log-disable", "--no-parse-special"]
    out = tools.run("llama-tokenize", *args, stdin=text)
    return json.loads(out.strip().splitlines()[-1])


def llama_perplexity(tools: LlamaCpp, cache: Cache, model: Path, text: Path, n_ctx: int) -> dict:
    """``llama-perplexity``'s final estimate and its chunk count (cached by file)."""
    key = f"llama-ppl:{n_ctx}:{file_key(model)}:{file_key(text)}"
    if (found := cache.get(key)) is not None:
        return found
    start = time.perf_counter()
    out = tools.run(
        "llama-perplexity",
        *("-m", str(model), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx)),
        *("-t", str(tools.threads), "--no-escape"),
    )
    final, chunks = FINAL.search(out), CHUNKS.search(out)
    if final is None or chunks is None:
        sys.exit(f"no final perplexity in llama-perplexity's output for {model}:\n{out[-2000:]}")
    result = {
        "ppl": float(final.group(1)),
        "ppl_error": float(final.group(2)),
        "chunks": int(chunks.group(1)),
        "eval_s": round(time.perf_counter() - start, 1),
    }
    cache.put(key, result)
    return result


def chunked_perplexity(model, ids, n_ctx: int, bos: int | None) -> float:
    """llama-perplexity's protocol for a torch causal LM: ``ids`` split into consecutive chunks of
    ``n_ctx`` (the rest dropped), each chunk's first token replaced by ``bos`` when given, the
    chunks scored one by one from scratch, counting only the predictions of tokens
    ``n_ctx // 2 + 1 .. n_ctx - 1`` of each chunk."""
    import torch
    import torch.nn.functional as F

    first = n_ctx // 2
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() // n_ctx * n_ctx, n_ctx):
            chunk = ids[start : start + n_ctx].clone()
            if bos is not None:
                chunk[0] = bos
            logits = model(input_ids=chunk[None], use_cache=False).logits[0]
            targets = chunk[first + 1 :]
            total += F.cross_entropy(logits[first:-1].float(), targets, reduction="sum").item()
            count += targets.numel()
    return math.exp(total / count)


def torch_perplexity(cache: Cache, key: str, load, ids, n_ctx: int, bos: int | None) -> float:
    """:func:`chunked_perplexity` of the model ``load()`` returns (cached under ``key``)."""
    if (found := cache.get(key)) is not None:
        return found
    ppl = chunked_perplexity(load(), ids, n_ctx, bos)
    cache.put(key, ppl)
    return ppl


def transformers_gguf(path: Path):
    """transformers' float32 model from a GGUF file (its own dequantization)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def lrquant_simulated(folder: Path):
    """An lrquant output folder loaded as ``lrquant eval`` loads it (simulated quantization)."""
    from lrquant.models.loading import load_model

    return load_model(str(folder)).model


def lrquant_cli(*args: str) -> None:
    """Run ``lrquant ARGS`` with this interpreter, or exit with the end of its output."""
    cmd = [sys.executable, "-m", "lrquant", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")


def mib(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 2)


def spread(values: list[float]) -> float:
    """(max - min) / min of some perplexities."""
    return (max(values) - min(values)) / min(values)


class Bench:
    """One benchmark run: the tools, the work folder, the texts and the rows measured so far."""

    def __init__(self, args, tools: LlamaCpp) -> None:
        from lrquant.models.loading import load_model, resolve_model_dir
        from lrquant.recipes import build_recipe

        self.args, self.tools = args, tools
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = Cache(self.work)
        self.model_dir = resolve_model_dir(args.model)
        self.loaded = load_model(args.model)
        self.nsamples = build_recipe(args.method, args.preset).calibration_samples
        self.fp = self.work / f"{args.model}-f32.gguf"
        self.eval_text = self.work / f"eval-{args.eval_tokens}.txt"
        self.calib_text = self.work / f"calib-{self.nsamples}-s{args.seed}.txt"
        chunks = f"-c{args.imatrix_chunks}" if args.imatrix_chunks else ""
        self.imatrix = self.work / f"imatrix-{self.nsamples}-s{args.seed}{chunks}.gguf"
        self.rows: list[dict] = []
        self.read_as: dict[Path, object] = {}
        self.checks: list[dict] = []

    def prepare(self) -> None:
        """The full-precision GGUF, the texts, and the evaluation tokens: llama.cpp's, which the
        PyTorch models are scored on too (the transformers tokenizer's count is recorded beside)."""
        import torch

        timed(self.cache, self.fp, self._convert)
        if not self.eval_text.exists():
            write_eval_text(self.loaded, self.tools, self.fp, self.args.eval_tokens, self.eval_text)
        if not self.calib_text.exists():
            write_calibration_text(self.loaded, self.nsamples, self.args.seed, self.calib_text)
        text = strip_newline(self.eval_text.read_text())
        ids = self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.bos = self.loaded.tokenizer.bos_token_id if gguf_add_bos(self.fp) else None
        if self.bos is not None:
            ids = [self.bos, *ids]
        theirs = llama_tokens(self.tools, self.fp, self.eval_text)
        pairs = enumerate(zip(ids, theirs, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), None if len(ids) == len(theirs) else len(ids))
        self.tokens = {"llama.cpp": len(theirs), "transformers": len(ids), "first_difference": first}
        same = "the same ids" if first is None else f"the ids differ from position {first}"
        print(f"evaluation tokens: llama.cpp {len(theirs)}, transformers {len(ids)}, {same}", flush=True)
        self.ids = torch.tensor(theirs, dtype=torch.long)

    def _convert(self) -> None:
        """llama.cpp's converter on the model folder, the file then given the pre-tokenizer name
        lrquant's writer gives the same tokenizer (SmolLM2 converted from its GGUF has a plain
        byte-level pre-tokenizer, which lrquant names gpt-2 and the converter's hash smollm, which
        splits digits and blank space differently): every file then reads the text as the same
        tokens, and each quantizer is judged on the same text."""
        raw = self.fp.with_suffix(".converted.gguf")
        cmd = [sys.executable, str(self.tools.convert), str(self.model_dir), "--outfile", str(raw)]
        out = subprocess.run([*cmd, "--outtype", "f32"], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"convert_hf_to_gguf.py failed:\n{out.stderr[-3000:]}")
        import gguf
        from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

        from lrquant.export.gguf import _pre_tokenizer

        reader = gguf.GGUFReader(raw)
        arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
        writer = gguf.GGUFWriter(self.fp, arch=arch, endianess=reader.endianess)
        pre = MetadataDetails(gguf.GGUFValueType.STRING, _pre_tokenizer(self.model_dir))
        copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.PRE: pre}, [])
        raw.unlink()

    def score(self, path: Path) -> dict:
        """llama.cpp's perplexity of a GGUF file on the evaluation text."""
        result = llama_perplexity(self.tools, self.cache, path, self.eval_text, self.args.n_ctx)
        print(f"  {path.name}: llama.cpp PPL {result['ppl']:.4f} over {result['chunks']} chunks", flush=True)
        return result

    def add_row(self, qtype: str, tool: str, path: Path, seconds: float, **extra) -> dict:
        """Score ``path`` and record its row, with the tokens llama.cpp reads the text as with this
        file's vocabulary (``same_tokens``: as with the F32 file's)."""
        types = gguf_types(path)
        ids = self.file_ids(path)
        row = {
            "type": qtype,
            "tool": tool,
            "file": path.name,
            "mib": mib(path),
            **self.score(path),
            "tokens": ids.numel(),
            "same_tokens": ids is self.ids,
            "pre_tokenizer": gguf_pre_tokenizer(path),
            "quantize_s": seconds,
            "tensor_types": type_counts(types),
            **extra,
        }
        self.rows.append(row)
        return row

    def full_precision(self) -> None:
        """The FP row and the protocol check of the PyTorch model against llama.cpp's F32 file."""
        row = self.add_row("F32", "llama.cpp", self.fp, self.cache.get(f"seconds:{self.fp.name}"))
        ppl = torch_perplexity(
            self.cache,
            f"torch-fp:{self.args.model}:{file_key(self.eval_text)}:{self.args.n_ctx}",
            lambda: self.loaded.model,
            self.ids,
            self.args.n_ctx,
            self.bos,
        )
        self.check(row, {"transformers": ppl}, exact=True)

    def llama_quantized(self, qtype: str, imatrix: bool) -> Path:
        """llama.cpp's ``qtype`` file from the F32 GGUF, with or without the importance matrix."""
        target = self.work / f"llamacpp-{qtype}{'-imatrix' if imatrix else ''}.gguf"
        extra = ["--imatrix", str(self.imatrix)] if imatrix else []
        imatrix_s = self.make_imatrix() if imatrix else 0.0
        seconds = timed(
            self.cache,
            target,
            lambda: self.tools.run(
                "llama-quantize", *extra, str(self.fp), str(target), qtype, str(self.tools.threads)
            ),
        )
        tool = "llama.cpp+imatrix" if imatrix else "llama.cpp"
        row = self.add_row(qtype, tool, target, round(seconds + imatrix_s, 1))
        self.check(row, {"transformers": self.gguf_perplexity(target)}, exact=None)
        return target

    def file_ids(self, path: Path):
        """The token ids llama.cpp reads the evaluation text as with ``path``'s vocabulary:
        ``self.ids`` itself when they are the F32 file's."""
        import torch

        if path not in self.read_as:
            ids = llama_tokens(self.tools, path, self.eval_text)
            self.read_as[path] = self.ids if ids == self.ids.tolist() else torch.tensor(ids, dtype=torch.long)
        return self.read_as[path]

    def torch_key(self, path: Path) -> str:
        """The part of a cache key that names the evaluation tokens of ``path``."""
        own = "" if self.file_ids(path) is self.ids else f":tokens-of-{file_key(path)}"
        return f"{file_key(self.eval_text)}:{self.args.n_ctx}{own}"

    def gguf_perplexity(self, path: Path) -> float:
        """PyTorch's perplexity of transformers' load of a GGUF file, on the tokens llama.cpp reads
        with that file."""
        return torch_perplexity(
            self.cache,
            f"torch-gguf:{file_key(path)}:{self.torch_key(path)}",
            lambda: transformers_gguf(path),
            self.file_ids(path),
            self.args.n_ctx,
            self.bos,
        )

    def make_imatrix(self) -> float:
        """Seconds llama-imatrix took over the calibration text (made once)."""
        chunks = ["--chunks", str(self.args.imatrix_chunks)] if self.args.imatrix_chunks else []
        return timed(
            self.cache,
            self.imatrix,
            lambda: self.tools.run(
                "llama-imatrix",
                *("-m", str(self.fp), "-f", str(self.calib_text), "-c", str(self.args.n_ctx)),
                *("-o", str(self.imatrix), "-t", str(self.tools.threads), "--no-ppl", "--no-escape"),
                *chunks,
            ),
        )

    def lrquant_file(self, qtype: str, like: Path) -> None:
        """lrquant's GGUF with the types of llama.cpp's file ``like``, each linear learning the grid
        of its type; its row, and the check of llama.cpp against PyTorch on it."""
        args = self.args
        sets = [item for pair in args.set for item in ("--set", pair)]
        label = "".join(f"-{pair.replace('=', '')}" for pair in args.set)
        folder = self.work / f"lrquant-{args.model}-{args.method}-{args.preset}{label}-{qtype}-s{args.seed}"
        target = folder.with_name(folder.name + ".gguf")
        rules = type_rules(gguf_types(like))
        seconds = timed(
            self.cache,
            target,
            lambda: lrquant_cli(
                "quantize",
                *("--model", args.model, "--method", args.method, "--preset", args.preset, *BASE, *sets),
                *("--seed", str(args.seed), "--format", "gguf", "--gguf-type", rules),
                *("--device", "cpu", "--no-eval", "--output", str(folder), "--overwrite"),
            ),
        )
        exact = exact_file(gguf_types(target))
        row = self.add_row(
            qtype,
            "lrquant",
            target,
            seconds,
            lrquant=" ".join([args.method, args.preset, *args.set]),
            rules=rules,
            exact=exact,
            preset_matches=self.preset_matches(qtype, folder, like),
        )
        simulated = torch_perplexity(
            self.cache,
            f"torch-sim:{folder.name}:{self.torch_key(target)}",
            lambda: lrquant_simulated(folder),
            self.file_ids(target),
            self.args.n_ctx,
            self.bos,
        )
        self.check(row, {"transformers": self.gguf_perplexity(target), "simulated": simulated}, exact=exact)

    def preset_matches(self, qtype: str, folder: Path, like: Path) -> bool | None:
        """Whether ``--gguf-type QTYPE`` (lrquant's spelling of llama.cpp's mix, where it has one)
        gives every tensor the type llama.cpp's quantizer gave it in ``like``; None without one."""
        from lrquant.export.gguf import PRESETS

        if qtype not in PRESETS:
            return None
        target = folder.with_name(f"{folder.name}-preset-{qtype}.gguf")
        export = ["export", str(folder), "--format", "gguf", "--gguf-type", qtype, "--output", str(target)]
        timed(self.cache, target, lambda: lrquant_cli(*export, "--overwrite"))
        same = gguf_types(target) == gguf_types(like)
        print(f"  --gguf-type {qtype} gives llama.cpp's types for every tensor: {same}", flush=True)
        return same

    def check(self, row: dict, torch_ppls: dict[str, float], exact: bool | None) -> None:
        """Record llama.cpp's and PyTorch's perplexities of one file and their relative spread
        (``exact``: whether the file holds lrquant's output exactly, None for llama.cpp's files)."""
        values = {"llama.cpp": row["ppl"], **torch_ppls}
        result = {
            "file": row["file"],
            "perplexities": values,
            "spread": spread(list(values.values())),
            "exact": exact,
        }
        result["agree"] = result["spread"] <= AGREEMENT
        row["torch"] = torch_ppls
        self.checks.append(result)
        cells = ", ".join(f"{name} {ppl:.4f}" for name, ppl in values.items())
        print(f"  {row['file']}: {cells}; spread {100 * result['spread']:.3f}%", flush=True)


def markdown(bench: Bench, header: str) -> list[str]:
    """The result tables: every file, then the agreement of llama.cpp with PyTorch."""
    lines = [
        header,
        "",
        "| type | tool | file MiB | llama.cpp PPL | quantize s | tokens | tensor types |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in bench.rows:
        tool = f"lrquant ({r['lrquant']})" if r["tool"] == "lrquant" else r["tool"]
        seconds = "" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        tokens = f"{r['tokens']}" + ("" if r["same_tokens"] else f" ({r['pre_tokenizer']})*")
        lines.append(
            f"| {r['type']} | {tool} | {r['mib']:.1f} | {r['ppl']:.3f} ± {r['ppl_error']:.3f} | {seconds} "
            f"| {tokens} | {r['tensor_types']} |"
        )
    if not all(r["same_tokens"] for r in bench.rows):
        lines += [
            "",
            f"*: this file's vocabulary (pre-tokenizer in brackets, the F32 file's is "
            f"`{bench.rows[0]['pre_tokenizer']}`) makes llama.cpp read the text as other tokens, so its "
            "perplexity is not comparable with the others'; PyTorch is checked on the tokens of each file.",
        ]
    lines += [
        "",
        "| file | llama.cpp | transformers | lrquant simulated | spread | exact |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for c in bench.checks:
        ppls = c["perplexities"]
        simulated = f"{ppls['simulated']:.4f}" if "simulated" in ppls else ""
        exact = {None: "", False: "no", True: "yes" if c["agree"] else "yes, DISAGREE"}[c["exact"]]
        lines.append(
            f"| {c['file']} | {ppls['llama.cpp']:.4f} | {ppls['transformers']:.4f} | {simulated} "
            f"| {100 * c['spread']:.3f}% | {exact} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_BIN"), help="llama.cpp's bin folder")
    parser.add_argument("--convert", help="convert_hf_to_gguf.py (default: DIR/../../convert_hf_to_gguf.py)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--method", default="lrquant_plus", help="lrquant's method for its files")
    parser.add_argument("--preset", default="fast", help="lrquant's preset for its files")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="lrquant's recipe settings"
    )
    parser.add_argument("--name", help="results file name (default gguf_llamacpp)")
    parser.add_argument("--seed", type=int, default=0, help="lrquant's seed (calibration windows)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="tokens of evaluation text")
    parser.add_argument("--n-ctx", type=int, default=512, help="llama-perplexity's chunk length")
    parser.add_argument("--imatrix-chunks", type=int, default=0, help="llama-imatrix --chunks (0: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", default="/tmp/gguf_bench", help="folder of intermediate files")
    parser.add_argument("--smoke", action="store_true", help="plumbing only: Q4_0, rtn, 2048 tokens")
    args = parser.parse_args()
    if args.smoke:
        args.types, args.method, args.eval_tokens, args.imatrix_chunks = ["Q4_0"], "rtn", 2048, 4
    os.environ["HF_HUB_OFFLINE"] = "1"
    tools = find_llama_cpp(args.llama_cpp, args.convert, args.threads)

    import torch

    torch.set_num_threads(args.threads)
    bench = Bench(args, tools)
    bench.prepare()
    bench.full_precision()
    for qtype in args.types:
        print(f"{qtype}:", flush=True)
        like = bench.llama_quantized(qtype, imatrix=False)
        bench.llama_quantized(qtype, imatrix=True)
        bench.lrquant_file(qtype, like)

    import transformers

    machine = (
        f"{cpu_name()}, {args.threads} threads; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; llama.cpp {tools.version()}"
    )
    header = (
        f"Model `{args.model}`; llama-perplexity -c {args.n_ctx} -b {args.n_ctx} on the first "
        f"{len(bench.ids)} tokens of `wikipedia:test` ({len(bench.ids) // args.n_ctx} chunks, second half of "
        f"each scored; the transformers tokenizer reads {bench.tokens['transformers']} tokens there, "
        f"PyTorch is scored on llama.cpp's); importance matrix from {bench.nsamples} lrquant calibration "
        f"windows (seed {args.seed}"
        f"{f', first {args.imatrix_chunks} chunks' if args.imatrix_chunks else ''}); lrquant files "
        "with llama.cpp's types copied by --gguf-type, each linear learning its type's grid. "
        "Quantize seconds: llama.cpp from the F32 GGUF (with imatrix: its computation included), lrquant "
        f"from the HF model (quantize + export); {machine}; code {code_version()}."
    )
    lines = markdown(bench, header)
    name = args.name or ("gguf_llamacpp_smoke" if args.smoke else "gguf_llamacpp")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    result = {
        "model": args.model,
        "machine": machine,
        "platform": platform.platform(),
        "commit": code_version(),
        "eval_tokens": bench.tokens,
        "n_ctx": args.n_ctx,
        "method": args.method,
        "preset": args.preset,
        "set": args.set,
        "rows": bench.rows,
        "checks": bench.checks,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    failed = [c["file"] for c in bench.checks if c["exact"] and not c["agree"]]
    if failed:
        message = f"llama.cpp and PyTorch differ by more than {100 * AGREEMENT}% on {', '.join(failed)}"
        if not args.smoke:  # a few chunks are too noisy for the bound
            sys.exit(message)
        print(f"{message} (not an error with --smoke's few chunks)")


if __name__ == "__main__":
    main()
