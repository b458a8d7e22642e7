"""GGUF export (llama.cpp, Ollama, LM Studio) of a quantized output, bit-exact on lrquant's grid.

A GGUF block of 32 weights holds integers ``q`` and an fp16 step ``d`` (and, for the ``_1`` types,
an fp16 minimum ``m``): ``Q4_0``/``Q5_0`` give ``w = d·(q − 8)``/``d·(q − 16)``, ``Q8_0`` gives
``w = d·q``, ``Q4_1``/``Q5_1`` give ``w = d·q + m``. When every group of lrquant's grid
``w = s·(c − z)`` is a whole number of 32-weight blocks, each block takes its group's ``s`` as
``d`` (and ``s·(c_min − z)`` as ``m``) and the codes are copied, so only the fp16 rounding of
``d`` and ``m`` differs from the quantized model. Tensor names, metadata, the tokenizer and the
q/k row order follow llama.cpp's ``convert_hf_to_gguf.py``.

Matrices that were not quantized (embedding, an unquantized head) are F16, as the converter
writes a float32 model by default: half the bytes of F32, for the same 2^-11 relative rounding
that the blocks' steps already carry; BF16 ones stay BF16 (exact). Norms and biases are F32, the
only type llama.cpp takes for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from lrquant.errors import LrquantError
from lrquant.export import IntegerLinear, QuantizedOutput

BLOCK = 32  # weights per block of every non-K GGUF type

# model_type -> (GGUF architecture, whether q/k rows are reordered for llama.cpp's rope)
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),  # llama.cpp runs Mistral as llama
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),  # NeoX rope: HF's row order as it is
}

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class BlockType:
    """How one GGUF block type stores integers: ``q`` in ``[qmin, qmax]``, and either a fixed
    ``offset`` (``w = d·(q − offset)``) or a per-block minimum ``m`` (``w = d·q + m``)."""

    qtype: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType
    qmin: int
    qmax: int
    offset: int | None  # None: the block stores a minimum m

    @property
    def bits(self) -> int:
        return (self.qmax - self.qmin).bit_length()


BLOCK_TYPES: dict[str, BlockType] = {
    "Q4_0": BlockType(Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0, 0, 15, 8),
    "Q4_1": BlockType(Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1, 0, 15, None),
    "Q5_0": BlockType(Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0, 0, 31, 16),
    "Q5_1": BlockType(Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1, 0, 31, None),
    "Q8_0": BlockType(Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, -128, 127, 0),
}

# (bits, symmetric) of lrquant's grid -> the GGUF type that holds it with the fewest bytes
NATURAL_TYPES: dict[tuple[int, bool], str] = {
    (4, True): "Q4_0",
    (4, False): "Q4_1",
    (5, True): "Q5_0",
    (5, False): "Q5_1",
    (8, True): "Q8_0",
}

_EXACT_GRIDS = (
    "--wbits 4 or 5 (with or without --w-symmetric) or --wbits 8 --w-symmetric, and --group-size 32, "
    "64, 128 (any multiple of 32) or none"
)


def _refuse_unsupported(output: QuantizedOutput) -> None:
    """Refuse, in one line, what a GGUF file cannot hold or this writer does not write yet."""
    if output.model_type not in ARCHITECTURES:
        raise LrquantError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} models, not '{output.model_type}': "
            "export this output with --format compressed-tensors instead"
        )
    if output.scheme.quantizes_activations:
        raise LrquantError(
            f"'{output.folder}' quantizes activations ({output.scheme.name}), but GGUF holds weights only: "
            "llama.cpp would run them in full precision, not as evaluated; export a weight-only output "
            "(quantized without --abits, the default 16)"
        )
    rope = output.config.get("rope_parameters") or output.config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LrquantError(
            f"GGUF export does not write rope scaling yet (this model uses '{rope_type}'): export it "
            "with --format compressed-tensors instead"
        )


def _block_type(output: QuantizedOutput, weight_type: str | None) -> BlockType:
    """The GGUF type for the quantized linears: ``weight_type`` if given, else the one the grid
    maps to; refused when the grid has no exact GGUF type."""
    spec = output.scheme.weight
    if weight_type is not None:
        if weight_type.upper() not in BLOCK_TYPES:
            raise LrquantError(
                f"unknown GGUF weight type '{weight_type}': choose one of {', '.join(BLOCK_TYPES)}"
            )
        return BLOCK_TYPES[weight_type.upper()]
    grid = (spec.bits, spec.symmetric)
    if grid not in NATURAL_TYPES:
        if spec.bits == 8:
            raise LrquantError(
                "an asymmetric 8-bit grid has no GGUF type (Q8_0 is symmetric): quantize with --w-symmetric"
            )
        kind = "a symmetric" if spec.symmetric else "an asymmetric"
        raise LrquantError(
            f"{kind} {spec.bits}-bit grid has no exact GGUF type (fitting it to the K-quants is not "
            f"there yet): quantize with {_EXACT_GRIDS}"
        )
    return BLOCK_TYPES[NATURAL_TYPES[grid]]


def _refuse_partial_blocks(output: QuantizedOutput) -> None:
    """Each 32-weight block must lie inside one group, so that it can take that group's step."""
    size = output.scheme.weight.group_size
    if size is not None and size % BLOCK:
        raise LrquantError(
            f"groups of {size} weights are not whole 32-weight GGUF blocks: quantize with --group-size "
            "32, 64, 128 (any multiple of 32) or per channel"
        )
    for name, linear in output.linears.items():
        if linear.codes.shape[1] % BLOCK:
            raise LrquantError(
                f"'{name}' has {linear.codes.shape[1]} inputs, not whole 32-weight GGUF blocks: this "
                "model cannot be exported to GGUF exactly; export it with --format compressed-tensors"
            )


def _permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rope pairs adjacent dimensions where HF pairs the two halves of each head, so
    convert_hf_to_gguf.py interleaves each head's halves; whole rows move, codes with their steps."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_order(linear: IntegerLinear, heads: int) -> IntegerLinear:
    """The linear with its output rows in llama.cpp's rope order."""
    bias = None if linear.bias is None else _permute_rows(linear.bias, heads)
    return IntegerLinear(
        codes=_permute_rows(linear.codes, heads),
        scale=_permute_rows(linear.scale, heads),
        zero=_permute_rows(linear.zero, heads),
        bias=bias,
        bits=linear.bits,
        symmetric=linear.symmetric,
        group_size=linear.group_size,
    )


def _fp16(values: np.ndarray, name: str, what: str) -> np.ndarray:
    """``values`` as the fp16 that GGUF blocks store, refused when fp16 cannot hold them."""
    half = values.astype(np.float16)
    if not np.isfinite(half).all() or ((half == 0) & (values != 0)).any():
        raise LrquantError(
            f"'{name}' has a {what} outside the fp16 range of GGUF blocks: it cannot be exported"
        )
    return half


def pack_blocks(linear: IntegerLinear, block: BlockType, name: str) -> np.ndarray:
    """The GGUF blocks of one quantized linear, ``[out, in / 32 · bytes per block]`` uint8, laid
    out as llama.cpp's ggml-common.h declares them; refused when a code does not fit ``block``."""
    out, inputs = linear.codes.shape
    blocks = inputs // BLOCK
    group = (linear.group_size or inputs) // BLOCK  # blocks per group
    of_block = torch.arange(blocks) // group
    scale = linear.scale[:, of_block].double().numpy()
    zero = linear.zero[:, of_block].double().numpy()
    codes = linear.codes.reshape(out, blocks, BLOCK).to(torch.int32).numpy()
    if block.offset is None:  # w = s·(c − z) = s·(c − c_min) + s·(c_min − z)
        lowest = -(1 << (linear.bits - 1)) if linear.symmetric else 0
        q = codes - lowest
        minimum = _fp16(scale * (lowest - zero), name, "block minimum")
    else:  # w = s·(c − z) = s·((c − z + offset) − offset)
        q = codes - np.rint(zero[..., None]).astype(np.int32) + block.offset
        minimum = None
    if q.min() < block.qmin or q.max() > block.qmax:
        raise LrquantError(
            f"'{name}' has codes that {block.qtype.name} cannot hold exactly: export without a weight "
            "type to get the one that fits the grid"
        )
    parts = [_fp16(scale, name, "step").view(np.uint8).reshape(out, blocks, 2)]
    if minimum is not None:
        parts.append(minimum.view(np.uint8).reshape(out, blocks, 2))
    if block.bits == 8:
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        if block.bits == 5:  # bit 4 of weight j is bit j of a little-endian uint32
            high = ((q >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
            parts.append(
                high.sum(axis=-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(out, blocks, 4)
            )
        low = (q & 0xF).astype(np.uint8)  # weights j and j+16 share byte j
        parts.append(low[..., : BLOCK // 2] | (low[..., BLOCK // 2 :] << 4))
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def _float_tensor(tensor: torch.Tensor, key: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """An unquantized tensor as convert_hf_to_gguf.py stores it: 1-D ones (norms, biases) in F32,
    which llama.cpp expects, matrices in BF16 when saved so (exact) and in F16 otherwise."""
    if tensor.dim() == 1:
        return tensor.float().numpy(), Q.F32
    if tensor.dtype == torch.bfloat16:  # bf16 -> f32 -> bf16 is exact
        return gguf.quants.quantize(tensor.float().numpy(), Q.BF16), Q.BF16
    half = tensor.half().numpy()
    if not np.isfinite(half).all():
        raise LrquantError(f"'{key}' has values beyond the fp16 range: it cannot be exported to GGUF")
    return half, Q.F16


def _gguf_tensors(
    output: QuantizedOutput, arch: gguf.MODEL_ARCH, permute: bool, block: BlockType
) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """Every tensor of the file, by its GGUF name, all packed before anything is written."""
    config = output.config
    names = gguf.TensorNameMap(arch, config["num_hidden_layers"])
    n_heads = config["num_attention_heads"]
    heads = {"q_proj": n_heads, "k_proj": config.get("num_key_value_heads", n_heads)}

    def gguf_name(key: str) -> str:
        mapped = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise LrquantError(
                f"'{key}' has no GGUF tensor name: this model variant cannot be exported to GGUF"
            )
        return mapped

    tensors = []
    for name, linear in output.linears.items():
        role = name.rsplit(".", 1)[-1]
        if permute and role in heads:
            linear = _rope_order(linear, heads[role])
        tensors.append((gguf_name(f"{name}.weight"), pack_blocks(linear, block, name), block.qtype))
        if linear.bias is not None:
            tensors.append((gguf_name(f"{name}.bias"), *_float_tensor(linear.bias, f"{name}.bias")))
    for key, tensor in output.tensors.items():
        if key.endswith("rotary_emb.inv_freq"):  # recomputed from the rope metadata
            continue
        tensors.append((gguf_name(key), *_float_tensor(tensor, key)))
    return tensors


def _add_metadata(writer: gguf.GGUFWriter, output: QuantizedOutput, block: BlockType) -> None:
    """The hyperparameters llama.cpp reads, as convert_hf_to_gguf.py writes them."""
    config = output.config
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    writer.add_name(output.folder.name)
    writer.add_quantized_by("lrquant")  # how `--overwrite` knows the file as lrquant's
    writer.add_description(
        f"{output.scheme.name} by {output.method or 'lrquant'}, from lrquant's integer codes"
    )
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(block.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# the split regex of a byte-level BPE -> llama.cpp's name for that pre-tokenization
SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
}


def _pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization: GPT-2's regex for a lone byte-level
    pre-tokenizer (SmolLM's when digits are split first), Qwen2's or Llama 3's for their split
    before a byte-level one. llama.cpp names the others by hashing tokenizations
    (convert_hf_to_gguf.py), so they are refused rather than guessed."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise LrquantError(
            f"'{folder}' has no tokenizer.json (a SentencePiece tokenizer?), and GGUF export writes "
            "byte-level BPE tokenizers only yet: export it with --format compressed-tensors instead"
        )
    pre = json.loads(file.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds[-1:] == ["ByteLevel"] and not parts[-1].get("add_prefix_space"):
        regex = parts[-1].get("use_regex", True)  # GPT-2's
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and regex:
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not regex:
            name = SPLIT_REGEXES.get(parts[0].get("pattern", {}).get("Regex"))
            if name is not None:
                return name
    raise LrquantError(
        f"GGUF export does not know llama.cpp's name for the pre-tokenizer of '{folder}' yet (it writes "
        "GPT-2, SmolLM, Qwen2 and Llama 3 byte-level BPE): export it with --format compressed-tensors instead"
    )


def _add_tokenizer(writer: gguf.GGUFWriter, output: QuantizedOutput, pre: str) -> None:
    """A GPT-2 style BPE vocabulary, as convert_hf_to_gguf.py's ``_set_vocab_gpt2`` writes it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output.folder)
    vocab_size = output.config["vocab_size"]
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding has rows past the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if token not in added:
            types.append(gguf.TokenType.NORMAL)
        elif tokenizer.added_tokens_decoder[i].special:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(output.folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def write_gguf(output: QuantizedOutput, path: Path, weight_type: str | None = None) -> None:
    """Write ``output`` as one GGUF file at ``path``.

    The quantized linears take ``weight_type`` (Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0) or, by default,
    the type their grid maps to (:data:`NATURAL_TYPES`). Everything that can be refused is refused
    (an :class:`LrquantError`) before the file is opened; the caller makes the write atomic.
    """
    _refuse_unsupported(output)
    block = _block_type(output, weight_type)
    _refuse_partial_blocks(output)
    pre = _pre_tokenizer(output.folder)
    arch, permute = ARCHITECTURES[output.model_type]
    tensors = _gguf_tensors(output, arch, permute, block)

    writer = gguf.GGUFWriter(Path(path), gguf.MODEL_ARCH_NAMES[arch])  # opens the file only to write
    _add_metadata(writer, output, block)
    _add_tokenizer(writer, output, pre)
    for name, data, qtype in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
